"""Host time per call of mmfast's ops on the triton backend, measured on a machine without a GPU.

At small and medium shapes the GPU finishes a kernel before the host has launched the next, so
the host's time per call (validation, autograd, allocation, the Triton launch) decides an op's
wall clock. This script measures exactly that part on the CPU: kernels are compiled for sm_90
through the target-only driver of ``tests/_compile_sm90.py`` and every launch runs Triton's (or
mmfast's fast) launch path up to the launcher, whose call into the CUDA driver is replaced by a
no-op. What remains is everything the host does per call except ``cuLaunchKernel`` itself
(a few µs per launch). Run from the repository root:

    python benchmarks/host_overhead.py [--calls 300] [--ops pool,terms] [--cuda]

With ``--cuda`` (on a GPU) nothing is stubbed: the same tiny calls run on CUDA tensors, back to
back, and the time per call is the host's, launches and the CUDA caching allocator included.

Prints the best of 7 rounds, in µs per call, for forward (grad enabled, as in training) and
forward+backward (``torch.autograd.backward`` with cotangents made once, as the benchmark
suite's ``forward+backward`` mode does), with the reference backend beside it for scale.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

import _compile_sm90 as sm90  # noqa: E402  (the target-only driver; imports mmfast)
import mmfast  # noqa: E402
from mmfast import ops  # noqa: E402


def stub_launches() -> None:
    """Compile for sm_90 and launch nothing: a compiled kernel's launcher becomes a no-op."""
    sm90.target_only()
    sm90.record_launches(lambda call: None)


def cases(B: int = 8, device: str = "cpu") -> dict:
    """name -> thunk running the op forward on small leaf tensors (host cost does not depend on
    the shape)."""
    def leaf(*shape):
        return torch.randn(shape, device=device).requires_grad_(True)
    mask = torch.rand(B, 8, device=device) < 0.5
    x, mu, logvar = leaf(B, 8, 16), leaf(B, 8, 16), leaf(B, 8, 16)
    data = torch.rand(B, 784, device=device)
    bern, loc, log_scale = leaf(1, B, 784), leaf(1, B, 784), leaf(784)
    cat, target = leaf(1, B, 8, 71), torch.randint(71, (B, 8), device=device)
    q = leaf(B, 8, 32)
    post_s, post_f = (leaf(B, 20), leaf(B, 20)), (leaf(B, 20), leaf(B, 20))
    eps_s, eps_f = leaf(1, B, 20), leaf(1, B, 20)
    return {
        "subset_sum_pool": lambda: ops.subset_sum_pool(x, mask),
        "gaussian_poe": lambda: ops.gaussian_poe(mu, logvar, mask),
        "subset_attention": lambda: ops.subset_attention(q, q, q, mask, 4),
        "bernoulli_log_prob": lambda: ops.bernoulli_log_prob(bern, data),
        "laplace_log_prob": lambda: ops.laplace_log_prob(loc, log_scale, data, 1e-3),
        "categorical_log_prob": lambda: ops.categorical_log_prob(cat, target),
        "gaussian_terms (masked)": lambda: ops.gaussian_terms(post_s, eps_s, post_f, eps_f),
    }


def _differentiable(outs) -> list[torch.Tensor]:
    return [o for o in (outs if isinstance(outs, tuple) else (outs,))
            if isinstance(o, torch.Tensor) and o.requires_grad]


def with_backward(forward):
    """Forward and ``torch.autograd.backward``, with cotangents made once (as the benchmark
    suite's ``forward+backward`` mode does)."""
    cotangents = [torch.ones_like(o) for o in _differentiable(forward())]

    def run():
        torch.autograd.backward(_differentiable(forward()), cotangents)
    return run


def best_us(fn, calls: int, rounds: int = 7, sync=lambda: None) -> float:
    """Best over ``rounds`` of the mean time of ``calls`` back-to-back calls, each round
    ending with ``sync()``, in µs."""
    for _ in range(max(3, calls // 10)):
        fn()
    sync()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per timed round")
    parser.add_argument("--ops", default="", help="comma-separated substrings of op names")
    parser.add_argument("--cuda", action="store_true",
                        help="on a GPU, for real: the same tiny calls on CUDA tensors, launched "
                             "back to back with one synchronisation a round; the kernels take "
                             "a few µs, so the time per call is the host's (checks the stubbed "
                             "figures)")
    args = parser.parse_args(argv)
    if args.cuda:
        device, sync, what = "cuda", torch.cuda.synchronize, f"on {torch.cuda.get_device_name()}"
    else:
        stub_launches()
        device, sync, what = "cpu", lambda: None, "launches stubbed"
    wanted = [w for w in args.ops.split(",") if w]
    print(f"host µs per call, {what} (torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs); best of 7 rounds of {args.calls} calls")
    print(f"{'op':<26}{'triton fwd':>12}{'triton f+b':>12}{'reference fwd':>15}{'reference f+b':>15}")
    for name, forward in cases(device=device).items():
        if wanted and not any(w in name for w in wanted):
            continue
        row = []
        for backend in ("triton", "reference"):
            with mmfast.use_backend(backend):
                row += [best_us(forward, args.calls, sync=sync),
                        best_us(with_backward(forward), args.calls, sync=sync)]
        print(f"{name:<26}" + "".join(f"{v:>12.1f}" for v in row[:2])
              + "".join(f"{v:>15.1f}" for v in row[2:]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
