"""Observation log-likelihoods summed over each sample's event: bernoulli, categorical,
normal and Laplace. Parameters ``[K, B, *event]`` (K decoded latent samples), data
``[B, *event]``; results ``[K, B]`` in float32 (float64 for float64 inputs)."""
from __future__ import annotations

import torch
from torch import Tensor

from mmfast.ops import _validate as V
from mmfast.ops import reference as ref
from mmfast.ops._custom import define_op
from mmfast.ops.reference._common import acc_dtype


def _kb(params: Tensor) -> Tensor:
    return params.new_empty(params.shape[:2], dtype=acc_dtype(params.dtype))


_bernoulli = define_op(
    "bernoulli_log_prob", args="Tensor logits, Tensor x", differentiable=(0, 1),
    reference=ref.bernoulli_log_prob, kernel_module="likelihoods",
    fake_out=lambda logits, x: _kb(logits))
_categorical = define_op(
    "categorical_log_prob", args="Tensor logits, Tensor target", differentiable=(0,),
    reference=ref.categorical_log_prob, kernel_module="likelihoods",
    fake_out=lambda logits, target: _kb(logits))
_scale_args = "Tensor loc, Tensor log_scale, Tensor x, float min_scale"
_normal = define_op(
    "normal_log_prob", args=_scale_args, differentiable=(0, 1, 2),
    reference=ref.normal_log_prob, kernel_module="likelihoods",
    fake_out=lambda loc, log_scale, x, min_scale: _kb(loc))
_laplace = define_op(
    "laplace_log_prob", args=_scale_args, differentiable=(0, 1, 2),
    reference=ref.laplace_log_prob, kernel_module="likelihoods",
    fake_out=lambda loc, log_scale, x, min_scale: _kb(loc))


def _check_data(op: str, pname: str, params: Tensor, dname: str, data: Tensor,
                event_of_params: tuple[int, ...]) -> None:
    V.tensor(op, pname, params, min_ndim=2, expected="[K, B, *event]")
    expected = (params.shape[1], *event_of_params)
    V.same_shape(op, dname, data, expected, f"{list(expected)} ([B, *event] of {pname})")
    V.same_device(op, **{pname: params, dname: data})


def bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """``Σ_event x·logits − softplus(logits)``.

    Args: logits ``[K, B, *event]``; x ``[B, *event]`` with values in [0, 1].
    Returns: ``[K, B]``.
    """
    op = "bernoulli_log_prob"
    _check_data(op, "logits", logits, "x", x, tuple(logits.shape[2:]))
    V.tensor(op, "x", x)
    V.same_dtype(op, logits=logits, x=x)
    return _bernoulli(logits, x)


def categorical_log_prob(logits: Tensor, target: Tensor) -> Tensor:
    """``Σ_event log softmax(logits)[target]`` (a class index at every event position).

    Args: logits ``[K, B, *event, C]``; target int64 ``[B, *event]`` with values in [0, C).
    Returns: ``[K, B]``.

    A class index outside [0, C) raises ValueError when target is on the CPU. On a GPU the
    values are not checked, because reading them back would synchronise the device on every
    call (a training step would wait for its GPU work here): a row with such an index gives NaN
    on every backend. Validate class indices once, where the data is made.
    """
    op = "categorical_log_prob"
    V.tensor(op, "logits", logits, min_ndim=3, expected="[K, B, *event, C]")
    if not isinstance(target, Tensor) or target.dtype != torch.int64:
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"{op}: target has dtype {got}; expected torch.int64 class indices")
    _check_data(op, "logits", logits, "target", target, tuple(logits.shape[2:-1]))
    if target.numel() and target.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = torch.aminmax(target)
        if low.item() < 0 or high.item() >= logits.shape[-1]:
            raise ValueError(f"{op}: target has class indices in [{low.item()}, {high.item()}]; "
                             f"expected values in [0, {logits.shape[-1]}) (C = logits.shape[-1])")
    return _categorical(logits, target)


def _location_scale(op: str, fn, loc: Tensor, log_scale, x: Tensor, min_scale: float) -> Tensor:
    _check_data(op, "loc", loc, "x", x, tuple(loc.shape[2:]))
    V.tensor(op, "x", x)
    if not isinstance(log_scale, Tensor):
        log_scale = torch.as_tensor(float(log_scale), dtype=loc.dtype, device=loc.device)
    V.tensor(op, "log_scale", log_scale)
    V.broadcastable(op, "log_scale", log_scale, loc.shape, "loc")
    V.same_dtype(op, loc=loc, log_scale=log_scale, x=x)
    V.same_device(op, loc=loc, log_scale=log_scale, x=x)
    if not min_scale >= 0.0:
        raise ValueError(f"{op}: min_scale must be >= 0, got {min_scale!r}")
    return fn(loc, _canonical_scale(log_scale, loc), x, float(min_scale))


def _canonical_scale(log_scale: Tensor, loc: Tensor) -> Tensor:
    """``log_scale`` broadcastable to loc ``[K, B, *event]`` -> ``[Ks, Bs, *event]`` with Ks in
    {1, K} and Bs in {1, B}.

    The K and B axes stay unexpanded, so a scale shared over samples (learned per dimension, or
    fixed) gets its gradient reduced inside the kernel instead of as a ``[K, B, *event]`` tensor;
    only a scale broadcast within the event (per channel, say) is expanded over the event, which
    costs ``Ks·Bs·N`` elements. Autograd of the reshape/expand sums back to the caller's shape.
    """
    padded = log_scale.reshape((1,) * (loc.ndim - log_scale.ndim) + tuple(log_scale.shape))
    canonical = padded.expand(*padded.shape[:2], *loc.shape[2:])
    if tuple(padded.shape[2:]) != tuple(loc.shape[2:]):
        canonical = canonical.contiguous()
    return canonical


def normal_log_prob(loc: Tensor, log_scale, x: Tensor, min_scale: float = 0.0) -> Tensor:
    """``Σ_event log N(x; loc, scale²)``, ``scale = min_scale + exp(log_scale)``.

    Args: loc ``[K, B, *event]``; log_scale a tensor broadcastable to loc (or a float);
    x ``[B, *event]``.
    Returns: ``[K, B]``.
    """
    return _location_scale("normal_log_prob", _normal, loc, log_scale, x, min_scale)


def laplace_log_prob(loc: Tensor, log_scale, x: Tensor, min_scale: float = 0.0) -> Tensor:
    """``Σ_event log Laplace(x; loc, scale)``, ``scale = min_scale + exp(log_scale)``.

    Args: loc ``[K, B, *event]``; log_scale broadcastable to loc (or a float); x ``[B, *event]``.
    Returns: ``[K, B]``.
    """
    return _location_scale("laplace_log_prob", _laplace, loc, log_scale, x, min_scale)
