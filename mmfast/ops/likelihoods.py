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
    """
    op = "categorical_log_prob"
    V.tensor(op, "logits", logits, min_ndim=3, expected="[K, B, *event, C]")
    if not isinstance(target, Tensor) or target.dtype != torch.int64:
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"{op}: target has dtype {got}; expected torch.int64 class indices")
    _check_data(op, "logits", logits, "target", target, tuple(logits.shape[2:-1]))
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
    # A broadcast log_scale reaches the op as a stride-0 view; autograd of expand reduces it.
    return fn(loc, log_scale.expand(loc.shape), x, float(min_scale))


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
