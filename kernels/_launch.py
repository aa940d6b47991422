"""Kernel launches with less host work than Triton's ``kernel[grid](...)``.

At mmfast's common shapes a kernel runs for a few microseconds, so the host's time per launch
decides how fast an op is. Triton's own launch path binds the arguments, specialises every one
of them (a pointer's dtype and 16-byte alignment, whether an integer is 1 or a multiple of 16,
...), builds a cache key from those, looks the compiled kernel up, checks the kernel's globals
and builds launch metadata for the launch hooks: about 15 µs a launch on the CI machine's CPU for
kernels of 20 to 40 arguments, several times the kernel's own duration.

:func:`fast_launch` wraps a ``@triton.jit`` kernel so that ``kernel[grid](*args, **kwargs)``
is keyed on a tuple (:func:`launch_key`) that is cheaper to build and at least as fine as
Triton's specialisation: the current device, each tensor's dtype and address modulo 16, each
float's type (Triton types every Python float argument as fp32, whatever its value), each
bool's type and value, and the value of every other argument, keyword arguments (constexprs
and options such as ``num_warps``) included. The first call with a key goes through Triton
(compiling if need be) and remembers the compiled kernel; later calls hand the arguments
straight to that kernel's launcher, as Triton would, so a remembered kernel is the one Triton
itself would launch.

Triton's path is taken every time under the interpreter (``TRITON_INTERPRET=1``), for a
callable grid, while Triton's run-time compile settings differ from their defaults
(``TRITON_DEBUG``, an instrumentation mode, a pipeline-inspection hook: they change the
compiled kernel without changing the arguments), while launch hooks are registered (profilers
such as proton read their metadata), and while the kernel has pre-run hooks. A kernel is not
remembered when a tensor is passed by keyword or a constexpr positionally (no mmfast launch
does either), and it is forgotten when Triton's own cache for the device is replaced.

Every launch, on either path, passes :data:`COMPILE_OPTIONS`: the kernels are written, tested
and counted (sm_90 instruction counts in their docstrings) with floating-point contraction
(``a * b + c`` as one FMA), which Triton 3.9 enables by default with a warning that 3.10 will
disable it. Pinning it keeps the compiled code the same across Triton versions whatever
``TRITON_DEFAULT_FP_FUSION`` says; ``TRITON_FORCE_DISABLE_FP_FUSION=1`` still turns it off.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# Every distinct integer argument (a batch size, a stride) makes a key. Past this many keys per
# kernel the oldest is dropped, so a workload of ever-changing shapes holds bounded memory.
MAX_KEYS = 1024

# Compile options of every mmfast launch (keyword arguments of ``kernel[grid](...)``; the
# interpreter ignores them). A launch's own keyword arguments take precedence.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def with_options(kwargs: dict) -> dict:
    """A launch's keyword arguments with :data:`COMPILE_OPTIONS` (its own take precedence)."""
    return {**COMPILE_OPTIONS, **kwargs}


def _triton_path_only() -> bool:
    """True while a launch must go through Triton: a launch hook is registered (Triton's hooks
    are chains, None in older versions), or a run-time compile setting is not its default."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return bool(knobs.runtime.debug or knobs.compilation.instrumentation_mode
                or getattr(knobs.runtime, "add_stages_inspection_hook", None) is not None)


def launch_key(device: int, args: Sequence[Any], kwargs: dict) -> tuple:
    """The cache key of a launch with positional ``args`` (none of them a constexpr): a
    refinement of Triton's specialisation of these arguments, so equal keys imply that Triton
    would compile and launch the same kernel."""
    key: list = [device]
    for a in args:
        kind = type(a)
        if kind is int:
            key.append(a)
        elif kind is float:
            key.append(float)
        elif kind is bool:          # Triton types True as u1, the int 1 as a constexpr
            key.append((bool, a))
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() & 15))
        else:
            key.append(a)
    key.append(tuple(kwargs.items()))
    return tuple(key)


class FastLauncher:
    """``kernel[grid](*args, **kwargs)`` for a ``@triton.jit`` kernel ``fn``, remembering
    compiled kernels by :func:`launch_key` (see the module docstring). Other attributes are
    ``fn``'s."""

    def __init__(self, fn: JITFunction):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)
        self._fast = isinstance(fn, JITFunction)    # False for the interpreter's functions
        if self._fast:
            self._names = [p.name for p in fn.params]
            self._defaults = {p.name: p.default for p in fn.params}
            self._first_constexpr = next(
                (i for i, p in enumerate(fn.params) if p.is_constexpr), len(fn.params))
        # key -> (compiled kernel, names of the parameters after the positional ones, the
        # Triton cache that held it)
        self._known: dict[tuple, tuple[Any, tuple[str, ...], dict]] = {}

    def __getattr__(self, name: str):
        fn = self.__dict__.get("fn")
        if fn is None:
            raise AttributeError(name)
        return getattr(fn, name)

    def __repr__(self) -> str:
        return f"FastLauncher({self.fn!r})"

    def __getitem__(self, grid) -> Callable[..., None]:
        if not self._fast:
            return self.fn[grid]
        if callable(grid) or self.fn.pre_run_hooks or _triton_path_only():
            launch = self.fn[grid]
            return lambda *args, **kwargs: launch(*args, **with_options(kwargs))
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid: Sequence[int], args: tuple, kwargs: dict) -> None:
        device = driver.active.get_current_device()
        key = launch_key(device, args, kwargs)
        known = self._known.get(key)
        if known is not None:
            kernel, tail, cache = known
            caches = self.fn.device_caches.get(device)
            if caches is not None and caches[0] is cache:
                bound = args + tuple([kwargs[n] if n in kwargs else self._defaults[n]
                                      for n in tail])
                kernel.run(grid[0], grid[1] if len(grid) > 1 else 1,
                           grid[2] if len(grid) > 2 else 1,
                           driver.active.get_current_stream(device), kernel.function,
                           kernel.packed_metadata, None, None, None, *bound)
                return
            del self._known[key]          # Triton's cache was replaced: ask it again
        # The options join the call here, not the key: a remembered launch skips the merge.
        self._remember(key, self.fn[grid](*args, **with_options(kwargs)), args, kwargs, device)

    def _remember(self, key: tuple, kernel: Any, args: tuple, kwargs: dict, device: int) -> None:
        """Keep the kernel Triton launched for ``key``, with the names of the parameters the
        call passed by keyword or left to their defaults, in signature order."""
        if hasattr(kernel, "result"):        # an asynchronous compile's future
            kernel = kernel.result()
        if getattr(kernel, "function", None) is None:
            return      # nothing was launched (a compile-only stand-in): keep Triton's path
        if len(args) > self._first_constexpr or any(
                isinstance(v, torch.Tensor) for v in kwargs.values()):
            return      # outside what launch_key refines: keep Triton's path
        while len(self._known) >= MAX_KEYS:
            del self._known[next(iter(self._known))]     # the oldest first
        self._known[key] = (kernel, tuple(self._names[len(args):]),
                            self.fn.device_caches[device][0])


def fast_launch(fn: JITFunction) -> FastLauncher:
    """Decorator (outside ``@triton.jit``): launch ``fn`` through a :class:`FastLauncher`."""
    return FastLauncher(fn)
