"""The reference backend: every jax_ep op in plain JAX, built on ``all_to_all``.

This module *is* the specification. The CUDA kernels are tested against it:
bit for bit for dispatch (BF16 payloads, counts, layouts, handles), within a
stated tolerance for FP8 and for reductions. It also runs the ops on CPU, TPU
and GPUs without the extension.

Every function runs per EP rank inside a context that binds ``axis_name``
(``shard_map`` over the EP mesh axis, or ``vmap(..., axis_name=...)``).

Contract, written as plain-JAX pseudo-code for one rank ``me`` of ``R``:

* ``local(e) = e - me * E_loc`` if expert ``e`` lives here, else -1.
* Received tokens: pairs ``(s, t)`` such that ``any(local(topk_idx_s[t]) >= 0)``,
  in ascending ``s * T + t``; ``recv_src[i] = s * T + t``.
* ``per_rank``: row ``i`` of the output is received token ``i``; rows ``>= capacity``
  are dropped.
* ``expert_major`` / ``ragged``: one row per (received token, distinct local expert).
  ``slot(i, e)`` = number of received tokens before ``i`` that selected ``e``.
  expert_major row = ``e * capacity + slot`` (dropped if ``slot >= capacity``);
  ragged row = ``offset[e] + slot`` with ``offset`` the exclusive cumsum of the
  per-expert counts (dropped if the row is ``>= capacity``).
* ``combine``: on the expert side, per received token ``i`` in float32 and k order,
  ``p_i = Σ_k w[i,k] * y[row(i,k)]`` over the k whose row exists, cast to ``y``'s dtype;
  on the home side ``out[t] = Σ_{ranks d ascending, t sent to d} p_d(t)`` in float32,
  cast to ``y``'s dtype. per_rank uses ``w = 1`` and one row per token.
* FP8: tokens are quantised once at the source (:mod:`jax_ep.fp8`).
* Rows of the dispatch payload (``x``, ``scales``) past the valid ones (per_rank: row
  ``>= counts``; expert_major: slot ``>= counts[e]``; ragged: row ``>= sum(counts)``) are
  *unspecified*: this reference happens to write zeros, the CUDA kernels leave whatever the
  buffer held. Consumers must not read them (``combine`` never does). The handle's padding
  entries (``recv_src``, ``recv_rows``, ``recv_topk_idx`` = -1, ``recv_weights`` = 0 past
  ``num_recv``) and per_rank's ``topk_idx``/``topk_weights`` past ``counts`` (-1 / 0) are
  specified.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep import fp8 as _fp8
from jax_ep.handles import DispatchLayout, Handle, LowLatencyHandle
from jax_ep.rows import pad_rows, take_rows

# ----------------------------------------------------------------------------
# routing helpers
# ----------------------------------------------------------------------------


def _rank_of(topk_idx: jax.Array, num_local_experts: int) -> jax.Array:
    return jnp.where(topk_idx >= 0, topk_idx // num_local_experts, -1)


def is_token_in_rank(topk_idx: jax.Array, num_experts: int, num_ranks: int) -> jax.Array:
    """``[T, K]`` → ``[T, R]`` bool: does the token select an expert of rank r."""
    ranks = _rank_of(topk_idx, num_experts // num_ranks)
    return jnp.any(ranks[:, :, None] == jnp.arange(num_ranks, dtype=jnp.int32), axis=1)


def get_dispatch_layout(topk_idx: jax.Array, num_experts: int, num_ranks: int) -> DispatchLayout:
    """Counts per rank and per expert (a token counts once per rank and per expert)."""
    in_rank = is_token_in_rank(topk_idx, num_experts, num_ranks)
    hits = jnp.any(topk_idx[:, :, None] == jnp.arange(num_experts, dtype=jnp.int32), axis=1)
    return DispatchLayout(
        num_tokens_per_rank=jnp.sum(in_rank, axis=0, dtype=jnp.int32),
        num_tokens_per_expert=jnp.sum(hits, axis=0, dtype=jnp.int32),
        is_token_in_rank=in_rank,
    )


def _local_ids(topk_idx: jax.Array, me: jax.Array, num_local_experts: int) -> jax.Array:
    lo = me * num_local_experts
    mine = (topk_idx >= lo) & (topk_idx < lo + num_local_experts)
    return jnp.where(mine, topk_idx - lo, -1).astype(jnp.int32)


def _exchange(payload: jax.Array, in_rank: jax.Array, axis_name, fill=0) -> jax.Array:
    """Send token ``t`` to every rank ``d`` with ``in_rank[t, d]``.

    ``[T, ...]`` → ``[R(source), T, ...]``: entry ``[s, t]`` is source ``s``'s token
    ``t`` if it was sent here, else ``fill``.
    """
    if payload.dtype == _fp8.FP8_DTYPE:  # move fp8 as bytes
        raw = jax.lax.bitcast_convert_type(payload, jnp.uint8)
        return jax.lax.bitcast_convert_type(_exchange(raw, in_rank, axis_name), _fp8.FP8_DTYPE)
    mask = in_rank.T.reshape(in_rank.shape[1], in_rank.shape[0], *([1] * (payload.ndim - 1)))
    send = jnp.where(mask, payload[None], jnp.full((), fill, payload.dtype))
    return jax.lax.all_to_all(send, axis_name, 0, 0, tiled=False)


def _return(rows: jax.Array, recv_src: jax.Array, num_ranks: int, num_tokens: int, axis_name):
    """Inverse of :func:`_exchange` + token list: ``[RT, ...]`` → ``[R(dest), T, ...]``."""
    rt = num_ranks * num_tokens
    target = jnp.where(recv_src >= 0, recv_src, rt)
    placed = jnp.zeros((rt,) + rows.shape[1:], rows.dtype).at[target].set(rows, mode="drop")
    placed = placed.reshape((num_ranks, num_tokens) + rows.shape[1:])
    return jax.lax.all_to_all(placed, axis_name, 0, 0, tiled=False)


def _token_list(recv_idx: jax.Array, me: jax.Array, num_local_experts: int):
    """Received tokens of ``[R, T, K]`` routing: (recv_src, count, local ids ``[RT, K]``)."""
    num_ranks, num_tokens, k = recv_idx.shape
    local = _local_ids(recv_idx.reshape(-1, k), me, num_local_experts)
    received = jnp.any(local >= 0, axis=1)
    order = jnp.argsort(~received, stable=True).astype(jnp.int32)
    num_recv = jnp.sum(received, dtype=jnp.int32)
    recv_src = jnp.where(jnp.arange(num_ranks * num_tokens) < num_recv, order, -1)
    return recv_src, num_recv, jnp.where(recv_src[:, None] >= 0, take_rows(local, recv_src), -1)


def _expert_slots(token_local: jax.Array, num_local_experts: int):
    """Per received token and local expert: (selected ``[RT, E_loc]``, slot, per-expert count)."""
    valid = token_local >= 0
    selected = jnp.any(
        (token_local[:, :, None] == jnp.arange(num_local_experts, dtype=jnp.int32))
        & valid[:, :, None],
        axis=1,
    )
    slot = jnp.cumsum(selected, axis=0, dtype=jnp.int32) - 1
    return selected, slot, jnp.sum(selected, axis=0, dtype=jnp.int32)


# ----------------------------------------------------------------------------
# high-throughput dispatch / combine
# ----------------------------------------------------------------------------


def dispatch(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    *,
    axis_name,
    num_experts: int,
    layout: str,
    capacity: int,
    fp8: bool = False,
    round_scale: bool = False,
):
    """Reference dispatch.

    Returns ``(x, scales, topk_idx, topk_weights, counts, num_dropped, handle)`` with the
    meaning of :class:`jax_ep.DispatchOut`.
    """
    num_ranks = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    num_tokens, hidden = x.shape
    num_topk = topk_idx.shape[1]
    e_loc = num_experts // num_ranks
    in_rank = is_token_in_rank(topk_idx, num_experts, num_ranks)

    if fp8:
        payload, scales = _fp8.quantize(x, round_scale=round_scale)
    else:
        payload, scales = x, None
    recv_x = _exchange(payload, in_rank, axis_name).reshape(num_ranks * num_tokens, hidden)
    recv_scales = None
    if scales is not None:
        recv_scales = _exchange(scales, in_rank, axis_name).reshape(num_ranks * num_tokens, -1)
    recv_idx = _exchange(topk_idx, in_rank, axis_name, fill=-1)
    recv_w = _exchange(topk_weights, in_rank, axis_name).reshape(num_ranks * num_tokens, num_topk)
    recv_src, num_recv, token_local = _token_list(recv_idx, me, e_loc)
    token_weights = jnp.where(token_local >= 0, take_rows(recv_w, recv_src), 0.0)
    token_x = take_rows(recv_x, recv_src)
    token_scales = None if recv_scales is None else take_rows(recv_scales, recv_src)
    rt = num_ranks * num_tokens
    index = jnp.arange(rt, dtype=jnp.int32)

    if layout == "per_rank":
        row = jnp.where((index < num_recv) & (index < capacity), index, -1)
        keep = jnp.where(
            jnp.arange(capacity) < jnp.minimum(num_recv, capacity),
            jnp.arange(capacity, dtype=jnp.int32),
            -1,
        )
        out_x = take_rows(pad_rows(token_x, capacity), keep)
        out_scales = (
            None if token_scales is None else take_rows(pad_rows(token_scales, capacity), keep)
        )
        out_idx = jnp.where(keep[:, None] >= 0, pad_rows(token_local, capacity, -1), -1)
        out_w = jnp.where(out_idx >= 0, pad_rows(token_weights, capacity), 0.0)
        kept = jnp.minimum(num_recv, capacity).astype(jnp.int32)
        handle = Handle(
            topk_idx,
            recv_src,
            token_local,
            row[:, None],
            token_weights,
            num_recv,
            "per_rank",
            num_experts,
            num_ranks,
            capacity,
        )
        return out_x, out_scales, out_idx, out_w, kept, num_recv - kept, handle

    selected, slot, count = _expert_slots(token_local, e_loc)
    if layout == "expert_major":
        kept_counts = jnp.minimum(count, capacity)
        row_of = jnp.where(
            slot < capacity, jnp.arange(e_loc, dtype=jnp.int32) * capacity + slot, -1
        )
        num_rows = e_loc * capacity
    elif layout == "ragged":
        offset = jnp.cumsum(count, dtype=jnp.int32) - count
        kept_counts = jnp.clip(capacity - offset, 0, count).astype(jnp.int32)
        row_of = jnp.where(offset + slot < capacity, offset + slot, -1)
        num_rows = capacity
    else:
        raise ValueError(f"unknown layout {layout!r}")
    row_of = jnp.where(selected, row_of, -1)  # [RT, E_loc]
    rows = jnp.where(
        token_local >= 0,
        jnp.take_along_axis(row_of, jnp.maximum(token_local, 0), axis=1),
        -1,
    )
    # which received token fills each output row (gather formulation: deterministic)
    row_token = jnp.full((num_rows + 1,), -1, jnp.int32)
    row_token = row_token.at[jnp.where(row_of >= 0, row_of, num_rows)].set(
        jnp.broadcast_to(index[:, None], row_of.shape), mode="drop"
    )[:num_rows]
    out_x = take_rows(token_x, row_token)
    out_scales = None if token_scales is None else take_rows(token_scales, row_token)
    if layout == "expert_major":
        out_x = out_x.reshape(e_loc, capacity, hidden)
        if out_scales is not None:
            out_scales = out_scales.reshape(e_loc, capacity, -1)
    dropped = jnp.sum(count - kept_counts, dtype=jnp.int32)
    handle = Handle(
        topk_idx,
        recv_src,
        token_local,
        rows,
        token_weights,
        num_recv,
        layout,
        num_experts,
        num_ranks,
        capacity,
    )
    return out_x, out_scales, None, None, kept_counts, dropped, handle


def expert_partials(y_rows: jax.Array, rows: jax.Array, weights: jax.Array) -> jax.Array:
    """Expert-side reduction: ``p_i = Σ_k w[i,k] * y[rows[i,k]]`` in float32, k order."""
    acc = jnp.zeros((rows.shape[0], y_rows.shape[-1]), jnp.float32)
    for k in range(rows.shape[1]):
        valid = (rows[:, k] >= 0)[:, None]
        term = weights[:, k, None].astype(jnp.float32) * take_rows(y_rows, rows[:, k]).astype(
            jnp.float32
        )
        acc = jnp.where(valid, acc + term, acc)
    return acc.astype(y_rows.dtype)


def _home_sum(back: jax.Array, in_rank: jax.Array, dtype) -> jax.Array:
    """``Σ_{d ascending, in_rank[t, d]} back[d, t]`` in float32, cast to ``dtype``."""
    acc = jnp.zeros(back.shape[1:], jnp.float32)
    for d in range(back.shape[0]):
        acc = jnp.where(in_rank[:, d, None], acc + back[d].astype(jnp.float32), acc)
    return acc.astype(dtype)


def combine(
    y: jax.Array, handle: Handle, weights: jax.Array | None, *, axis_name, extra=None
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Reference combine of dispatch-layout rows ``y`` back to ``[T, H]`` (see module docstring).

    ``weights`` (``[RT, K]`` expert-side) replaces ``handle.recv_weights``; per_rank ignores both.
    ``extra`` (``[RT, X]`` float32 per received token) travels with the partials in the same
    exchange and is summed at home like them: then ``(out, [T, X] float32)``.
    """
    hidden = y.shape[-1]
    y_rows = y.reshape(-1, hidden)
    if handle.layout == "per_rank":
        w = jnp.ones(handle.recv_rows.shape, jnp.float32)
    else:
        w = handle.recv_weights if weights is None else weights
    partial = expert_partials(y_rows, handle.recv_rows, w)
    return token_combine(partial, handle, axis_name=axis_name, extra=extra)


