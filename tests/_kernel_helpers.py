"""Helpers shared by the tests of the fused-density kernels (Gaussian terms, densities,
likelihoods): their tolerances per dtype, seeded float64 inputs, and the triton backend."""
from __future__ import annotations

import pytest
import torch

import mmfast
from conftest import DEVICE

F64 = torch.float64
# (rtol, atol) of a kernel against the float64 expectation, per input dtype.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 5e-2),
       torch.bfloat16: (2e-2, 2e-1)}


@pytest.fixture(autouse=True)
def triton_backend():
    """Autouse in every module that imports it: the ops run on the triton backend."""
    with mmfast.use_backend("triton"):
        yield


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, scale=1.0, shift=0.0, dtype=F64):
    """A leaf that requires grad: standard normal draws (made in float64) * scale + shift."""
    t = torch.randn(shape, generator=gen(seed), dtype=F64) * scale + shift
    return t.to(DEVICE, dtype).requires_grad_(True)


def uniform(*shape, seed, low, high, dtype=F64):
    """A leaf that requires grad, uniform on [low, high) (drawn in float64)."""
    t = torch.rand(shape, generator=gen(seed), dtype=F64) * (high - low) + low
    return t.to(DEVICE, dtype).requires_grad_(True)


def mixture_log_density(z, logits, mu, logvar, component):
    """log Σ_c softmax(logits)_c exp(component(z, mu_c, logvar_c)), one component at a time;
    ``component`` is the calling module's own Gaussian log-density (summed over the event)."""
    log_w = logits - logits.max()
    log_w = log_w - torch.log(torch.exp(log_w).sum())
    comps = torch.stack([log_w[c] + component(z, mu[c], logvar[c])
                         for c in range(logits.shape[0])], dim=-1)
    top = comps.max(-1, keepdim=True).values.detach()
    return top.squeeze(-1) + torch.log(torch.exp(comps - top).sum(-1))
