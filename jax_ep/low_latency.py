"""The low-latency ops (decoding): fixed buffers, no host sync, CUDA-graph safe.

Forward-only: differentiating them is a clear error (train with :func:`jax_ep.dispatch`
and :func:`jax_ep.combine`). The split ``*_send``/``*_recv`` forms let XLA schedule
independent work between the halves.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import _compat, validation
from jax_ep.backends import backend_for
from jax_ep.backends.spec import OpSpec
from jax_ep.group import order_chain
from jax_ep.handles import LowLatencyHandle, LowLatencyOut
from jax_ep.high_throughput import check_group_axis


@dataclasses.dataclass(frozen=True)
class LowLatencyTicket:
    """What a ``*_send`` half hands to its ``*_recv`` half (opaque; pass it on unchanged).

    Holding it orders the receive after the send; XLA may schedule other work between
    (but no other op of the same group: their ordering token orders them, see
    :mod:`jax_ep.ordering`).
    """

    payload: Any
    spec: OpSpec = dataclasses.field(metadata=dict(static=True))


jax.tree_util.register_dataclass(LowLatencyTicket)


def _forward_only(op: str):
    """Marks a low-latency send as forward-only: differentiating it fails with a clear message
    (decoding needs no gradients; train with :func:`dispatch`/:func:`combine`)."""

    def wrap(send):
        @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
        def f(spec, *args):
            return send(spec, *args)

        def fwd(spec, *args):
            return send(spec, *args), None

        def bwd(spec, res, ct):
            raise NotImplementedError(
                f"jax_ep.{op} is forward-only (decoding); use jax_ep.dispatch / jax_ep.combine, "
                "which have custom VJPs, for training"
            )

        f.defvjp(fwd, bwd)
        return f

    return wrap


def _forward_op(op: str, method: str):
    """The backend's ``method`` (arguments, then the spec), marked forward-only as ``op``."""

    @_forward_only(op)
    def run(spec, *args):
        return getattr(backend_for(spec), method)(*args, spec)

    return run


_ll_dispatch_send = _forward_op("low_latency_dispatch", "ll_dispatch_send")
_ll_combine_send = _forward_op("low_latency_combine", "ll_combine_send")
_ll_dispatch = _forward_op("low_latency_dispatch", "ll_dispatch")
_ll_combine = _forward_op("low_latency_combine", "ll_combine")


def _receive_token(ticket: LowLatencyTicket):
    """The ordering token a receive half takes (its group is found by the ticket's key)."""
    chain = order_chain(ticket.spec)
    return None if chain is None else chain.take(jax.tree.leaves(ticket.payload)[0])


def _received(ticket: LowLatencyTicket, token) -> None:
    chain = order_chain(ticket.spec)
    if chain is not None:
        chain.put(token)


def _check_ll(x, topk_idx, group, op):
    num_ranks = check_group_axis(group, op)
    t_max = group.num_max_low_latency_tokens_per_rank
    if not jax.export.is_symbolic_dim(x.shape[0]) and x.shape[0] > t_max:
        raise ValueError(
            f"jax_ep.{op}: {x.shape[0]} tokens exceed the group's "
            f"num_max_low_latency_tokens_per_rank={t_max}"
        )
    return num_ranks


def _active(active_ranks, num_ranks):
    if active_ranks is None:
        return jnp.ones((num_ranks,), jnp.int32)
    if active_ranks.shape != (num_ranks,):
        raise ValueError(f"active_ranks must have shape ({num_ranks},), got {active_ranks.shape}")
    return active_ranks.astype(jnp.int32)


def _dispatch_spec(x, topk_idx, group, fp8, round_scale, active_ranks, op: str):
    """The checks of a low-latency dispatch (either form): its spec and operands."""
    validation.check_tokens(x)
    topk_idx, _ = validation.check_routing(topk_idx, None, x.shape[0])
    validation.check_fp8(x.shape[1], fp8)
    num_ranks = _check_ll(x, topk_idx, group, op)
    group.check_fits(x.shape[1], x.dtype, x.shape[0], topk_idx.shape[1], op, low_latency=True)
    t_max = group.num_max_low_latency_tokens_per_rank
    spec = group.spec(
        layout="expert_major",
        capacity=num_ranks * t_max,
        fp8=fp8,
        round_scale=round_scale,
        max_tokens_per_rank=t_max,
    )
    active = _active(active_ranks, num_ranks)
    return (spec, *_compat.match_varying(x, topk_idx, active))


def low_latency_dispatch_send(
    x: jax.Array,
    topk_idx: jax.Array,
    *,
    group,
    fp8: bool = True,
    round_scale: bool = False,
    active_ranks: jax.Array | None = None,
) -> LowLatencyTicket:
    """Send half of :func:`low_latency_dispatch`; finish it with :func:`low_latency_dispatch_recv`.

    At most two sends may be outstanding (the receive buffers are double-buffered).
    """
    spec, x, topk_idx, active = _dispatch_spec(
        x, topk_idx, group, fp8, round_scale, active_ranks, "low_latency_dispatch"
    )
    payload, token = _ll_dispatch_send(spec, x, topk_idx, active, group.take_token(x))
    group.put_token(token)
    return LowLatencyTicket(payload, spec)


