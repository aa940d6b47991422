"""Plain-PyTorch reference implementations of every op, written from METHOD.md.

They are differentiable through ordinary autograd, validate nothing (the public functions in
``mmfast.ops`` do) and are what the eager and ``torch.compile`` benchmark providers time.
"""
from mmfast.ops.reference.attention import subset_attention
from mmfast.ops.reference.densities import gaussian_log_prob, mixture_log_prob
from mmfast.ops.reference.iwae import importance_logsumexp
from mmfast.ops.reference.likelihoods import (bernoulli_log_prob, categorical_log_prob,
                                              laplace_log_prob, normal_log_prob)
from mmfast.ops.reference.objective import full_terms, reparameterize, subset_terms
from mmfast.ops.reference.poe import gaussian_poe
from mmfast.ops.reference.pool_linear import subset_pool_linear
from mmfast.ops.reference.pooling import subset_sum_pool

__all__ = [
    "subset_sum_pool", "subset_pool_linear", "subset_attention", "gaussian_poe",
    "gaussian_log_prob",
    "mixture_log_prob", "bernoulli_log_prob", "categorical_log_prob", "normal_log_prob",
    "laplace_log_prob", "subset_terms", "full_terms", "reparameterize", "importance_logsumexp",
]
