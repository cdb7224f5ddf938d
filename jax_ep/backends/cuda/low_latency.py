"""Low-latency ops of the CUDA backend: the send and receive halves as FFI custom calls
(``xla_ffi/low_latency_handlers.cc``).

Each
send half returns a ticket payload whose ``ticket`` array (``[2]`` int32: the op's
64-bit sequence number, written by the send kernel) the receive half takes as an
operand: XLA runs the receive after the send and may schedule other work between
them, and the receive kernel serves exactly that op (receives of two outstanding sends
may run in either order). The payloads also carry what the receive needs to shape its
outputs (static fields) and the send's small outputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import fp8 as _fp8
from jax_ep.backends.cuda.ffi import batched_like, call
from jax_ep.backends.spec import OpSpec
from jax_ep.handles import LowLatencyHandle
from jax_ep.ordering import TOKEN_SHAPE


@dataclasses.dataclass(frozen=True)
class DispatchTicket:
    """What the dispatch send hands to its receive.

    ticket: ``[2]`` int32, the op's sequence number (lo, hi) written by the send kernel.
    num_dropped: ``[]`` int32 selections not sent because their rank is marked failed.
    active_ranks: ``[R]`` int32 the send used (the receive and the handle need it too).
    hidden, dtype: of the dispatched tokens (shape the receive's outputs).
    """

    ticket: jax.Array
    num_dropped: jax.Array
    active_ranks: jax.Array
    hidden: int = dataclasses.field(metadata=dict(static=True), default=0)
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True), default=np.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class CombineTicket:
    """What the combine send hands to its receive: the ticket and the output row type."""

    ticket: jax.Array
    hidden: int = dataclasses.field(metadata=dict(static=True), default=0)
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True), default=np.dtype(jnp.bfloat16))


jax.tree_util.register_dataclass(DispatchTicket)
jax.tree_util.register_dataclass(CombineTicket)


def ll_dispatch_send(x, topk_idx, active_ranks, token, spec: OpSpec):
    active_ranks = batched_like(active_ranks, topk_idx)
    ticket, num_dropped = call(
        "low_latency_dispatch_send",
        spec,
        [(TOKEN_SHAPE, jnp.int32), ((), jnp.int32)],
        x,
        topk_idx,
        active_ranks,
        token,
        group=spec.group_key,
        num_experts=spec.num_experts,
        fp8=bool(spec.fp8),
        round_scale=bool(spec.round_scale),
    )
    # the ticket (the send's sequence number) is also the group's next ordering token
    return DispatchTicket(ticket, num_dropped, active_ranks, x.shape[1], np.dtype(x.dtype)), ticket


def _dispatch_results(spec: OpSpec, hidden: int, dtype) -> list:
    """Shapes and dtypes of a dispatch receive's outputs (ordering token last)."""
    e_loc, num_ranks = spec.num_local_experts, spec.num_ranks
    rows = num_ranks * spec.max_tokens_per_rank
    return [
        ((e_loc, rows, hidden), _fp8.FP8_DTYPE if spec.fp8 else dtype),
        ((e_loc, rows, hidden // _fp8.GROUP) if spec.fp8 else (0,), jnp.float32),
        ((e_loc,), jnp.int32),
        ((e_loc, rows), jnp.int32),
        ((e_loc, rows), jnp.int32),
        ((e_loc, num_ranks, 2), jnp.int32),
        (TOKEN_SHAPE, jnp.int32),
    ]


def _dispatch_out(spec: OpSpec, received, num_dropped, active_ranks) -> tuple:
    x, scales, counts, src_info, topk_slot, layout_range = received
    handle = LowLatencyHandle(
        src_info,
        topk_slot,
        layout_range,
        counts,
        active_ranks,
        spec.num_experts,
        spec.num_ranks,
        spec.max_tokens_per_rank,
    )
    return x, scales if spec.fp8 else None, counts, num_dropped, handle


def ll_dispatch_recv(payload: DispatchTicket, token, spec: OpSpec):
    # a receive is never dropped as dead code: its send has run, and peers wait for the
    # receive before they reuse the buffer half (docs/protocol.md)
    *received, token = call(
        "low_latency_dispatch_recv",
        spec,
        _dispatch_results(spec, payload.hidden, payload.dtype),
        payload.ticket,
        payload.active_ranks,
        token,
        has_side_effect=True,
        group=spec.group_key,
        num_experts=spec.num_experts,
        fp8=bool(spec.fp8),
    )
    return _dispatch_out(spec, received, payload.num_dropped, payload.active_ranks), token


def ll_dispatch(x, topk_idx, active_ranks, token, spec: OpSpec):
    """Both halves in one custom call (one kernel launch where the group allows it)."""
    active_ranks = batched_like(active_ranks, topk_idx)
    results = _dispatch_results(spec, x.shape[1], np.dtype(x.dtype))
    # never dropped as dead code: peers wait for its receive phase (as ll_dispatch_recv)
    *received, num_dropped, token = call(
        "low_latency_dispatch",
        spec,
        results[:-1] + [((), jnp.int32), results[-1]],
        x,
        topk_idx,
        active_ranks,
        token,
        has_side_effect=True,
        group=spec.group_key,
        num_experts=spec.num_experts,
        fp8=bool(spec.fp8),
        round_scale=bool(spec.round_scale),
    )
    return _dispatch_out(spec, received, num_dropped, active_ranks), token


def ll_combine_send(y, handle: LowLatencyHandle, topk_idx, topk_weights, token, spec: OpSpec):
    (ticket,) = call(
        "low_latency_combine_send",
        spec,
        [(TOKEN_SHAPE, jnp.int32)],
        y,
        handle.recv_src_info,
        handle.recv_topk_slot,
        handle.recv_count,
        handle.active_ranks,
        token,
        group=spec.group_key,
        num_experts=spec.num_experts,
    )
    return CombineTicket(ticket, y.shape[-1], np.dtype(y.dtype)), ticket


def ll_combine_recv(
    payload: CombineTicket, handle: LowLatencyHandle, topk_idx, topk_weights, token, spec: OpSpec
):
    num_tokens = topk_idx.shape[0]
    out, token = call(
        "low_latency_combine_recv",
        spec,
        [((num_tokens, payload.hidden), payload.dtype), (TOKEN_SHAPE, jnp.int32)],
        payload.ticket,
        topk_idx,
        topk_weights,
        handle.active_ranks,
        token,
        has_side_effect=True,
        group=spec.group_key,
        num_experts=spec.num_experts,
    )
    return out, token


def ll_combine(y, handle: LowLatencyHandle, topk_idx, topk_weights, token, spec: OpSpec):
    """Both halves in one custom call (one kernel launch where the group allows it)."""
    out, token = call(
        "low_latency_combine",
        spec,
        [((topk_idx.shape[0], y.shape[-1]), y.dtype), (TOKEN_SHAPE, jnp.int32)],
        y,
        handle.recv_src_info,
        handle.recv_topk_slot,
        handle.recv_count,
        handle.active_ranks,
        topk_idx,
        topk_weights,
        token,
        has_side_effect=True,
        group=spec.group_key,
        num_experts=spec.num_experts,
    )
    return out, token
