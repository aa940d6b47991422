"""Kernel launches with less host work than Triton's ``kernel[grid](...)``.

At mmfast's common shapes a kernel runs for a few microseconds, so the host's time per launch
decides how fast an op is. Triton's own launch path binds the arguments, specialises every one
of them (a pointer's dtype and 16-byte alignment, whether an integer is 1 or a multiple of 16,
...), builds a cache key from those, looks the compiled kernel up, checks the kernel's globals
and builds launch metadata for the launch hooks: about 15 µs a launch on the CI machine's CPU for
kernels of 20 to 40 arguments, several times the kernel's own duration.

:func:`fast_launch` wraps a ``@triton.jit`` kernel so that ``kernel[grid](*args, **kwargs)``
is keyed on a tuple that is cheaper to build and at least as fine as Triton's specialisation:
the current device, each tensor's dtype and address modulo 16, each float's type (Triton types
every Python float as fp32, whatever its value), and the value of every other argument,
keyword arguments included. The first call with a key goes through Triton (compiling if need
be) and remembers the compiled kernel; later calls hand the arguments straight to that kernel's
launcher, as Triton would. Because the key separates every pair of calls Triton separates, a
remembered kernel is always the one Triton itself would have launched.

Triton's path is taken every time under the interpreter (``TRITON_INTERPRET=1``), while launch
hooks are registered (profilers such as proton read their metadata), and while the kernel has
pre-run hooks.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# A workload with ever-changing integer arguments (batch sizes, strides) would grow a key per
# value: past this many the table is cleared, and the next calls refill it through Triton.
MAX_KEYS = 4096


def _hooks_idle() -> bool:
    """True when no launch hook is registered (Triton's hooks are chains, or None in older
    versions), so the launch metadata they would receive need not be built."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def launch_key(device: int, args: Sequence[Any], kwargs: dict) -> tuple:
    """The cache key of a launch: a refinement of Triton's specialisation of these arguments
    (equal keys imply that Triton compiles and launches the same kernel)."""
    key: list = [device]
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append(a.dtype)
            key.append(a.data_ptr() & 15)
        elif type(a) is float:
            key.append(float)
        else:
            key.append(a)
    key.append(tuple(kwargs.items()))
    return tuple(key)


class FastLauncher:
    """``kernel[grid](*args, **kwargs)`` for a ``@triton.jit`` kernel, remembering compiled
    kernels by :func:`launch_key` (see the module docstring). ``fn`` is the wrapped kernel."""

    def __init__(self, fn: JITFunction):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self._fast = isinstance(fn, JITFunction)    # False for the interpreter's functions
        if self._fast:
            self._names = [p.name for p in fn.params]
            self._defaults = {p.name: p._param.default for p in fn.params}
        self._known: dict[tuple, tuple[Any, tuple[str, ...]]] = {}

    def __getitem__(self, grid: Sequence[int]) -> Callable[..., None]:
        if not self._fast or self.fn.pre_run_hooks or not _hooks_idle():
            return self.fn[grid]
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid: Sequence[int], args: tuple, kwargs: dict) -> None:
        device = driver.active.get_current_device()
        key = launch_key(device, args, kwargs)
        known = self._known.get(key)
        if known is None:
            self._remember(key, self.fn[grid](*args, **kwargs), len(args))
            return
        kernel, tail = known
        bound = args + tuple([kwargs[n] if n in kwargs else self._defaults[n] for n in tail])
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                   driver.active.get_current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *bound)

    def _remember(self, key: tuple, kernel: Any, positional: int) -> None:
        """Keep the kernel Triton launched for ``key``: with the names of the parameters the
        call passed by keyword or left to their defaults, in signature order."""
        if hasattr(kernel, "result"):        # an asynchronous compile's future
            kernel = kernel.result()
        if getattr(kernel, "function", None) is None:
            return      # nothing was launched (a compile-only stand-in): keep Triton's path
        if len(self._known) >= MAX_KEYS:
            self._known.clear()
        self._known[key] = (kernel, tuple(self._names[positional:]))


def fast_launch(fn: JITFunction) -> FastLauncher:
    """Decorator (outside ``@triton.jit``): launch ``fn`` through a :class:`FastLauncher`."""
    return FastLauncher(fn)
