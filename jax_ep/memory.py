"""Bytes a group and its calls use, known before anything runs (:meth:`jax_ep.Group.memory_report`).

Two kinds of memory:

* the group's **communication buffers** (CUDA backend): one allocation per rank, made when the
  group is created and kept until it is closed. :func:`buffer_regions` is the size formula of
  ``csrc/common/buffer_layout.h`` (``make_layout``) written again in Python, so a plan can be
  made on a machine without the extension (and the reference backend, which allocates none,
  can say what the CUDA backend would); a test checks it against the extension's own
  ``buffer_bytes``;
* the **outputs of one call** (any backend): what XLA allocates for the dispatch output and
  its handle, for a layout, capacity and dtype (:mod:`jax_ep.capacity`), and for the
  low-latency receive layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jax_ep.capacity import DEFAULT_CAPACITY_FACTOR, dispatch_capacity

ALIGN = 128  # kAlign: every region starts on a 128-byte boundary
FP8_GROUP = 128  # channels per FP8 scale
LOW_LATENCY_HEADER_BYTES = 16  # kLowLatencyHeaderBytes: (source token, first k) per message
NUM_COUNTERS = 13  # kNumCounters

GIB = float(1 << 30)


def _align(v: int, a: int = ALIGN) -> int:
    return (v + a - 1) // a * a


def wire_row_bytes(hidden: int, elem_bytes: int) -> int:
    """One token row on the wire: the payload or FP8 + scales, whichever is larger, 16-aligned."""
    raw = hidden * elem_bytes
    fp8 = hidden + (hidden + FP8_GROUP - 1) // FP8_GROUP * 4
    return _align(max(raw, fp8), 16)


def buffer_regions(
    *,
    num_ranks: int,
    max_tokens: int,
    hidden: int,
    elem_bytes: int,
    num_topk: int,
    num_local_experts: int,
    low_latency: bool,
    ll_max_tokens: int,
    num_nodes: int = 1,
) -> dict[str, int]:
    """Bytes of one rank's communication buffer by purpose (``make_layout``'s regions, aligned).

    Keys: ``high_throughput`` (dispatch/combine arrivals, metadata, payload, double-buffered,
    sized by ``max_tokens``), ``low_latency`` (decode send/receive regions, sized by
    ``ll_max_tokens``), ``internode`` (NVSHMEM staging, ``num_nodes > 1``), ``private``
    (counters, per-expert bitmaps and prefixes), and ``total``.
    """
    R, T, K, E = num_ranks, max_tokens, num_topk, num_local_experts
    T_ll = ll_max_tokens
    row = wire_row_bytes(hidden, elem_bytes)
    combine_row = _align(hidden * elem_bytes, 16)
    message = LOW_LATENCY_HEADER_BYTES + row
    meta = K * 8
    bitmap_words = (R * T + 31) // 32

    def take(*sizes: int) -> int:
        return sum(_align(s) for s in sizes)

    regions = dict(
        high_throughput=take(
            R * 8,
            R * 8,
            2 * R * T * K * 8,
            2 * R * T * row,
            2 * R * T * combine_row,
            2 * R * T * K * 4,  # combine's extra float columns (dispatch's backward)
        ),
        low_latency=0,
        internode=0,
    )
    if low_latency:
        regions["low_latency"] = take(
            2 * E * R * 8, 2 * E * R * T_ll * message, 2 * R * 8, 2 * T_ll * K * combine_row
        )
    if num_nodes > 1:
        N = num_nodes
        regions["internode"] = take(
            N * 8,
            N * 8,
            2 * N * T * meta,
            2 * N * T * row,
            2 * N * T * combine_row,
            2 * R * T * 4,
            T * meta,
            T * row,
            N * T * combine_row,
        )
        if low_latency:
            regions["internode"] += take(T_ll * K * message, R * T_ll * min(K, E) * combine_row)
    regions["private"] = take(
        NUM_COUNTERS * 8, (E + 1) * bitmap_words * 4, (E + 1) * bitmap_words * 4, (E + 1) * 4
    )
    regions["total"] = sum(regions.values())
    return regions


def handle_bytes(layout: str, *, num_ranks: int, num_tokens: int, num_topk: int) -> int:
    """The :class:`jax_ep.Handle` arrays (int32/float32): routing, received-token list, rows."""
    rt = num_ranks * num_tokens
    rows_k = 1 if layout == "per_rank" else num_topk
    return 4 * (num_tokens * num_topk + rt + 2 * rt * num_topk + rt * rows_k + 1)


def payload_bytes(rows: int, hidden: int, dtype: Any, fp8: bool) -> tuple[int, int]:
    """(payload, scales) bytes of ``rows`` dispatched rows."""
    if fp8:
        return rows * hidden, rows * (hidden // FP8_GROUP) * 4
    return rows * hidden * np.dtype(dtype).itemsize, 0


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """What :meth:`jax_ep.Group.memory_report` returns (bytes; one rank).

    buffers: the communication buffer's regions (:func:`buffer_regions`).
    buffers_allocated: whether this group holds them (CUDA backend) or they are what a CUDA
      group of these sizes would allocate (reference backend: it allocates none).
    dispatch: one :func:`jax_ep.dispatch` call's outputs: ``x``, ``scales``, ``topk`` (per_rank's
      routing rows), ``handle``, ``total``; with ``layout``, ``capacity`` (rows, per expert for
      expert_major) and ``rows`` (all rows of ``x``).
    combine: the ``[T, H]`` output of the matching combine.
    low_latency_dispatch: one :func:`jax_ep.low_latency_dispatch` call's outputs (``x``,
      ``scales``, ``handle``, ``total``; FP8 as the op's default), 0 without ``low_latency``.
    """

    buffers: dict[str, int]
    buffers_allocated: bool
    dispatch: dict[str, Any]
    combine: int
    low_latency_dispatch: dict[str, int]
    sizes: dict[str, Any]

    @property
    def total(self) -> int:
        """Buffers + one dispatch's outputs + combine + one low-latency dispatch's outputs."""
        return (
            self.buffers["total"]
            + self.dispatch["total"]
            + self.combine
            + self.low_latency_dispatch["total"]
        )

    def __str__(self) -> str:
        s, d = self.sizes, self.dispatch
        where = "allocated by this group" if self.buffers_allocated else "a CUDA group's"
        lines = [
            f"jax_ep memory per rank: {s['num_ranks']} ranks, {s['num_tokens']} tokens/rank, "
            f"top-{s['num_topk']} of {s['num_experts']} experts, hidden {s['hidden']}",
            f"  communication buffers ({where}): {self.buffers['total'] / GIB:.2f} GiB",
            f"    high-throughput ({s['num_max_tokens_per_rank']} tokens/rank): "
            f"{self.buffers['high_throughput'] / GIB:.2f} GiB",
            f"    low-latency ({s['num_max_low_latency_tokens_per_rank']} tokens/rank): "
            f"{self.buffers['low_latency'] / GIB:.2f} GiB",
        ]
        if self.buffers["internode"]:
            lines.append(f"    internode staging: {self.buffers['internode'] / GIB:.2f} GiB")
        lines += [
            f"  dispatch output ({d['layout']}, {d['rows']} rows of "
            f"{'e4m3 + scales' if s['fp8'] else s['dtype']}): {d['total'] / GIB:.2f} GiB",
            f"  combine output: {self.combine / GIB:.3f} GiB",
        ]
        if self.low_latency_dispatch["total"]:
            lines.append(
                f"  low-latency dispatch output: {self.low_latency_dispatch['total'] / GIB:.2f} GiB"
            )
        lines.append(f"  total: {self.total / GIB:.2f} GiB")
        return "\n".join(lines)


def report(
    group,
    *,
    num_tokens: int | None = None,
    layout: str = "ragged",
    capacity: int | None = None,
    capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR,
    dtype: Any = None,
    fp8: bool = False,
    num_topk: int | None = None,
    low_latency_fp8: bool = True,
) -> MemoryReport:
    """Bytes per rank ``group`` and one call of each op will use, before running anything
    (:meth:`jax_ep.Group.memory_report`).

    The communication buffers (what the CUDA backend allocates for the group's sizes; the
    reference backend allocates none, ``buffers_allocated`` says which), the outputs of one
    :func:`jax_ep.dispatch` with these arguments (``num_tokens`` defaults to
    ``num_max_tokens_per_rank``, ``num_topk`` and ``dtype`` to the group's,
    ``layout``/``capacity``/``capacity_factor``/``fp8`` as :func:`jax_ep.dispatch`), of its
    combine, and of one low-latency dispatch (FP8 unless ``low_latency_fp8=False``) when the
    group has ``low_latency``. ``print(group.memory_report())`` gives a summary in GiB.
    """
    R, H = group.num_ranks, group.hidden
    T = group.num_max_tokens_per_rank if num_tokens is None else int(num_tokens)
    K = group.num_topk if num_topk is None else int(num_topk)
    dtype = np.dtype(group.dtype if dtype is None else dtype)
    T_ll = group.num_max_low_latency_tokens_per_rank
    e_loc = group.num_local_experts
    buffers = buffer_regions(**group.buffer_sizes())
    if capacity is None:
        capacity = dispatch_capacity(
            layout,
            num_ranks=R,
            num_tokens=T,
            num_topk=K,
            num_experts=group.num_experts,
            capacity_factor=capacity_factor,
        )
    rows = e_loc * capacity if layout == "expert_major" else capacity
    x, scales = payload_bytes(rows, H, dtype, fp8)
    topk = capacity * K * 8 if layout == "per_rank" else 0
    handle = handle_bytes(layout, num_ranks=R, num_tokens=T, num_topk=K)
    dispatch = dict(
        layout=layout,
        capacity=int(capacity),
        rows=int(rows),
        x=x,
        scales=scales,
        topk=topk,
        handle=handle,
        total=x + scales + topk + handle + 4 * (e_loc + 1),
    )
    ll = dict(x=0, scales=0, handle=0, total=0)
    if group.low_latency:
        ll_rows = e_loc * R * T_ll
        lx, ls = payload_bytes(ll_rows, H, dtype, low_latency_fp8)
        lh = 4 * (2 * ll_rows + e_loc * R * 2 + e_loc + R)
        ll = dict(x=lx, scales=ls, handle=lh, total=lx + ls + lh)
    sizes = dict(
        num_ranks=R,
        num_tokens=T,
        num_topk=K,
        num_experts=group.num_experts,
        hidden=H,
        dtype=dtype.name,
        fp8=fp8,
        num_max_tokens_per_rank=group.num_max_tokens_per_rank,
        num_max_low_latency_tokens_per_rank=T_ll,
    )
    return MemoryReport(
        buffers=buffers,
        buffers_allocated=group.buffer_bytes() > 0,
        dispatch=dispatch,
        combine=T * H * dtype.itemsize,
        low_latency_dispatch=ll,
        sizes=sizes,
    )