def token_dispatch(x: jax.Array, handle: Handle, *, axis_name) -> jax.Array:
    """Cached dispatch of ``[T, C]`` home rows to the ``[RT, C]`` received-token list."""
    in_rank = is_token_in_rank(handle.topk_idx, handle.num_experts, handle.num_ranks)
    recv = _exchange(x, in_rank, axis_name)
    return take_rows(recv.reshape((-1,) + x.shape[1:]), handle.recv_src)


def token_combine(
    rows: jax.Array, handle: Handle, *, axis_name, extra=None
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Inverse of :func:`token_dispatch`: ``[RT, C]`` → ``[T, C]`` summed over ranks (float32).

    With ``extra`` (``[RT, X]`` float32), both travel as bytes in one exchange and each is
    summed in float32 in ascending rank order: ``(out, [T, X] float32)``.
    """
    in_rank = is_token_in_rank(handle.topk_idx, handle.num_experts, handle.num_ranks)
    args = (handle.recv_src, handle.num_ranks, handle.num_tokens, axis_name)
    if extra is None:
        return _home_sum(_return(rows, *args), in_rank, rows.dtype)
    row_bytes, extra_bytes = _as_bytes(rows), _as_bytes(extra.astype(jnp.float32))
    back = _return(jnp.concatenate([row_bytes, extra_bytes], axis=1), *args)
    split = row_bytes.shape[1]
    back_rows = _from_bytes(back[..., :split], rows.dtype)
    back_extra = _from_bytes(back[..., split:], jnp.float32)
    return _home_sum(back_rows, in_rank, rows.dtype), _home_sum(back_extra, in_rank, jnp.float32)


def _as_bytes(a: jax.Array) -> jax.Array:
    """``[N, C]`` of any dtype → ``[N, C * itemsize]`` uint8 (a bit-exact view)."""
    return jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(a.shape[0], -1)


def _from_bytes(b: jax.Array, dtype) -> jax.Array:
    """Inverse of :func:`_as_bytes` over the last axis (leading axes kept)."""
    size = jnp.dtype(dtype).itemsize
    if size == 1:
        return jax.lax.bitcast_convert_type(b, dtype)
    return jax.lax.bitcast_convert_type(b.reshape(b.shape[:-1] + (-1, size)), dtype)


# ----------------------------------------------------------------------------
# low-latency dispatch / combine
# ----------------------------------------------------------------------------


def _mask_inactive(topk_idx: jax.Array, active_ranks: jax.Array, num_local_experts: int):
    ranks = _rank_of(topk_idx, num_local_experts)
    alive = jnp.take(active_ranks, jnp.maximum(ranks, 0)) > 0
    kept = jnp.where((topk_idx >= 0) & alive, topk_idx, -1)
    return kept, jnp.sum((topk_idx >= 0) & ~alive, dtype=jnp.int32)


def low_latency_dispatch(
    x: jax.Array,
    topk_idx: jax.Array,
    *,
    axis_name,
    num_experts: int,
    max_tokens_per_rank: int,
    active_ranks: jax.Array,
    fp8: bool = True,
    round_scale: bool = False,
):
    """Reference low-latency dispatch → ``(x, scales, counts, num_dropped, handle)``.

    Same row order as ``dispatch(layout="expert_major", capacity=R*T_max)`` on the
    routing with failed ranks' experts masked, with tokens padded to ``T_max``.
    """
    num_ranks = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    t_max = max_tokens_per_rank
    e_loc = num_experts // num_ranks
    routed, dropped = _mask_inactive(topk_idx, active_ranks, e_loc)
    # a failed source sends nothing: mask its routing as every receiver sees it
    routed = jnp.where(active_ranks[me] > 0, routed, -1)
    routed = pad_rows(routed, t_max, -1)
    x_pad = pad_rows(x, t_max)
    weights = jnp.zeros(routed.shape, jnp.float32)
    out_x, out_scales, _, _, counts, _, h = dispatch(
        x_pad,
        routed,
        weights,
        axis_name=axis_name,
        num_experts=num_experts,
        layout="expert_major",
        capacity=num_ranks * t_max,
        fp8=fp8,
        round_scale=round_scale,
    )
    rows_total = num_ranks * t_max
    # per output row: source token id and first k that chose the row's expert
    # (capacity is the worst case, so every selection has a row and row // capacity is its expert)
    token_local = jnp.where(h.recv_rows >= 0, h.recv_rows // rows_total, -1)
    first_k = _first_k(token_local, e_loc)  # [RT, E_loc]
    row_token = jnp.full((e_loc * rows_total + 1,), -1, jnp.int32)
    flat_rows = jnp.where(h.recv_rows >= 0, h.recv_rows, e_loc * rows_total)
    token_ids = jnp.broadcast_to(jnp.arange(rows_total, dtype=jnp.int32)[:, None], flat_rows.shape)
    row_token = row_token.at[flat_rows].set(token_ids, mode="drop")[:-1].reshape(e_loc, rows_total)
    src_info = jnp.where(row_token >= 0, jnp.take(h.recv_src, jnp.maximum(row_token, 0)), -1)
    expert_ids = jnp.arange(e_loc, dtype=jnp.int32)[:, None]
    topk_slot = jnp.where(row_token >= 0, first_k[jnp.maximum(row_token, 0), expert_ids], -1)
    src_rank = jnp.where(src_info >= 0, src_info // t_max, -1)
    per_source = jnp.sum(
        src_rank[:, None, :] == jnp.arange(num_ranks)[None, :, None], axis=2, dtype=jnp.int32
    )  # [E_loc, R]
    begin = jnp.cumsum(per_source, axis=1, dtype=jnp.int32) - per_source
    handle = LowLatencyHandle(
        src_info,
        topk_slot,
        jnp.stack([begin, per_source], axis=-1),
        counts,
        active_ranks.astype(jnp.int32),
        num_experts,
        num_ranks,
        t_max,
    )
    return out_x, out_scales, counts, dropped, handle


def _first_k(token_local: jax.Array, num_local_experts: int) -> jax.Array:
    """``[RT, K]`` local ids → ``[RT, E_loc]`` first k choosing each expert (-1 if none)."""
    k = token_local.shape[1]
    hit = token_local[:, :, None] == jnp.arange(num_local_experts, dtype=jnp.int32)
    ks = jnp.where(hit, jnp.arange(k, dtype=jnp.int32)[None, :, None], k)
    first = jnp.min(ks, axis=1)
    return jnp.where(first < k, first, -1).astype(jnp.int32)


def low_latency_combine(
    y: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    handle: LowLatencyHandle,
    *,
    axis_name,
) -> jax.Array:
    """Reference low-latency combine: ``out[t] = Σ_k w[t,k] * y[e_k, row(t, e_k)]``.

    Each expert output row travels back on its own (no expert-side reduction);
    the home rank adds them in float32 in k order and casts to ``y``'s dtype.
    Selections of failed ranks (``handle.active_ranks``) contribute nothing.
    """
    num_ranks = handle.num_ranks
    t_max = handle.max_tokens_per_rank
    e_loc, rows_total, hidden = y.shape
    num_tokens, num_topk = topk_idx.shape
    src = handle.recv_src_info.reshape(-1)
    slot = handle.recv_topk_slot.reshape(-1)
    valid = src >= 0
    # expert side: place each row at (source rank, token, k) and send it home
    target = jnp.where(valid, src * num_topk + slot, rows_total * num_topk)
    placed = jnp.zeros((rows_total * num_topk, hidden), y.dtype)
    placed = placed.at[target].set(y.reshape(-1, hidden), mode="drop")
    placed = placed.reshape(num_ranks, t_max, num_topk, hidden)
    back = jax.lax.all_to_all(placed, axis_name, 0, 0, tiled=False)  # [R(dest), T_max, K, H]
    # home side
    routed, _ = _mask_inactive(topk_idx, handle.active_ranks, handle.num_experts // num_ranks)
    ranks = _rank_of(routed, handle.num_experts // num_ranks)
    first = _first_k_of_row(routed)
    acc = jnp.zeros((num_tokens, hidden), jnp.float32)
    tokens = jnp.arange(num_tokens)
    for k in range(num_topk):
        val = back[jnp.maximum(ranks[:, k], 0), tokens, first[:, k]].astype(jnp.float32)
        term = topk_weights[:, k, None].astype(jnp.float32) * val
        acc = jnp.where((ranks[:, k] >= 0)[:, None], acc + term, acc)
    return acc.astype(y.dtype)


def _first_k_of_row(topk_idx: jax.Array) -> jax.Array:
    """``[T, K]`` → ``[T, K]``: the first k' with ``topk_idx[t, k'] == topk_idx[t, k]``."""
    k = topk_idx.shape[1]
    same = topk_idx[:, :, None] == topk_idx[:, None, :]
    ks = jnp.where(same, jnp.arange(k, dtype=jnp.int32)[None, None, :], k)
    return jnp.min(ks, axis=2).astype(jnp.int32)