def low_latency_dispatch_recv(ticket: LowLatencyTicket) -> LowLatencyOut:
    """Receive half of :func:`low_latency_dispatch`."""
    spec = ticket.spec
    out, token = backend_for(spec).ll_dispatch_recv(ticket.payload, _receive_token(ticket), spec)
    _received(ticket, token)
    ox, oscales, counts, dropped, handle = out
    return LowLatencyOut(ox, oscales, counts, dropped, handle)


def low_latency_dispatch(
    x: jax.Array,
    topk_idx: jax.Array,
    *,
    group,
    fp8: bool = True,
    round_scale: bool = False,
    active_ranks: jax.Array | None = None,
) -> LowLatencyOut:
    """Decode-time dispatch into fixed per-expert buffers (DeepEP low-latency semantics).

    Args:
      x: ``[num_tokens, hidden]`` with
        ``num_tokens <= group.num_max_low_latency_tokens_per_rank``.
      topk_idx: ``[num_tokens, num_topk]`` expert ids, -1 = masked.
      fp8: FP8 payload with per-128-channel float32 scales (quantised in the send).
      active_ranks: ``[R]`` (1 = alive, 0 = failed), the same on every rank: selections
        of failed ranks are dropped and counted, failed sources are not waited for.
    Returns:
      :class:`LowLatencyOut` with ``x`` of shape
      ``[E_loc, R * num_max_low_latency_tokens_per_rank, H]``.
    """
    spec, x, topk_idx, active = _dispatch_spec(
        x, topk_idx, group, fp8, round_scale, active_ranks, "low_latency_dispatch"
    )
    out, token = _ll_dispatch(spec, x, topk_idx, active, group.take_token(x))
    group.put_token(token)
    return LowLatencyOut(*out)


def _check_ll_combine(y, topk_idx, topk_weights, handle, group):
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError("handle must be LowLatencyOut.handle")
    expected = (
        handle.num_experts // handle.num_ranks,
        handle.num_ranks * handle.max_tokens_per_rank,
    )
    if y.ndim != 3 or y.shape[:2] != expected:
        raise ValueError(f"y must have shape {expected + ('hidden',)}, got {y.shape}")
    if y.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise TypeError(f"y must be bf16/f16/f32, got {np.dtype(y.dtype).name}")
    topk_idx, topk_weights = validation.check_routing(topk_idx, topk_weights, None)
    if topk_weights is None:
        raise ValueError("low_latency_combine needs topk_weights")
    check_group_axis(group, "low_latency_combine")
    group.check_fits(
        y.shape[-1],
        y.dtype,
        topk_idx.shape[0],
        topk_idx.shape[1],
        "low_latency_combine",
        low_latency=True,
    )
    return topk_idx, topk_weights


def _combine_spec(y, topk_idx, topk_weights, handle, group):
    """The checks of a low-latency combine (either form): its spec and operands."""
    topk_idx, topk_weights = _check_ll_combine(y, topk_idx, topk_weights, handle, group)
    spec = group.spec(max_tokens_per_rank=handle.max_tokens_per_rank)
    return (spec, *_compat.match_varying(y, topk_idx, topk_weights))


def low_latency_combine_send(
    y: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array, handle: LowLatencyHandle, *, group
) -> LowLatencyTicket:
    """Send half of :func:`low_latency_combine` (expert side pushes its rows home)."""
    spec, y, topk_idx, topk_weights = _combine_spec(y, topk_idx, topk_weights, handle, group)
    payload, token = _ll_combine_send(
        spec, y, handle, topk_idx, topk_weights, group.take_token(topk_idx)
    )
    group.put_token(token)
    return LowLatencyTicket(payload, spec)


def low_latency_combine_recv(
    ticket: LowLatencyTicket, topk_idx: jax.Array, topk_weights: jax.Array, handle: LowLatencyHandle
) -> jax.Array:
    """Receive half of :func:`low_latency_combine`: the weighted sum at the home rank."""
    topk_idx, topk_weights = validation.check_routing(topk_idx, topk_weights, None)
    spec = ticket.spec
    out, token = backend_for(spec).ll_combine_recv(
        ticket.payload, handle, topk_idx, topk_weights, _receive_token(ticket), spec
    )
    _received(ticket, token)
    return out


def low_latency_combine(
    y: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array, handle: LowLatencyHandle, *, group
) -> jax.Array:
    """``out[t] = Σ_k w[t,k] * y[e_k, row(t, e_k)]`` in float32, cast to ``y``'s dtype.

    Args:
      y: ``[E_loc, R*T_max, H]`` expert outputs in the low-latency dispatch layout.
      topk_idx, topk_weights: ``[num_tokens, num_topk]``, the routing given to dispatch.
      handle: ``LowLatencyOut.handle``.
    """
    spec, y, topk_idx, topk_weights = _combine_spec(y, topk_idx, topk_weights, handle, group)
    out, token = _ll_combine(spec, y, handle, topk_idx, topk_weights, group.take_token(topk_idx))
    group.put_token(token)
    return out
