"""The CUDA backend: the ops as XLA FFI custom calls into the extension.

Same interface as :mod:`jax_ep._reference_backend`. Every call passes the group
id as an attribute; the handler finds that group's buffers on its device. Under
``jax.vmap`` (loopback groups) the calls use ``vmap_method="expand_dims"``: the
handler sees the virtual-rank axis in front and runs all ranks in one launch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_ep import _compat, _ext
from jax_ep import fp8 as _fp8
from jax_ep._cuda_low_latency import (
    ll_combine_recv,
    ll_combine_send,
    ll_dispatch_recv,
    ll_dispatch_send,
)
from jax_ep._cuda_runtime import register_targets
from jax_ep._spec import OpSpec
from jax_ep.types import DispatchLayout, Handle

__all__ = [
    "layout",
    "dispatch",
    "combine",
    "token_dispatch",
    "token_combine",
    "ll_dispatch_send",
    "ll_dispatch_recv",
    "ll_combine_send",
    "ll_combine_recv",
]

_LAYOUT_KIND = {"per_rank": 0, "expert_major": 1, "ragged": 2}


def target(name: str, spec: OpSpec | None) -> str:
    """FFI target name; ``Config.sync_errors`` selects the synchronising twin."""
    return f"jax_ep_{name}{'_sync' if spec is not None and spec.sync_errors else ''}"


def call(name: str, spec: OpSpec | None, results, *operands, **attrs):
    """``ffi_call`` with operands made to vary alike (arrays built inside shard_map do not)."""
    operands = _compat.match_varying(*operands)
    results = [_compat.result_like(operands[0], shape, dtype) for shape, dtype in results]
    return jax.ffi.ffi_call(target(name, spec), results, vmap_method="expand_dims")(
        *operands, **attrs
    )


@functools.cache
def _init_local_devices() -> None:
    """Loads kernels and error records on every local GPU (the group-less ops use them)."""
    register_targets()
    for d in jax.local_devices():
        if d.platform == "gpu":
            _ext.require().init_device(d.local_hardware_id)


def layout(topk_idx: jax.Array, num_experts: int, num_ranks: int) -> DispatchLayout:
    _init_local_devices()
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
        group_id=0,
        num_experts=num_experts,
        num_ranks=num_ranks,
    )
    return DispatchLayout(per_rank, per_expert, in_rank)


def _dispatch_call(
    x,
    topk_idx,
    topk_weights,
    spec: OpSpec,
    layout: str,
    capacity: int,
    fp8: bool,
    round_scale: bool,
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
    ]
    return call(
        "ht_dispatch",
        spec,
        results,
        x,
        topk_idx,
        topk_weights,
        group_id=spec.group_id,
        layout_kind=_LAYOUT_KIND[layout],
        num_experts=spec.num_experts,
        fp8=int(fp8),
        round_scale=int(round_scale),
    )


def dispatch(x, topk_idx, topk_weights, spec: OpSpec):
    (ox, oscales, oidx, ow, counts, dropped, recv_src, recv_idx, recv_rows, recv_w, num_recv) = (
        _dispatch_call(
            x, topk_idx, topk_weights, spec, spec.layout, spec.capacity, spec.fp8, spec.round_scale
        )
    )
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
    return (
        ox,
        oscales if spec.fp8 else None,
        oidx if per_rank else None,
        ow if per_rank else None,
        counts,
        dropped,
        handle,
    )


def _combine_call(y_rows, handle: Handle, rows, weights, spec: OpSpec):
    num_tokens = handle.num_tokens
    (out,) = call(
        "ht_combine",
        spec,
        [((num_tokens, y_rows.shape[-1]), y_rows.dtype)],
        y_rows,
        handle.recv_src,
        rows,
        weights,
        handle.num_recv,
        handle.topk_idx,
        group_id=spec.group_id,
        num_experts=spec.num_experts,
    )
    return out


# Constant operands are derived from a per-rank operand (not built with jnp.ones):
# under jax.vmap (loopback) a constant would be unbatched, and every operand of a
# loopback call must carry the virtual-rank axis.


def batched_like(a: jax.Array, ref: jax.Array) -> jax.Array:
    """``a`` unchanged, but carrying ``ref``'s virtual-rank axis under ``jax.vmap``."""
    zero = jnp.sum(ref.reshape(-1)[:1].astype(jnp.int32)) * 0
    return a + zero.astype(a.dtype)


def combine(y, handle: Handle, weights, spec: OpSpec):
    y_rows = y.reshape(-1, y.shape[-1])
    if handle.layout == "per_rank":
        weights = (handle.recv_rows >= -1).astype(jnp.float32)  # all ones
    elif weights is None:
        weights = handle.recv_weights
    return _combine_call(y_rows, handle, handle.recv_rows, weights, spec)


def token_dispatch(x, handle: Handle, spec: OpSpec):
    """Cached dispatch of home rows to the received-token list (per_rank, worst-case capacity)."""
    rt = handle.recv_src.shape[0]
    zeros = (handle.topk_idx < -1).astype(jnp.float32)
    return _dispatch_call(x, handle.topk_idx, zeros, spec, "per_rank", rt, False, False)[0]


def token_combine(rows, handle: Handle, spec: OpSpec):
    rt = handle.recv_src.shape[0]
    index = jnp.arange(rt, dtype=jnp.int32)
    own_rows = jnp.where(index < handle.num_recv, index, -1)[:, None]
    weights = (own_rows >= -1).astype(jnp.float32)
    return _combine_call(rows, handle, own_rows, weights, spec)
