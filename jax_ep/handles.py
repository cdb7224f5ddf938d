"""Result and handle types shared by every backend.

A *handle* is what dispatch leaves behind for combine and for the backward
pass: device arrays plus the static facts that shape them. It is a pytree, so
it crosses ``jit``/``shard_map`` boundaries like any other value.

Notation (per EP rank): ``R`` ranks, ``T`` tokens, ``K`` top-k, ``H`` hidden,
``E`` experts, ``E_loc = E / R``. A *received token* is a pair (source rank
``s``, source token ``t``) such that token ``t`` of rank ``s`` selected at least
one expert of this rank; received tokens are listed in ascending ``s * T + t``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax

Layout = Literal["per_rank", "expert_major", "ragged"]
LAYOUTS: tuple[str, ...] = ("per_rank", "expert_major", "ragged")


class DispatchLayout(NamedTuple):
    """Result of :func:`jax_ep.get_dispatch_layout` (counts are int32)."""

    num_tokens_per_rank: jax.Array  # [R] tokens with at least one expert on rank r
    num_tokens_per_expert: jax.Array  # [E] tokens that selected expert e
    is_token_in_rank: jax.Array  # [T, R] bool


@dataclasses.dataclass(frozen=True)
class Handle:
    """Routing state of one high-throughput dispatch (see module docstring).

    Home side (this rank's own tokens):
      topk_idx: ``[T, K]`` int32, the routing given to dispatch.
    Expert side (tokens this rank received), ``RT = R * T`` rows:
      recv_src: ``[RT]`` int32, ``s * T + t`` of the i-th received token, -1 after the last.
      recv_topk_idx: ``[RT, K]`` int32, the received token's routing with expert ids
        made local, -1 for other ranks' experts, masked slots and padding rows.
      recv_rows: ``[RT, K]`` int32 (``[RT, 1]`` for per_rank), row of the received
        token's copy for each local expert in the flattened dispatch output, -1 where
        the expert is not local, masked, or its row was dropped for capacity.
      recv_weights: ``[RT, K]`` float32 router weights of local experts (0 elsewhere).
        Expert layouts' combine multiplies by them; per_rank's combine does not.
      num_recv: ``[]`` int32, number of received tokens.
    """

    topk_idx: jax.Array
    recv_src: jax.Array
    recv_topk_idx: jax.Array
    recv_rows: jax.Array
    recv_weights: jax.Array
    num_recv: jax.Array
    layout: str = dataclasses.field(metadata=dict(static=True), default="expert_major")
    num_experts: int = dataclasses.field(metadata=dict(static=True), default=0)
    num_ranks: int = dataclasses.field(metadata=dict(static=True), default=1)
    capacity: int = dataclasses.field(metadata=dict(static=True), default=0)

    @property
    def num_tokens(self) -> int:
        return self.topk_idx.shape[-2]

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def num_rows(self) -> int:
        """Rows of the flattened dispatch output that ``recv_rows`` indexes."""
        if self.layout == "expert_major":
            return self.num_local_experts * self.capacity
        return self.capacity


jax.tree_util.register_dataclass(Handle)


class DispatchOut(NamedTuple):
    """Result of :func:`jax_ep.dispatch`.

    x: per_rank ``[capacity, H]``; expert_major ``[E_loc, capacity, H]``;
      ragged ``[capacity, H]`` (rows grouped by local expert). Dtype of the input,
      or float8_e4m3fn with ``fp8=True``. Only the valid rows are defined: per_rank the first
      ``counts``, expert_major the first ``counts[e]`` of expert ``e``, ragged the first
      ``sum(counts)``. Rows past them are unspecified (no backend pays to zero capacity
      nobody reads; the CUDA kernels leave them as they were): a consumer whose arithmetic
      touches them, e.g. a dense ``einsum`` over expert_major whose backward would turn
      ``garbage * 0`` into NaN, must select them away itself (:mod:`jax_ep.experts` does).
    scales: ``x.shape[:-1] + (H // 128,)`` float32 with ``fp8=True``, else None (valid rows
      as ``x``).
    topk_idx / topk_weights: per_rank only, ``[capacity, K]``: the received token's
      routing with expert ids made local (``-1`` and weight 0 for other ranks' experts, and
      on every row past ``counts``).
    counts: per_rank ``[]`` rows kept; expert layouts ``[E_loc]`` rows kept per
      expert (group sizes for ``jax.lax.ragged_dot`` with the ragged layout).
    num_dropped: ``[]`` int32 rows that did not fit in ``capacity``.
    handle: :class:`Handle` for :func:`jax_ep.combine`.
    """

    x: jax.Array
    scales: jax.Array | None
    topk_idx: jax.Array | None
    topk_weights: jax.Array | None
    counts: jax.Array
    num_dropped: jax.Array
    handle: Handle


@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
    """Routing state of one low-latency dispatch.

    recv_src_info: ``[E_loc, R*T_max]`` int32, ``s * T_max + t`` of each received row
      (-1 past the count).
    recv_topk_slot: ``[E_loc, R*T_max]`` int32, the first k at which the source token chose
      the expert.
    layout_range: ``[E_loc, R, 2]`` int32, (first row, row count) of each source rank's block.
    recv_count: ``[E_loc]`` int32 rows per local expert.
    active_ranks: ``[R]`` int32 (1 active, 0 failed) that the dispatch used.
    """

    recv_src_info: jax.Array
    recv_topk_slot: jax.Array
    layout_range: jax.Array
    recv_count: jax.Array
    active_ranks: jax.Array
    num_experts: int = dataclasses.field(metadata=dict(static=True), default=0)
    num_ranks: int = dataclasses.field(metadata=dict(static=True), default=1)
    max_tokens_per_rank: int = dataclasses.field(metadata=dict(static=True), default=0)


jax.tree_util.register_dataclass(LowLatencyHandle)


class LowLatencyOut(NamedTuple):
    """Result of :func:`jax_ep.low_latency_dispatch`.

    x: ``[E_loc, R*T_max, H]`` float8_e4m3fn (``fp8=True``) or the input dtype.
      Only the first ``counts[e]`` rows of expert ``e`` are defined, ordered by
      (source rank, source token).
    scales: ``[E_loc, R*T_max, H // 128]`` float32 with fp8, else None.
    counts: ``[E_loc]`` int32.
    num_dropped: ``[]`` int32 selections this rank did not send because the
      destination rank is marked failed in ``active_ranks``.
    handle: :class:`LowLatencyHandle` for :func:`jax_ep.low_latency_combine`.
    """

    x: jax.Array
    scales: jax.Array | None
    counts: jax.Array
    num_dropped: jax.Array
    handle: LowLatencyHandle
