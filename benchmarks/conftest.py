"""Shared benchmark harness (pytest-benchmark).

A timed round is a few back-to-back calls and one device synchronisation (the time is per
call); warm-up rounds are excluded from the statistics. Providers: ``eager`` (the reference
formulation), ``compile`` (``torch.compile(reference, dynamic=False)``) and ``mmfast`` (the
public op on the Triton backend, GPU only). Without a GPU the suite runs on CPU with the
reference providers at reduced sizes, so it cannot rot. ``extra_info`` records the achieved
GB/s against the minimum bytes that must move and its ratio to a measured device-to-device copy
(wall clock, host overhead included), and on CUDA the peak memory of a call and the kernels'
own time per call from the CUDA profiler (``device_us``, ``device_copy_ratio``).
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import pytest
import torch
import torch._dynamo  # noqa: F401  (recompile limit below)
import torch._functorch.config  # noqa: F401  (donated buffers below)

import mmfast
from mmfast.backend import triton_can_run
from mmfast.subsets import all_subsets

# One compiled reference serves every shape of a suite (dynamic=False): allow a recompile per
# shape instead of silently falling back to eager after the default limit of 8.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
# The ``backward`` mode replays one graph's backward (retain_graph=True), which compiled
# backwards with donated buffers refuse; donation only lets the backward reuse the memory of
# saved tensors in place, so the compile provider's peak memory may read slightly higher.
torch._functorch.config.donated_buffer = False

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
MODES = ("forward", "backward", "forward+backward")


# The cases that decide the issues' targets (benchmarks/report.py, TARGETS): with
# ``--targets-only`` only these run, for a GPU session too short for the whole suite. A test
# function's cases are kept when their parameters equal every value listed here.
TARGET_CASES = {
    "test_subset_sum_pool": {"B": 4096, "M": 8, "D": 512},
    "test_gaussian_poe": {"B": 4096, "M": 8, "d": 512},
    "test_subset_pool_linear": {"B": 4096, "M": 8, "D": 512},
    "test_subset_attention": {"B": 4096, "M": 8, "E": 256},
    "test_self_attention_aggregator": {"B": 4096},
    "test_gaussian_terms": {},
    "test_likelihood": {},
}


def pytest_addoption(parser):
    parser.addoption("--targets-only", action="store_true",
                     help="run only the cases the issues' targets are judged on")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--targets-only"):
        return
    keep, drop = [], []
    for item in items:
        want = TARGET_CASES.get(getattr(item, "originalname", ""))
        params = item.callspec.params if hasattr(item, "callspec") else {}
        ok = want is not None and all(params.get(k) == v for k, v in want.items())
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def providers() -> list[str]:
    names = ["eager", "compile"]
    if HAS_CUDA and triton_can_run(DEVICE):
        names.append("mmfast")
    return names


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second, in GB/s)."""
    n = (256 if HAS_CUDA else 32) * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    reps = 20 if HAS_CUDA else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync()
    seconds = (time.perf_counter() - t0) / reps
    return 2 * src.numel() * 4 / seconds / 1e9


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# A timed round on CUDA is CALLS back-to-back calls and one synchronisation, CALLS chosen so the
# round lasts about ROUND_SECONDS, so the synchronisation's cost (~8 µs on the lent H100) and
# latency are spread over the calls. What remains is each call's host time (Python, dispatch,
# launches), which decides small cases: ``device_us`` in extra_info gives the kernels' time.
ROUND_SECONDS = 2e-3
MAX_CALLS = 64


def _calls_per_round(call: Callable[[], None]) -> int:
    """From the fastest of a few synchronised calls: on the H100 a single timed call sometimes
    took several times the steady-state mean and left rounds of one or two calls."""
    if not HAS_CUDA:
        return 1
    fastest = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        fastest = min(fastest, time.perf_counter() - t0)
    return max(1, min(MAX_CALLS, int(ROUND_SECONDS / max(fastest, 1e-9))))


