"""Check kernels/_launch.py against Triton itself on a machine without a GPU.

Run as a script in a fresh interpreter (``TRITON_INTERPRET`` unset, so kernels are real JIT
functions), with the target-only driver of ``_compile_sm90.py``:

    python tests/_launch_check.py

1. **Keys.** The public ops run forward and backward, and every launch they make is recorded
   (nothing is compiled). For each recorded launch, variants are made by changing one argument
   at a time: integers to values Triton treats differently (1, multiples of 16, odd, past 32
   and 64 bits, negative), tensors to another 16-byte aligned tensor, to one off that
   alignment and to another dtype, floats to other values, booleans flipped or made ints, and
   each keyword argument (constexprs, num_warps) to other values. Wherever two of these calls get the same :func:`launch_key`,
   Triton's own cache key (its specialisation of the arguments plus the options) must be the
   same too: the fast path must never reuse a kernel Triton would not have used.
2. **Launches.** Every op is compiled for sm_90 with its launchers replaced by recorders, and
   run three times, so its kernels are launched from the fast path. Each fast-path launch is
   repeated through Triton's own path (with the launches' COMPILE_OPTIONS), and both must
   hand the launcher the same grid (one, two and three dimensions), stream, kernel and
   arguments (launch metadata and hooks aside:
   Triton's hook chains are empty, and the fast path passes None for them). While a launch
   hook or a pre-run hook is registered, or TRITON_DEBUG is on, launches must go through
   Triton.

Prints ``launch check: ...`` and exits 1 on any mismatch.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime import jit  # noqa: E402

import _compile_sm90 as sm90  # noqa: E402  (the target-only driver; imports mmfast)

sm90.target_only()

import mmfast.backend  # noqa: E402
from mmfast.kernels import _launch  # noqa: E402

INT_VARIANTS = (1, 2, 16, 17, 32, 48, 2 ** 31 - 16, 2 ** 31, 2 ** 33 + 16, 2 ** 63 + 16, -16,
                -1, 0)


def _ops():
    """(name, thunk): each runs one public op forward and backward on small CPU tensors."""
    from mmfast import ops
    from mmfast.subsets import all_subsets

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(shape).to(dtype).requires_grad_(True)

    def backward(*outs):
        outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    # Sizes past one block of features (D, N = 600) and two heads give grids of two and three
    # dimensions with more than one program along each.
    bank = all_subsets(3).expand(4, 7, 3)
    mask = torch.tensor([[True, False, True]] * 4)
    return [
        ("pool", lambda: backward(ops.subset_sum_pool(leaf(4, 3, 600), bank))),
        ("poe", lambda: backward(*ops.gaussian_poe(leaf(4, 3, 600), leaf(4, 3, 600), mask))),
        ("attention", lambda: backward(ops.subset_attention(
            leaf(4, 3, 32), leaf(4, 3, 32), leaf(4, 3, 32), bank, 2))),
        ("laplace", lambda: backward(ops.laplace_log_prob(
            leaf(2, 4, 600), leaf(600), torch.rand(4, 600), 1e-3))),
        ("categorical", lambda: backward(ops.categorical_log_prob(
            leaf(2, 4, 3, 11), torch.randint(11, (4, 3))))),
        ("terms", lambda: backward(*[t for t in ops.gaussian_terms(
            (leaf(4, 8), leaf(4, 8)), leaf(2, 4, 8), (leaf(4, 8), leaf(4, 8)), leaf(2, 4, 8),
            prior=(leaf(3), leaf(3, 8), leaf(3, 8)), stl=False) if t is not None])),
        ("densities", lambda: backward(ops.gaussian_log_prob(leaf(2, 4, 8), leaf(4, 8),
                                                             leaf(4, 8)))),
        ("iwae", lambda: backward(ops.importance_logsumexp(leaf(5, 4)))),
    ]


class _KeyComputed(Exception):
    pass


def triton_key(fn, args, kwargs):
    """Triton's cache key for launching ``fn`` with these arguments: its own run(), stopped
    where it looks the key up."""
    captured = []
    original = jit.compute_cache_key

    def spy(*key_args):
        captured.append(original(*key_args))
        raise _KeyComputed
    jit.compute_cache_key = spy
    try:
        fn.run(*args, grid=(1,), warmup=True, **kwargs)
    except _KeyComputed:
        pass
    finally:
        jit.compute_cache_key = original
    return captured[0]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's dtype whose address is not a multiple of 16 bytes (the keys read
    nothing else of a tensor)."""
    base = torch.empty(32, dtype=t.dtype)
    step = 1
    while (base.data_ptr() + step * t.element_size()) % 16 == 0:
        step += 1
    return base[step:]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """A fresh tensor of t's dtype at another 16-byte aligned address."""
    return torch.empty(32, dtype=t.dtype)


