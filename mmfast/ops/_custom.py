"""Shared plumbing for mmfast's custom ops.

Every public op is a ``torch.library`` custom op pair, ``mmfast::<op>`` and
``mmfast::<op>_backward``, each with a fake (meta) implementation, so that code calling them
compiles with ``torch.compile(fullgraph=True)``. The implementation of each picks its backend at
run time (:func:`mmfast.backend.select_kernel`): a Triton launcher from ``mmfast.kernels`` or the
reference. The reference backward is the exact vector-Jacobian product of the reference forward
(``torch.func.vjp``, which works inside a custom op where plain autograd is switched off).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch._C._functorch import TransformType, get_interpreter_stack
from torch.autograd import forward_ad

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

# "mmfast::<op>" -> the callable eager_fast_path made for it (for the tests).
EAGER_PATHS: dict[str, Callable] = {}


def _plain_eager(args: Sequence) -> bool:
    """True when a call may skip the custom-op dispatcher: eager mode, plain tensors on a real
    device, and nothing that must see the op itself (torch.compile, dispatch modes such as fake
    tensors, opcheck and FlopCounterMode, functorch transforms, torch-function modes, the JIT
    tracer)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._get_tracing_state() is not None):       # torch.jit.trace
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS or a.is_meta):
            return False
    return True


def _refuse_forward_mode(op: Callable, args: Sequence) -> None:
    """Raise for forward-mode AD (``torch.func.jvp``, dual tensors of
    ``torch.autograd.forward_ad``): no op has a forward-mode formula, and through a custom op
    ``torch.func.jvp`` would silently give zero tangents."""
    if torch._C._are_functorch_transforms_active():   # tensors wrapped: ask the transforms
        refuse = any(i.key() == TransformType.Jvp for i in (get_interpreter_stack() or ()))
    else:
        refuse = forward_ad._current_level >= 0 and any(
            forward_ad.unpack_dual(a).tangent is not None
            for a in args if isinstance(a, torch.Tensor))
    if refuse:
        raise NotImplementedError(
            f"{getattr(op, '_qualname', op)} has no forward-mode derivative (torch.func.jvp, "
            "torch.autograd.forward_ad); use reverse mode (backward, torch.func.grad/vjp)")


