"""Benchmarks of the likelihood reductions at the shapes of the paper's MNIST-SVHN-Text
experiment: MNIST (784 pixels, Bernoulli and Laplace), SVHN (3x32x32, Laplace) and text
(8 positions x 71 classes, categorical), K decoded samples per data point, float32.

Providers (benchmarks/conftest.py): ``eager`` is the plain-PyTorch reference of mmfast.ops
(element-wise log-probabilities then a sum over the event; ``log_softmax`` + ``gather`` for the
categorical), ``compile`` is ``torch.compile`` of it, ``mmfast`` the Triton kernels (GPU only).
The Laplace scale is a learned per-pixel log-scale (shape of the event, broadcast over K and B)
with min_scale = 1e-3, as the model's ``scale="learned"``.

Minimum bytes: forward reads the parameters ``[K, B, *event]`` once, the data ``[B, *event]``
once (and the per-event log-scale), and writes ``[K, B]`` float32; backward reads the same plus
the upstream ``[K, B]`` gradient and writes the gradients of the parameters, of the data and of
the per-event log-scale. (mmfast's op returns the log-scale gradient at loc's shape and
autograd's expand reduces it, so its Laplace backward moves more than this minimum.)
On CPU only B = 64 runs, so the suite stays quick and cannot rot.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, provider_fn, run_case
from mmfast.ops import bernoulli_log_prob, categorical_log_prob, laplace_log_prob
from mmfast.ops import reference as ref

MIN_SCALE = 1e-3
SHAPES = {"mnist": (784,), "svhn": (3, 32, 32), "text": (8,)}
CLASSES = 71

B = 1024 if HAS_CUDA else 64
CASES = [(name, family, K) for name, family in (("mnist", "bernoulli"), ("mnist", "laplace"),
                                                 ("svhn", "laplace"), ("text", "categorical"))
         for K in ((1, 16) if HAS_CUDA else (4,))]


def eager_bernoulli(logits, x):
    return ref.bernoulli_log_prob(logits, x)


def eager_categorical(logits, target):
    return ref.categorical_log_prob(logits, target)


def eager_laplace(loc, log_scale, x):
    return ref.laplace_log_prob(loc, log_scale, x, MIN_SCALE)


def mmfast_laplace(loc, log_scale, x):
    return laplace_log_prob(loc, log_scale, x, MIN_SCALE)


FUNCTIONS = {"bernoulli": (eager_bernoulli, bernoulli_log_prob),
             "categorical": (eager_categorical, categorical_log_prob),
             "laplace": (eager_laplace, mmfast_laplace)}


def min_bytes(mode: str, family: str, K: int, event: tuple[int, ...], item: int = 4) -> int:
    n = torch.Size(event).numel()
    if family == "categorical":
        params, data, extra = K * B * n * CLASSES * item, B * n * 8, 0
    else:
        params, data = K * B * n * item, B * n * item
        extra = n * item if family == "laplace" else 0
    out = K * B * 4
    forward = params + data + extra + out
    grad_data = 0 if family == "categorical" else data
    backward = (params + data + extra + out) + (params + grad_data + extra)
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


@pytest.mark.parametrize("dataset,family,K", CASES)
def test_likelihood(benchmark, provider, mode, dataset, family, K):
    event = SHAPES[dataset]
    benchmark.group = f"{family}_log_prob {dataset} K={K} B={B} {mode}"
    g = torch.Generator().manual_seed(0)

    def make_inputs():
        grad = mode != "forward"
        if family == "categorical":
            logits = torch.randn(K, B, *event, CLASSES, generator=g).to(DEVICE)
            target = torch.randint(0, CLASSES, (B, *event), generator=g).to(DEVICE)
            return logits.requires_grad_(grad), target
        params = torch.randn(K, B, *event, generator=g).to(DEVICE).requires_grad_(grad)
        if family == "bernoulli":
            x = torch.rand(B, *event, generator=g).to(DEVICE).requires_grad_(grad)
            return params, x
        log_scale = (torch.randn(*event, generator=g) * 0.1).to(DEVICE).requires_grad_(grad)
        x = torch.rand(B, *event, generator=g).to(DEVICE).requires_grad_(grad)
        return params, log_scale, x

    eager, public = FUNCTIONS[family]
    run_case(benchmark, provider_fn(provider, eager, public), make_inputs, mode,
             min_bytes(mode, family, K, event), provider=provider, dataset=dataset,
             family=family, K=K, B=B, event=list(event), dtype="float32",
             eager="mmfast.ops.reference (element-wise log-probabilities, then a sum)")
