"""What JAX users run today instead of jax_ep: expert-parallel dispatch/combine in plain JAX.

Two baselines, both per-rank functions called inside ``jax.shard_map`` (or ``vmap``) over the
EP mesh axis, like :func:`jax_ep.dispatch`, and a third for EP=1:

* :func:`ragged_all_to_all_dispatch` / :func:`ragged_all_to_all_combine`: MaxText's sparse EP
  path (``RoutedMoE`` with ``sparse_matmul``): sort the (token, k) selections by expert,
  ``all_gather`` the per-expert counts, derive the four offset/size vectors, move the rows with
  ``jax.lax.ragged_all_to_all``, permute them locally into local-expert order; the combine runs
  the reverse ``ragged_all_to_all``, un-permutes and takes the router-weighted sum.
* :func:`all_to_all_dispatch` / :func:`all_to_all_combine`: the same sort, but rows travel in a
  dense ``jax.lax.all_to_all`` of ``[R, capacity, H]`` blocks, one block per destination rank,
  with a static per-destination capacity (GShard-style, extra rows are dropped).
* :func:`local_dispatch` / :func:`local_combine`: no expert parallelism at all (MaxText's
  ``RoutedMoE`` at EP=1): argsort the selections by expert and gather; the combine unsorts and
  takes the router-weighted sum. No collective: what a JAX user runs when every expert is local,
  so it is the baseline jax_ep's EP=1 numbers must beat.

Both hand the experts the ragged layout of ``jax_ep.dispatch(layout="ragged")``: rows grouped
by local expert, ``group_sizes`` ``[E_loc]`` for ``jax.lax.ragged_dot``, rows past the valid
ones zero. Within an expert the rows are in (source rank, source token) order, which is also
jax_ep's order, so with a never-dropping buffer the dispatched rows are identical to jax_ep's.

Routing contract: ``topk_idx`` ``[T, K]`` int, expert ids in ``[0, E)``, ``-1`` = masked slot.
A token must not name the same expert twice (``jax.lax.top_k`` never does): unlike jax_ep,
which sends one row per distinct (token, expert) pair, these baselines send one row per
(token, k) selection, as MaxText does.

``ragged_all_to_all`` is not implemented by XLA:CPU (jax-ml/jax#34755: "HLO opcode
`ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter", seen with jax 0.10.2).
``emulate=True`` swaps it for :func:`ragged_all_to_all_emulated`, the same semantics built on a
dense ``all_to_all`` of ``[R, N, H]`` (R times the bytes): for CPU tests and examples only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "AllToAllState",
    "BaselineDispatch",
    "LocalState",
    "RaggedAllToAllState",
    "all_to_all_combine",
    "all_to_all_dispatch",
    "local_combine",
    "local_dispatch",
    "ragged_all_to_all_combine",
    "ragged_all_to_all_dispatch",
    "ragged_all_to_all_emulated",
]


class BaselineDispatch(NamedTuple):
    """What a baseline dispatch returns (the ragged layout of :func:`jax_ep.dispatch`).

    x: ``[rows, H]`` the input dtype, grouped by local expert; rows past ``sum(group_sizes)``
      are zero.
    group_sizes: ``[E_loc]`` int32 rows per local expert (``jax.lax.ragged_dot`` group sizes).
    num_dropped: ``[]`` int32 selections addressed to this rank that did not fit its buffer.
    state: what the matching combine needs (:class:`RaggedAllToAllState` or
      :class:`AllToAllState`).
    """

    x: jax.Array
    group_sizes: jax.Array
    num_dropped: jax.Array
    state: RaggedAllToAllState | AllToAllState


@dataclasses.dataclass(frozen=True)
class RaggedAllToAllState:
    """Routing state of :func:`ragged_all_to_all_dispatch` (a pytree of int32 arrays).

    topk_idx: ``[T, K]`` the routing.
    sort_idx: ``[T*K]`` flat (t, k) selection of the i-th expert-sorted row (masked last).
    send_sizes, input_offsets, output_offsets: ``[R]`` the dispatch's own arguments of
      ``ragged_all_to_all``: rows sent to rank d, where they start in the sorted rows, where
      they start in rank d's buffer.
    recv_sizes, recv_offsets: ``[R]`` rows received from rank s and where they start here.
    return_offsets: ``[R]`` where this rank's rows start in rank s's sorted rows (the combine's
      output offsets).
    local_sort_idx: ``[rows]`` received row of the i-th local-expert-sorted row.
    """

    topk_idx: jax.Array
    sort_idx: jax.Array
    send_sizes: jax.Array
    input_offsets: jax.Array
    output_offsets: jax.Array
    recv_sizes: jax.Array
    recv_offsets: jax.Array
    return_offsets: jax.Array
    local_sort_idx: jax.Array


jax.tree_util.register_dataclass(RaggedAllToAllState)


@dataclasses.dataclass(frozen=True)
class AllToAllState:
    """Routing state of :func:`all_to_all_dispatch` (a pytree of int32 arrays).

    topk_idx: ``[T, K]`` the routing.
    sort_idx: ``[T*K]`` flat (t, k) selection of the i-th expert-sorted row (masked last).
    send_pos: ``[R, C]`` sorted row sent in slot c of the block for rank d, ``T*K`` if none.
    local_sort_idx: ``[R*C]`` received slot of the i-th local-expert-sorted row.
    """

    topk_idx: jax.Array
    sort_idx: jax.Array
    send_pos: jax.Array
    local_sort_idx: jax.Array


jax.tree_util.register_dataclass(AllToAllState)


@dataclasses.dataclass(frozen=True)
class LocalState:
    """Routing state of :func:`local_dispatch` (a pytree of int32 arrays).

    topk_idx: ``[T, K]`` the routing.
    sort_idx: ``[T*K]`` flat (t, k) selection of the i-th expert-sorted row (masked last).
    """

    topk_idx: jax.Array
    sort_idx: jax.Array


jax.tree_util.register_dataclass(LocalState)


# ----------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------


def _exclusive_cumsum(a: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(a, axis=axis, dtype=jnp.int32) - a.astype(jnp.int32)


def _sort_by_expert(topk_idx: jax.Array, num_experts: int):
    """Sort the flat (t, k) selections by expert id, masked (-1) last.

    Returns (sort_idx ``[T*K]``, sorted expert ids ``[T*K]`` with ``num_experts`` for masked,
    counts per expert ``[E]`` int32). A stable sort keeps ascending t inside an expert.
    """
    flat = topk_idx.reshape(-1).astype(jnp.int32)
    key = jnp.where(flat >= 0, flat, num_experts)
    sort_idx = jnp.argsort(key, stable=True).astype(jnp.int32)
    counts = jnp.sum(
        key[:, None] == jnp.arange(num_experts, dtype=jnp.int32), axis=0, dtype=jnp.int32
    )
    return sort_idx, key[sort_idx], counts


def _weighted_sum(y_flat: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array) -> jax.Array:
    """``[T*K, H]`` rows in (t, k) order → ``Σ_k w[t, k] * y[t, k]`` in float32, k order."""
    num_tokens, num_topk = topk_idx.shape
    y = y_flat.reshape(num_tokens, num_topk, -1)
    acc = jnp.zeros((num_tokens, y.shape[-1]), jnp.float32)
    for k in range(num_topk):
        term = topk_weights[:, k, None].astype(jnp.float32) * y[:, k].astype(jnp.float32)
        acc = jnp.where((topk_idx[:, k] >= 0)[:, None], acc + term, acc)
    return acc.astype(y_flat.dtype)


def _unsort_rows(rows: jax.Array, sort_idx: jax.Array) -> jax.Array:
    """Inverse permutation: ``out[sort_idx[i]] = rows[i]``."""
    return jnp.zeros_like(rows).at[sort_idx].set(rows, unique_indices=True)


def _local_sort(expert_of_row: jax.Array, num_local_experts: int):
    """Stable sort of received rows by local expert (``-1`` = empty row, sorted last)."""
    key = jnp.where(expert_of_row >= 0, expert_of_row, num_local_experts)
    local_sort_idx = jnp.argsort(key, stable=True).astype(jnp.int32)
    group_sizes = jnp.sum(
        key[:, None] == jnp.arange(num_local_experts, dtype=jnp.int32), axis=0, dtype=jnp.int32
    )
    return local_sort_idx, group_sizes


def default_buffer_rows(
    num_ranks: int, num_tokens: int, num_topk: int, num_local_experts: int
) -> int:
    """Received rows per rank in the worst case: every source sends ``T * min(K, E_loc)``."""
    return num_ranks * num_tokens * min(num_topk, num_local_experts)


# ----------------------------------------------------------------------------
# (a) ragged_all_to_all (MaxText)
# ----------------------------------------------------------------------------


def ragged_all_to_all_emulated(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name,
) -> jax.Array:
    """``jax.lax.ragged_all_to_all`` semantics on a dense ``all_to_all`` (runs on XLA:CPU).

    Rank i sends ``operand[input_offsets[j] : input_offsets[j] + send_sizes[j]]`` to rank j,
    which writes it at ``output[output_offsets[j] :]`` (the offset is the sender's argument);
    rows of ``output`` that nobody writes keep their values. ``recv_sizes`` is accepted for the
    same signature; the sizes that travel with the rows are the ones used. Moves ``R * N`` rows
    per rank (``N = operand.shape[0]``) instead of the ragged ones: a test and CPU stand-in.
    """
    del recv_sizes
    n = operand.shape[0]
    j = jnp.arange(n, dtype=jnp.int32)
    valid = j[None, :] < send_sizes[:, None]  # [R(dest), N]
    src_rows = jnp.clip(input_offsets[:, None] + j[None, :], 0, n - 1)
    send = jnp.where(
        valid.reshape(valid.shape + (1,) * (operand.ndim - 1)),
        jnp.take(operand, src_rows, axis=0),
        jnp.zeros((), operand.dtype),
    )
    recv = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=False)  # [R(src), N, ...]
    meta = jnp.stack([output_offsets, send_sizes], axis=1).astype(jnp.int32)  # [R(dest), 2]
    meta = jax.lax.all_to_all(meta, axis_name, 0, 0, tiled=False)  # [R(src), 2]
    target = jnp.where(j[None, :] < meta[:, 1:2], meta[:, 0:1] + j[None, :], output.shape[0])
    return output.at[target.reshape(-1)].set(recv.reshape((-1,) + operand.shape[1:]), mode="drop")


def _ragged_a2a(emulate: bool):
    return ragged_all_to_all_emulated if emulate else jax.lax.ragged_all_to_all


def ragged_all_to_all_dispatch(
    x: jax.Array,
    topk_idx: jax.Array,
    *,
    axis_name,
    num_experts: int,
    buffer_rows: int | None = None,
    emulate: bool = False,
) -> BaselineDispatch:
    """MaxText-style dispatch: sort by expert, ``ragged_all_to_all``, local permute.

    Args:
      x: ``[T, H]`` tokens of this rank (any float dtype).
      topk_idx: ``[T, K]`` int expert ids, ``-1`` = masked (see the module's routing contract).
      axis_name: the EP mesh axis (bound by the enclosing ``shard_map``).
      num_experts: ``E``, divisible by the axis size.
      buffer_rows: static receive buffer rows. Default :func:`default_buffer_rows` (never
        drops). Smaller buffers keep a deterministic prefix of (source rank, local expert)
        order, as MaxText's ``_truncate_matrix``; the rest is dropped and counted.
      emulate: use :func:`ragged_all_to_all_emulated` (XLA:CPU has no ragged_all_to_all).
    Returns:
      :class:`BaselineDispatch` with ``x`` ``[buffer_rows, H]``.
    """
    num_ranks = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    num_tokens, num_topk = topk_idx.shape
    e_loc = num_experts // num_ranks
    if buffer_rows is None:
        buffer_rows = default_buffer_rows(num_ranks, num_tokens, num_topk, e_loc)
    sort_idx, _, counts = _sort_by_expert(topk_idx, num_experts)
    x_sorted = jnp.take(x, sort_idx // num_topk, axis=0)  # masked rows sort last, never sent

    # every rank learns every rank's per-expert counts: [R(src), E]
    all_counts = jax.lax.all_gather(counts, axis_name)
    # rows of (src s, local expert e) in dest d's buffer, laid out (s, e)-major; a buffer that is
    # too small keeps a prefix, so every rank derives the same kept counts without talking
    by_dest = all_counts.reshape(num_ranks, num_ranks, e_loc).transpose(1, 0, 2)  # [d, s, e]
    flat = by_dest.reshape(num_ranks, num_ranks * e_loc)
    kept = jnp.diff(
        jnp.minimum(jnp.cumsum(flat, axis=1), buffer_rows),
        axis=1,
        prepend=jnp.zeros((num_ranks, 1), jnp.int32),
    )
    kept = kept.reshape(num_ranks, num_ranks, e_loc).astype(jnp.int32)  # [d, s, e]
    kept_per_pair = jnp.sum(kept, axis=2, dtype=jnp.int32)  # [d, s]

    send_sizes = kept_per_pair[:, me]  # [d] (a prefix of my block for d, see above)
    input_offsets = _exclusive_cumsum(jnp.sum(counts.reshape(num_ranks, e_loc), axis=1))
    output_offsets = jnp.sum(
        jnp.where(jnp.arange(num_ranks)[None, :] < me, kept_per_pair, 0), axis=1, dtype=jnp.int32
    )  # [d]: rows of sources before me
    recv_sizes = kept_per_pair[me]  # [s]
    recv_offsets = _exclusive_cumsum(recv_sizes)
    # where my rows go back in source s's sorted rows: all of s's rows for experts below mine
    return_offsets = _exclusive_cumsum(all_counts, axis=1)[:, me * e_loc]  # [s]

    buffer = jnp.zeros((buffer_rows,) + x.shape[1:], x.dtype)
    x_recv = _ragged_a2a(emulate)(
        x_sorted, buffer, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis_name
    )

    # received rows are (source, local expert)-major: label each with its expert, then sort
    mine = kept[me].reshape(-1)  # [s * e]
    labels = jnp.tile(jnp.arange(e_loc, dtype=jnp.int32), num_ranks)
    expert_of_row = jnp.repeat(labels, mine, total_repeat_length=buffer_rows)
    expert_of_row = jnp.where(jnp.arange(buffer_rows) < jnp.sum(mine), expert_of_row, -1)
    local_sort_idx, group_sizes = _local_sort(expert_of_row, e_loc)
    x_local = jnp.take(x_recv, local_sort_idx, axis=0)
    num_dropped = jnp.sum(by_dest[me], dtype=jnp.int32) - jnp.sum(mine, dtype=jnp.int32)
    state = RaggedAllToAllState(
        topk_idx.astype(jnp.int32),
        sort_idx,
        send_sizes,
        input_offsets,
        output_offsets,
        recv_sizes,
        recv_offsets,
        return_offsets,
        local_sort_idx,
    )
    return BaselineDispatch(x_local, group_sizes, num_dropped, state)


def ragged_all_to_all_combine(
    y: jax.Array,
    topk_weights: jax.Array,
    state: RaggedAllToAllState,
    *,
    axis_name,
    emulate: bool = False,
) -> jax.Array:
    """Reverse of :func:`ragged_all_to_all_dispatch` plus the router-weighted sum.

    Args:
      y: ``[buffer_rows, H]`` expert outputs in the dispatch's row order.
      topk_weights: ``[T, K]`` router weights of this rank's tokens.
      state: ``BaselineDispatch.state``.
    Returns:
      ``[T, H]`` in ``y``'s dtype: ``Σ_k w[t, k] * y[row(t, k)]`` accumulated in float32 in k
      order; masked and dropped selections add nothing.
    """
    num_tokens, num_topk = state.topk_idx.shape
    y_recv = _unsort_rows(y, state.local_sort_idx)
    out = jnp.zeros((num_tokens * num_topk,) + y.shape[1:], y.dtype)
    y_sorted = _ragged_a2a(emulate)(
        y_recv,
        out,
        state.recv_offsets,
        state.recv_sizes,
        state.return_offsets,
        state.send_sizes,
        axis_name=axis_name,
    )
    return _weighted_sum(_unsort_rows(y_sorted, state.sort_idx), state.topk_idx, topk_weights)


# ----------------------------------------------------------------------------
# (b) padded all_to_all with a static per-destination capacity
# ----------------------------------------------------------------------------


def all_to_all_capacity(
    num_ranks: int,
    num_tokens: int,
    num_topk: int,
    num_local_experts: int,
    capacity_factor: float | None = None,
) -> int:
    """Rows per destination block: ``T * min(K, E_loc)`` (never drops) without a factor, else
    ``ceil(factor * T * K / R)`` (``factor`` times the balanced load), at least 1."""
    if capacity_factor is None:
        return num_tokens * min(num_topk, num_local_experts)
    return max(1, math.ceil(capacity_factor * num_tokens * num_topk / num_ranks))


def all_to_all_dispatch(
    x: jax.Array,
    topk_idx: jax.Array,
    *,
    axis_name,
    num_experts: int,
    capacity: int | None = None,
) -> BaselineDispatch:
    """Padded dispatch: sort by expert, one ``[capacity, H]`` block per destination, ``all_to_all``.

    Args:
      x: ``[T, H]`` tokens of this rank.
      topk_idx: ``[T, K]`` int expert ids, ``-1`` = masked.
      capacity: static rows per (source, destination) block; default
        :func:`all_to_all_capacity` without a factor (never drops). A sender keeps its first
        ``capacity`` rows for each destination in (expert, token) order and drops the rest.
    Returns:
      :class:`BaselineDispatch` with ``x`` ``[R * capacity, H]``.
    """
    num_ranks = jax.lax.axis_size(axis_name)
    num_tokens, num_topk = topk_idx.shape
    e_loc = num_experts // num_ranks
    if capacity is None:
        capacity = all_to_all_capacity(num_ranks, num_tokens, num_topk, e_loc)
    n = num_tokens * num_topk
    sort_idx, sorted_experts, counts = _sort_by_expert(topk_idx, num_experts)
    per_dest = jnp.sum(counts.reshape(num_ranks, e_loc), axis=1, dtype=jnp.int32)
    start = _exclusive_cumsum(per_dest)
    c = jnp.arange(capacity, dtype=jnp.int32)
    valid = c[None, :] < per_dest[:, None]  # [d, C]
    send_pos = jnp.where(valid, start[:, None] + c[None, :], n)
    rows = jnp.take(x, jnp.take(sort_idx, jnp.minimum(send_pos, n - 1)) // num_topk, axis=0)
    send_x = jnp.where(valid[..., None], rows, jnp.zeros((), x.dtype))  # [d, C, H]
    dest_ids = jnp.arange(num_ranks, dtype=jnp.int32)[:, None] * e_loc
    send_e = jnp.where(valid, jnp.take(sorted_experts, jnp.minimum(send_pos, n - 1)) - dest_ids, -1)
    overflow = per_dest - jnp.minimum(per_dest, capacity)
    recv_x = jax.lax.all_to_all(send_x, axis_name, 0, 0, tiled=False)  # [s, C, H]
    recv_e = jax.lax.all_to_all(send_e, axis_name, 0, 0, tiled=False)  # [s, C]
    recv_overflow = jax.lax.all_to_all(overflow[:, None], axis_name, 0, 0, tiled=False)
    local_sort_idx, group_sizes = _local_sort(recv_e.reshape(-1), e_loc)
    x_local = jnp.take(recv_x.reshape(-1, x.shape[-1]), local_sort_idx, axis=0)
    state = AllToAllState(topk_idx.astype(jnp.int32), sort_idx, send_pos, local_sort_idx)
    return BaselineDispatch(x_local, group_sizes, jnp.sum(recv_overflow, dtype=jnp.int32), state)


def all_to_all_combine(
    y: jax.Array,
    topk_weights: jax.Array,
    state: AllToAllState,
    *,
    axis_name,
) -> jax.Array:
    """Reverse of :func:`all_to_all_dispatch` plus the router-weighted sum.

    Args:
      y: ``[R * capacity, H]`` expert outputs in the dispatch's row order.
      topk_weights: ``[T, K]`` router weights of this rank's tokens.
    Returns:
      ``[T, H]`` in ``y``'s dtype (float32 accumulation in k order, as
      :func:`ragged_all_to_all_combine`).
    """
    num_tokens, num_topk = state.topk_idx.shape
    num_ranks, capacity = state.send_pos.shape
    y_recv = _unsort_rows(y, state.local_sort_idx).reshape(num_ranks, capacity, -1)
    back = jax.lax.all_to_all(y_recv, axis_name, 0, 0, tiled=False)  # [d, C, H] my rows
    n = num_tokens * num_topk
    y_sorted = jnp.zeros((n,) + y.shape[1:], y.dtype)
    y_sorted = y_sorted.at[state.send_pos.reshape(-1)].set(
        back.reshape(-1, y.shape[-1]), mode="drop"
    )
    return _weighted_sum(_unsort_rows(y_sorted, state.sort_idx), state.topk_idx, topk_weights)


# ----------------------------------------------------------------------------
# (c) EP=1: local sort / gather / unsort, no collective
# ----------------------------------------------------------------------------


def local_dispatch(x: jax.Array, topk_idx: jax.Array, *, num_experts: int) -> BaselineDispatch:
    """Every expert local: sort the (token, k) selections by expert and gather the rows.

    Args:
      x: ``[T, H]`` tokens.
      topk_idx: ``[T, K]`` int expert ids in ``[0, E)``, ``-1`` = masked.
      num_experts: ``E``.
    Returns:
      :class:`BaselineDispatch` with ``x`` ``[T*K, H]`` grouped by expert (ascending token
      inside an expert), ``group_sizes`` ``[E]``; masked selections sort last and are zero.
    """
    num_topk = topk_idx.shape[1]
    sort_idx, sorted_experts, counts = _sort_by_expert(topk_idx, num_experts)
    rows = jnp.take(x, sort_idx // num_topk, axis=0)
    rows = jnp.where((sorted_experts < num_experts)[:, None], rows, jnp.zeros((), x.dtype))
    state = LocalState(topk_idx.astype(jnp.int32), sort_idx)
    return BaselineDispatch(rows, counts, jnp.zeros((), jnp.int32), state)


def local_combine(y: jax.Array, topk_weights: jax.Array, state: LocalState) -> jax.Array:
    """Reverse of :func:`local_dispatch` plus the router-weighted sum.

    Args:
      y: ``[T*K, H]`` expert outputs in the dispatch's row order.
      topk_weights: ``[T, K]`` router weights.
    Returns:
      ``[T, H]`` in ``y``'s dtype (float32 accumulation in k order; masked selections add
      nothing).
    """
    return _weighted_sum(_unsort_rows(y, state.sort_idx), state.topk_idx, topk_weights)
