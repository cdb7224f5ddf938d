"""High-throughput ops of the CUDA backend: dispatch, combine and the cached token
exchanges of the backward pass, as FFI custom calls (``xla_ffi/high_throughput_handlers.cc``).

Every group op names its group by key (the executable binds to it once) and takes
and returns the group's ordering token (:mod:`jax_ep.ordering`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import fp8 as _fp8
from jax_ep.backends.cuda import extension
from jax_ep.backends.cuda.ffi import batched_like, call, init_local_devices
from jax_ep.backends.spec import OpSpec
from jax_ep.handles import DispatchLayout, Handle
from jax_ep.ordering import TOKEN_SHAPE

_TOKEN = (TOKEN_SHAPE, jnp.int32)


def layout(topk_idx: jax.Array, num_experts: int, num_ranks: int) -> DispatchLayout:
    init_local_devices()
    num_tokens = topk_idx.shape[0]
    per_rank, per_expert, in_rank = call(
        "dispatch_layout",
        None,
        [
            ((num_ranks,), jnp.int32),
            ((num_experts,), jnp.int32),
            ((num_tokens, num_ranks), jnp.bool_),
        ],
        topk_idx,
        num_experts=num_experts,
        num_ranks=num_ranks,
    )
    return DispatchLayout(per_rank, per_expert, in_rank)


def _dispatch_call(
    x, topk_idx, topk_weights, token, spec: OpSpec, layout, capacity, fp8, round_scale
):
    num_tokens, hidden = x.shape
    num_topk = topk_idx.shape[1]
    e_loc = spec.num_local_experts
    rt = spec.num_ranks * num_tokens
    per_rank = layout == "per_rank"
    rows_shape = (e_loc, capacity) if layout == "expert_major" else (capacity,)
    out_dtype = _fp8.FP8_DTYPE if fp8 else x.dtype
    results = [
        (rows_shape + (hidden,), out_dtype),
        (rows_shape + (hidden // _fp8.GROUP,) if fp8 else (0,), jnp.float32),
        ((capacity, num_topk) if per_rank else (0,), jnp.int32),
        ((capacity, num_topk) if per_rank else (0,), jnp.float32),
        ((() if per_rank else (e_loc,)), jnp.int32),
        ((), jnp.int32),
        ((rt,), jnp.int32),
        ((rt, num_topk), jnp.int32),
        ((rt, 1 if per_rank else num_topk), jnp.int32),
        ((rt, num_topk), jnp.float32),
        ((), jnp.int32),
        _TOKEN,
    ]
    return call(
        "high_throughput_dispatch",
        spec,
        results,
        x,
        topk_idx,
        topk_weights,
        token,
        group=spec.group_key,
        num_experts=spec.num_experts,
        layout=np.int32(extension.layout_id(layout)),
        fp8=bool(fp8),
        round_scale=bool(round_scale),
    )


def dispatch(x, topk_idx, topk_weights, token, spec: OpSpec):
    results = _dispatch_call(
        x,
        topk_idx,
        topk_weights,
        token,
        spec,
        spec.layout,
        spec.capacity,
        spec.fp8,
        spec.round_scale,
    )
    (
        ox,
        oscales,
        oidx,
        ow,
        counts,
        dropped,
        recv_src,
        recv_idx,
        recv_rows,
        recv_w,
        num_recv,
        token,
    ) = results
    per_rank = spec.layout == "per_rank"
    handle = Handle(
        topk_idx,
        recv_src,
        recv_idx,
        recv_rows,
        recv_w,
        num_recv,
        spec.layout,
        spec.num_experts,
        spec.num_ranks,
        spec.capacity,
    )
    out = (
        ox,
        oscales if spec.fp8 else None,
        oidx if per_rank else None,
        ow if per_rank else None,
        counts,
        dropped,
        handle,
    )
    return out, token


def _combine_call(y_rows, handle: Handle, rows, weights, extra, token, spec: OpSpec):
    """One exchange: the rows reduced home, and ``extra`` columns (or none) with them."""
    num_tokens, rt = handle.num_tokens, handle.recv_src.shape[0]
    # no extra columns: an empty operand, batched like the others under a loopback group's
    # vmap (a slice of a per-rank array is not enough: with symbolic shapes jax replaces an
    # empty slice by an unbatched constant)
    carried = extra if extra is not None else batched_like(jnp.zeros((rt, 0), jnp.float32), rows)
    out, out_extra, token = call(
        "high_throughput_combine",
        spec,
        [
            ((num_tokens, y_rows.shape[-1]), y_rows.dtype),
            ((num_tokens, carried.shape[1]), jnp.float32),
            _TOKEN,
        ],
        y_rows,
        handle.recv_src,
        rows,
        weights,
        handle.num_recv,
        handle.topk_idx,
        carried,
        token,
        group=spec.group_key,
        num_experts=spec.num_experts,
    )
    return (out, out_extra if extra is not None else None), token


def combine(y, handle: Handle, weights, token, spec: OpSpec, extra=None):
    y_rows = y.reshape(-1, y.shape[-1])
    if handle.layout == "per_rank":
        weights = (handle.recv_rows >= -1).astype(jnp.float32)  # all ones
    elif weights is None:
        weights = handle.recv_weights
    return _combine_call(y_rows, handle, handle.recv_rows, weights, extra, token, spec)


def token_dispatch(x, handle: Handle, token, spec: OpSpec):
    """Home rows ``[T, C]`` to the received-token list ``[R*T, C]``: a cached dispatch
    that reuses the forward's handle (no routing pass), zeros past the received tokens."""
    rt = handle.recv_src.shape[0]
    return call(
        "high_throughput_cached_dispatch",
        spec,
        [((rt, x.shape[-1]), x.dtype), _TOKEN],
        x,
        handle.topk_idx,
        handle.recv_src,
        token,
        group=spec.group_key,
        num_experts=spec.num_experts,
    )


def token_combine(rows, handle: Handle, token, spec: OpSpec, extra=None):
    rt = handle.recv_src.shape[0]
    index = jnp.arange(rt, dtype=jnp.int32)
    own_rows = jnp.where(index < handle.num_recv, index, -1)[:, None]
    weights = (own_rows >= -1).astype(jnp.float32)
    return _combine_call(rows, handle, own_rows, weights, extra, token, spec)
