"""No public op synchronises the GPU (DESIGN.md: no ``.item()`` inside the training step), and
every op's forward and backward can be captured in a CUDA graph.

A call that reads a device value back on the host (``.item()``, ``nonzero``, a data-dependent
Python branch) makes the host wait for all the GPU work queued before it, every step, so the
host can no longer run ahead of the device. ``torch.cuda.set_sync_debug_mode("error")`` turns
any such read into an error; each op runs forward and backward under it, on both backends,
after one warm-up call outside it (the first call compiles the kernels). GPU only: a CPU has
nothing to synchronise.

At small shapes an op's wall clock is its host time (validation, autograd, launches); replaying
a captured CUDA graph (``torch.cuda.graph``, or ``torch.compile(mode="reduce-overhead")``)
removes it, so each op's forward and backward on the triton backend is captured, replayed, and
compared with eager calls, before and after its inputs change in place.
"""
from __future__ import annotations

import pytest
import torch

import mmfast
from conftest import DEVICE
from mmfast import ops
from mmfast.subsets import all_subsets


def _leaf(*shape, scale=1.0):
    return (torch.randn(shape) * scale).to(DEVICE).requires_grad_(True)


def _bank(B, M):
    bank = all_subsets(M).to(DEVICE)
    return bank.expand(B, *bank.shape)


def _cases():
    """name -> thunk returning (outputs, differentiable inputs)."""
    torch.manual_seed(0)
    B, M, D, K = 6, 4, 16, 3
    mask = (torch.rand(B, M) < 0.6).to(DEVICE)
    x = _leaf(B, M, D)
    mu, lv = _leaf(B, M, D), _leaf(B, M, D, scale=0.5)
    q, k, v = _leaf(B, M, D), _leaf(B, M, D), _leaf(B, M, D)
    w, b = _leaf(8, D), _leaf(8)
    mu_s, lv_s, mu_f, lv_f = _leaf(B, D), _leaf(B, D), _leaf(B, D), _leaf(B, D)
    eps_s, eps_f = _leaf(K, B, D), _leaf(K, B, D)
    prior = (_leaf(5), _leaf(5, D), _leaf(5, D, scale=0.3))
    logits, data = _leaf(K, B, 10), torch.rand(B, 10).to(DEVICE)
    cat, target = _leaf(K, B, 4, 7), torch.randint(7, (B, 4)).to(DEVICE)
    loc, log_scale = _leaf(K, B, 10), _leaf(10)
    z, weights = _leaf(K, B, D), _leaf(K, B)
    bank = _bank(B, M)     # made once: a host-to-device copy cannot run during graph capture
    return {
        "subset_sum_pool": lambda: (ops.subset_sum_pool(x, mask), [x]),
        "subset_sum_pool bank": lambda: (ops.subset_sum_pool(x, bank), [x]),
        "subset_pool_linear bank": lambda: (ops.subset_pool_linear(x, bank, w, b),
                                            [x, w, b]),
        "gaussian_poe bank": lambda: (ops.gaussian_poe(mu, lv, bank), [mu, lv]),
        "subset_attention bank": lambda: (ops.subset_attention(q, k, v, bank, num_heads=2),
                                          [q, k, v]),
        "gaussian_terms": lambda: (tuple(t for t in ops.gaussian_terms(
            (mu_s, lv_s), eps_s, (mu_f, lv_f), eps_f, prior=prior) if t is not None),
            [mu_s, lv_s, eps_s, mu_f, lv_f, eps_f, *prior]),
        "bernoulli_log_prob": lambda: (ops.bernoulli_log_prob(logits, data), [logits]),
        "categorical_log_prob": lambda: (ops.categorical_log_prob(cat, target), [cat]),
        "normal_log_prob": lambda: (ops.normal_log_prob(loc, log_scale, data), [loc, log_scale]),
        "laplace_log_prob": lambda: (ops.laplace_log_prob(loc, log_scale, data),
                                     [loc, log_scale]),
        "gaussian_log_prob": lambda: (ops.gaussian_log_prob(z, mu_s, lv_s), [z, mu_s, lv_s]),
        "mixture_log_prob": lambda: (ops.mixture_log_prob(z, *prior), [z, *prior]),
        "importance_logsumexp": lambda: (ops.importance_logsumexp(weights), [weights]),
    }


def _forward_backward(thunk):
    """-> (outputs, gradients of the inputs), all detached."""
    outs, inputs = thunk()
    outs = outs if isinstance(outs, tuple) else (outs,)
    outs = [o for o in outs if o.requires_grad]
    grads = torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])
    return [o.detach() for o in outs], list(grads), inputs


@pytest.mark.cuda
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("name", list(_cases()))
def test_op_never_synchronises(name, backend_name):
    with mmfast.use_backend(backend_name):
        thunk = _cases()[name]
        _forward_backward(thunk)                      # compiles, allocates
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _forward_backward(thunk)
        finally:
            torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(_cases()))
def test_op_replays_in_a_cuda_graph(name):
    with mmfast.use_backend("triton"):
        thunk = _cases()[name]
        side = torch.cuda.Stream()            # warm-up (compiles) off the default stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _forward_backward(thunk)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured_outs, captured_grads, inputs = _forward_backward(thunk)
        for step in range(2):
            if step:                           # new values, same tensors: the graph reads them
                with torch.no_grad():
                    for t in inputs:
                        t.mul_(0.7).add_(0.05)
            graph.replay()
            torch.cuda.synchronize()
            outs, grads, _ = _forward_backward(thunk)
            for got, want in zip(captured_outs + captured_grads, outs + grads):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
