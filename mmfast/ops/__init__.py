"""mmfast's public functional API (DESIGN.md): every function validates its inputs, then runs a
``torch.library`` custom op whose implementation is the Triton kernel or the reference,
according to :mod:`mmfast.backend`. The plain-PyTorch references are in
:mod:`mmfast.ops.reference`."""
from mmfast.ops.attention import subset_attention
from mmfast.ops.densities import gaussian_log_prob, mixture_log_prob
from mmfast.ops.iwae import importance_logsumexp
from mmfast.ops.likelihoods import (bernoulli_log_prob, categorical_log_prob, laplace_log_prob,
                                    normal_log_prob)
from mmfast.ops.objective import GaussianTerms, gaussian_terms
from mmfast.ops.poe import gaussian_poe
from mmfast.ops.pool_linear import subset_pool_linear
from mmfast.ops.pooling import subset_sum_pool

__all__ = [
    "subset_sum_pool", "subset_pool_linear", "subset_attention", "gaussian_poe",
    "gaussian_log_prob",
    "mixture_log_prob", "bernoulli_log_prob", "categorical_log_prob", "normal_log_prob",
    "laplace_log_prob", "gaussian_terms", "GaussianTerms", "importance_logsumexp",
]