def eager_fast_path(op: Callable, impl: Callable, setup_context: Callable | None = None,
                    backward: Callable | None = None) -> Callable:
    """``op`` (a custom op made from ``impl``), or in plain eager mode ``impl`` itself.

    The custom-op dispatcher costs tens of microseconds a call on the host, more than the
    kernels take at many of mmfast's shapes. In plain eager mode (:func:`_plain_eager`) the
    returned callable runs ``impl`` directly, through a ``torch.autograd.Function`` made of the
    same ``setup_context`` and ``backward`` that are registered as the op's autograd, so both
    paths compute the same values and gradients; everywhere else it calls ``op``. Without
    ``backward`` (the backward ops) ``impl`` is called as is.
    """
    if backward is None:
        # Only with grad mode off, as in an ordinary backward: under create_graph=True the op
        # must run, so that differentiating it again raises (no second-order formula is
        # registered) instead of silently dropping the kernels' second-order terms.
        def call_plain(*args):
            return impl(*args) if not torch.is_grad_enabled() and _plain_eager(args) else op(*args)
        EAGER_PATHS[op._qualname] = call_plain
        return call_plain

    # The ctx-first form: ``apply`` of a Function with a separate setup_context binds its
    # arguments through ``inspect.signature`` on every call, which costs more than it saves.
    def forward(ctx, *args):
        output = impl(*args)   # like the custom op's autograd, absent cotangents become zeros
        setup_context(ctx, args, output)
        return output

    def grads(ctx, *grad_outputs):
        result = backward(ctx, *grad_outputs)
        return result if isinstance(result, tuple) else (result,)

    name = getattr(impl, "__name__", "op").strip("_") or "op"
    function = type(f"{name}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(grads)})

    def call(*args):
        if not eager_ok(op, args):
            return op(*args)
        return function.apply(*args) if torch.is_grad_enabled() else impl(*args)
    EAGER_PATHS[op._qualname] = call
    return call


def eager_ok(op: Callable, args: Sequence) -> bool:
    """Whether a call of ``op`` with ``args`` may run its implementation directly (in a
    ``torch.autograd.Function``) rather than through the custom op; raises for forward-mode
    AD, which no op supports."""
    _refuse_forward_mode(op, args)
    return _plain_eager(args)


_FUNCTORCH_KEYS = tuple(getattr(torch._C.DispatchKey, k) for k in (
    "FuncTorchDynamicLayerBackMode", "FuncTorchDynamicLayerFrontMode", "FuncTorchGradWrapper",
    "FuncTorchBatched", "FuncTorchVmapMode"))


def _functorch_enabled():
    """A guard under which torch.func works inside a custom-op implementation.

    When a TorchDispatchMode is active (FlopCounterMode, opcheck's schema and fake-tensor
    checks), the implementation runs with the functorch dispatch keys excluded, and
    ``torch.func.vjp`` then fails with "Cannot access data pointer of Tensor that doesn't have
    storage". Re-admitting just those keys for the duration of the vjp fixes that.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _FUNCTORCH_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def reference_vjp(fn: Callable, primals: Sequence[torch.Tensor | None],
                  grads: Sequence[torch.Tensor | None], *args) -> list[torch.Tensor | None]:
    """Gradients of ``fn(*primals, *args)`` with respect to the non-None ``primals``.

    ``grads`` are the cotangents of fn's outputs (one tensor, or one per output of a tuple);
    a None cotangent counts as zeros. Returns one entry per primal, None where it was None.
    """
    present = [i for i, p in enumerate(primals) if p is not None]

    def call(*live):
        full = list(primals)
        for i, t in zip(present, live):
            full[i] = t
        return fn(*full, *args)

    with _functorch_enabled():
        outputs, pull = torch.func.vjp(call, *[primals[i] for i in present])
        if isinstance(outputs, tuple):
            cot = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype)
                        for o, g in zip(outputs, grads))
        else:
            g = grads[0]
            cot = torch.zeros_like(outputs) if g is None else g.to(outputs.dtype)
        pulled = pull(cot)
    result: list[torch.Tensor | None] = [None] * len(primals)
    for i, g in zip(present, pulled):
        result[i] = g.contiguous()  # the fake implementations promise contiguous gradients
    return result


def absent(like: torch.Tensor) -> torch.Tensor:
    """Stand-in for the gradient of an absent optional input (custom ops cannot return None)."""
    return like.new_empty(0)


def fresh(t: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """A custom op may not return an alias of its inputs, nor a view (autograd would refuse
    in-place changes to it): copy only when it would."""
    if t._is_view():
        return t.clone()
    for x in inputs:
        if x is not None and t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            return t.clone()
    return t


def define_op(name: str, *, args: str, differentiable: Sequence[int], reference: Callable,
              kernel_module: str, fake_out: Callable, outputs: int = 1) -> Callable:
    """Register ``mmfast::<name>`` and ``mmfast::<name>_backward`` from a reference.

    Args:
        args: the schema's argument list, e.g. ``"Tensor loc, Tensor log_scale, Tensor x, float
            min_scale"``; the op is called positionally in that order.
        differentiable: positions of the tensor arguments that receive gradients; the backward
            op returns one gradient for each, in that order.
        reference: the reference forward, called with all arguments.
        kernel_module: ``mmfast.kernels.<kernel_module>``, whose ``<name>_forward(*args)`` and
            ``<name>_backward(*cotangents, *args)`` (returning the gradients in
            ``differentiable`` order) serve the triton backend.
        fake_out: given the arguments, an empty tensor of the output's shape and dtype (a tuple
            of them when ``outputs > 1``).
        outputs: number of tensor outputs; the backward op takes one optional cotangent each
            (``grad_0, grad_1, ...``; None where an output received no gradient).
    Returns:
        the forward op with autograd registered, behind :func:`eager_fast_path`.
    """
    from mmfast.backend import select_kernel

    out_schema = "Tensor" if outputs == 1 else "(" + ", ".join(["Tensor"] * outputs) + ")"
    fwd_op = torch.library.custom_op(f"mmfast::{name}", mutates_args=(),
                                     schema=f"({args}) -> {out_schema}")

    def forward_impl(*inputs):
        kernel = select_kernel(name, kernel_module, inputs[0].device)
        if kernel is not None:
            return getattr(kernel, f"{name}_forward")(*inputs)
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        result = reference(*inputs)
        if outputs == 1:
            return fresh(result.contiguous(), *tensors)
        return tuple(fresh(r.contiguous(), *tensors) for r in result)

    forward = fwd_op(forward_impl)
    forward.register_fake(fake_out)

    # Custom ops cannot return None: the gradient of an absent optional input travels as an
    # empty tensor and becomes None again in the autograd function.
    single = len(differentiable) == 1   # a one-element tuple return is not a valid schema
    outs = "Tensor" if single else "(" + ", ".join(["Tensor"] * len(differentiable)) + ")"
    cotangents = ", ".join(f"Tensor? grad_{i}" for i in range(outputs))
    bwd_op = torch.library.custom_op(f"mmfast::{name}_backward", mutates_args=(),
                                     schema=f"({cotangents}, {args}) -> {outs}")

    def backward_impl(*grads_and_inputs):
        grads, inputs = grads_and_inputs[:outputs], grads_and_inputs[outputs:]
        kernel = select_kernel(name, kernel_module, inputs[0].device)
        if kernel is not None:
            result = tuple(getattr(kernel, f"{name}_backward")(*grads, *inputs))
            return result[0] if single else result
        primals = [inputs[i] for i in differentiable]

        def f(*live):
            full = list(inputs)
            for i, t in zip(differentiable, live):
                full[i] = t
            return reference(*full)

        result = tuple(absent(inputs[0]) if g is None else g
                       for g in reference_vjp(f, primals, grads))
        return result[0] if single else result

    backward_op = bwd_op(backward_impl)
    backward = eager_fast_path(backward_op, backward_impl)

    @backward_op.register_fake
    def _(*grads_and_inputs):
        inputs = grads_and_inputs[outputs:]
        result = tuple(absent(inputs[0]) if inputs[i] is None else inputs[i].new_empty(inputs[i].shape)
                       for i in differentiable)
        return result[0] if single else result

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in inputs])
        ctx.plain = [None if isinstance(t, torch.Tensor) else t for t in inputs]

    def autograd(ctx, *grads_out):
        inputs = [p if p is not None else t for p, t in zip(ctx.plain, ctx.saved_tensors)]
        grads = backward(*grads_out, *inputs)
        grads = (grads,) if single else grads
        result = [None] * len(inputs)
        for i, g in zip(differentiable, grads):
            result[i] = None if inputs[i] is None else g
        return tuple(result)

    forward.register_autograd(autograd, setup_context=setup_context)
    forward_impl.__name__ = name
    call = eager_fast_path(forward, forward_impl, setup_context, autograd)
    # For eager paths that run several ops under one autograd node (gaussian_terms): the
    # custom op, its implementation, and its backward as the backward op's eager path (the
    # gradients in ``differentiable`` order; empty tensors for absent optional inputs).
    call.op, call.impl, call.backward = forward, forward_impl, backward
    return call