def _variants(args):
    """Positional arguments with one of them changed."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            other = torch.float64 if a.dtype != torch.float64 else torch.float32
            options = [_misaligned(a), _aligned(a), torch.empty(32, dtype=other)]
        elif isinstance(a, bool):
            options = [not a, int(a)]
        elif isinstance(a, int):
            options = [v for v in INT_VARIANTS if v != a]
        elif isinstance(a, float):
            options = [0.0, 1.0, -2.5, 1e30]
        else:
            options = []
        for value in options:
            yield args[:i] + (value,) + args[i + 1:]


def _kwarg_variants(kwargs):
    """Keyword arguments (constexprs, options) with one of them changed."""
    for name, a in kwargs.items():
        if isinstance(a, bool):
            options = [not a]
        elif isinstance(a, int):
            options = [2 * a, a + 1]
        elif isinstance(a, tl.dtype):
            options = [tl.float64 if a != tl.float64 else tl.float32]
        elif isinstance(a, str):
            options = [a + "x"]
        else:
            options = []
        for value in options:
            yield dict(kwargs, **{name: value})


def check_keys() -> tuple[int, list[str]]:
    """Part 1: returns (pairs compared, failures)."""
    launches = []

    def record(self, grid, args, kwargs):
        launches.append((self, args, kwargs))
    fast = _launch.FastLauncher._launch
    _launch.FastLauncher._launch = record
    try:
        for _, thunk in _ops():
            thunk()
    finally:
        _launch.FastLauncher._launch = fast
    compared, failures = 0, []
    for launcher, args, kwargs in launches:
        calls = [(args, kwargs), *[(v, kwargs) for v in _variants(args)],
                 *[(args, kw) for kw in _kwarg_variants(kwargs)]]
        by_key: dict[tuple, tuple] = {}
        for call, kw in calls:
            ours = _launch.launch_key(0, call, kw)
            theirs = triton_key(launcher.fn, call, _launch.with_options(kw))
            if ours in by_key:
                compared += 1
                if by_key[ours] != theirs:
                    failures.append(f"{launcher.__name__}: equal launch_key, different Triton keys "
                                    f"for arguments {call}, {kw}")
            else:
                by_key[ours] = theirs
    return compared, failures


def check_launches() -> tuple[int, list[str]]:
    """Part 2: returns (fast-path launches compared, failures)."""
    recorded = []
    sm90.record_launches(recorded.append)

    fast = _launch.FastLauncher._launch
    compared, failures = [0], []

    def launch_twice(self, grid, args, kwargs):
        hit = _launch.launch_key(driver.active.get_current_device(), args, kwargs) in self._known
        start = len(recorded)
        fast(self, grid, args, kwargs)
        if not hit:
            return
        # Triton's own path, with the same arguments and the options every launch adds
        self.fn[grid](*args, **_launch.with_options(kwargs))
        if len(recorded) != start + 2:
            failures.append(f"{self.__name__}: {len(recorded) - start} launches recorded, not 2")
            return
        ours, theirs = recorded[start], recorded[start + 1]
        same = (len(ours) == len(theirs) and ours[:6] == theirs[:6]
                and all(a is b or (type(a) is type(b) and a == b)
                        and not isinstance(a, torch.Tensor)
                        for a, b in zip(ours[9:], theirs[9:])))
        if not same or ours[6:9] != (None, None, None):
            failures.append(f"{self.__name__}: fast path passed {ours[:9]} + {ours[9:]}, "
                            f"Triton passed {theirs[:6]} + {theirs[9:]}")
        compared[0] += 1
    _launch.FastLauncher._launch = launch_twice
    try:
        with mmfast.backend.use_backend("triton"):
            for _, thunk in _ops():
                for _ in range(3):
                    thunk()
    finally:
        _launch.FastLauncher._launch = fast
    failures += _check_fallbacks(recorded)
    return compared[0], failures


def _check_fallbacks(recorded) -> list[str]:
    """While a launch hook or a pre-run hook is registered, or TRITON_DEBUG is on, every launch
    goes through Triton (which hands the launcher its hook chain); otherwise none does."""
    from mmfast.kernels import subset_pool
    pool = dict(_ops())["pool"]
    kernels = (subset_pool._pool_forward_kernel, subset_pool._pool_backward_kernel)
    pre_run_calls = []

    def hook(*args, **kwargs):
        pre_run_calls.append(1)

    def set_launch_hook(on):
        (knobs.runtime.launch_enter_hook.add if on else knobs.runtime.launch_enter_hook.remove)(
            hook)

    def set_pre_run_hook(on):
        for k in kernels:
            k.fn.add_pre_run_hook(hook) if on else k.fn.pre_run_hooks.remove(hook)

    def set_debug(on):
        knobs.runtime.debug = on

    failures = []
    with mmfast.backend.use_backend("triton"):
        for name, switch in (("launch hook", set_launch_hook), ("pre-run hook", set_pre_run_hook),
                             ("TRITON_DEBUG", set_debug), (None, None)):
            if switch is not None:
                switch(True)
            start = len(recorded)
            try:
                pool()
            finally:
                if switch is not None:
                    switch(False)
            calls = recorded[start:]
            through_triton = [call[7] is not None for call in calls]
            if len(calls) != 2 or through_triton != [name is not None] * 2:
                failures.append(f"with {name or 'nothing'} registered, {len(calls)} launches, "
                                f"through Triton: {through_triton}")
    if len(pre_run_calls) != 2:
        failures.append(f"pre-run hook called {len(pre_run_calls)} times, not 2")
    return failures


def main() -> int:
    with mmfast.backend.use_backend("triton"):
        pairs, failures = check_keys()
    launches, more = check_launches()
    failures += more
    for failure in failures:
        print("FAILED", failure)
    print(f"launch check: {pairs} argument variants shared a key with another call, "
          f"{launches} fast-path launches compared with Triton's; {len(failures)} failure(s)")
    return 1 if failures or not pairs or not launches else 0


if __name__ == "__main__":
    sys.exit(main())