def run_case(benchmark, fn: Callable, make_inputs: Callable[[], Sequence], mode: str,
             min_bytes: int, rounds: int | None = None, **info) -> None:
    """Time ``fn(*make_inputs())`` in ``mode`` and record bandwidth and memory in extra_info.

    ``make_inputs`` returns fresh inputs (leaf tensors that need grad for the backward modes);
    ``min_bytes`` is the traffic a perfect implementation of this mode must move. Gradients
    are taken with ``torch.autograd.grad`` (nothing accumulates into ``.grad``); the
    ``backward`` mode replays the backward of one forward graph (``retain_graph``), so no
    forward runs inside the timed region. The cotangents (ones) are made once, outside the
    timed region: in training they come from the rest of the graph, and making them per call
    would add to every provider's time a fill of every output (about 0.7 ms at the H100's copy
    rate for the 2.1 GB pooled bank) or a launch per output. Each round's time is divided by its
    number of calls.
    """
    assert mode in MODES, mode
    inputs = make_inputs()
    grad_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def differentiable(outs) -> list[torch.Tensor]:
        """The floating outputs that carry a graph."""
        return [o for o in _as_tuple(outs) if isinstance(o, torch.Tensor) and o.requires_grad]

    if mode == "forward":
        def call():
            with torch.no_grad() if not grad_inputs else torch.enable_grad():
                fn(*inputs)
    else:
        outs = differentiable(fn(*inputs))
        cots = [torch.ones_like(o) for o in outs]
        if mode == "backward":
            def call():
                torch.autograd.grad(outs, grad_inputs, cots, retain_graph=True)
        else:
            del outs                 # only its cotangents' shapes were wanted

            def call():
                torch.autograd.grad(differentiable(fn(*inputs)), grad_inputs, cots)

    calls = _calls_per_round(call)
    count = [0]

    def target():
        call()
        count[0] += 1
        if count[0] % calls == 0:
            sync()

    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rounds = rounds or (50 if HAS_CUDA else 5)
    benchmark.pedantic(target, rounds=rounds, warmup_rounds=3 if HAS_CUDA else 1,
                       iterations=calls)
    if getattr(benchmark, "disabled", False) or benchmark.stats is None:
        return  # --benchmark-disable: a smoke run of every case, nothing measured
    mean = benchmark.stats.stats.mean
    gbs = min_bytes / mean / 1e9
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu", mode=mode,
        min_bytes=min_bytes, achieved_gbs=round(gbs, 2),
        copy_gbs=round(copy_bandwidth_gbs(), 2), copy_ratio=round(gbs / copy_bandwidth_gbs(), 4),
        calls_per_round=calls, **info)
    if HAS_CUDA:
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        device_s = device_seconds_per_call(call)
        benchmark.extra_info.update(device_us=round(device_s * 1e6, 2),
                                    device_copy_ratio=round(min_bytes / device_s / 1e9
                                                            / copy_bandwidth_gbs(), 4))


PROFILED_CALLS = 10


def device_seconds_per_call(call: Callable[[], None]) -> float:
    """GPU time of one call: the summed durations of its kernels and copies as the CUDA
    profiler (CUPTI) records them over PROFILED_CALLS calls. Unlike the wall-clock mean, this
    leaves out the host's launch overhead and the idle gaps it causes, so it shows how close
    the kernels themselves come to the copy bandwidth."""
    from torch.autograd import DeviceType
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            call()
        sync()
    micros = sum(e.time_range.elapsed_us() for e in prof.events()
                 if e.device_type == DeviceType.CUDA)
    return micros * 1e-6 / PROFILED_CALLS


def make_mask(kind: str, B: int, M: int, nonempty: bool = False) -> torch.Tensor:
    """``per-sample``: a seeded random subset per row, bool ``[B, M]`` (with ``nonempty``, each
    row holds at least one modality); ``all-subsets``: every non-empty subset of M, shared by
    all rows as a stride-0 ``[B, 2^M - 1, M]`` bank."""
    if kind == "per-sample":
        g = torch.Generator().manual_seed(B * 100 + M)
        mask = torch.rand(B, M, generator=g) < 0.5
        if nonempty:
            mask[torch.arange(B), torch.randint(M, (B,), generator=g)] = True
        return mask.to(DEVICE)
    bank = all_subsets(M, device=DEVICE)
    return bank.expand(B, *bank.shape)


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)``, cached so each provider compiles once per shape."""
    return torch.compile(fn, dynamic=False)


def provider_fn(provider: str, reference: Callable, public: Callable) -> Callable:
    """The callable a provider times: the reference, its compiled form, or mmfast's op on the
    triton backend."""
    if provider == "eager":
        return reference
    if provider == "compile":
        return compiled(reference)

    def run(*args):
        with mmfast.use_backend("triton"):
            return public(*args)
    return run


@pytest.fixture(params=providers())
def provider(request):
    return request.param


@pytest.fixture(params=MODES)
def mode(request):
    return request.param
