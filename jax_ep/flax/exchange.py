"""How :class:`jax_ep.flax.MoE` moves tokens to its experts and back: one interface, several
transports (jax_ep, and the plain-JAX baselines of :mod:`jax_ep.baselines`).

An *exchange* runs per EP rank inside ``shard_map``. ``dispatch`` returns the tokens in the
ragged layout (rows grouped by local expert plus ``[E_loc]`` group sizes, the input of
``jax.lax.ragged_dot``), or in another layout of ``layouts`` when asked
(``layout="expert_major"``: ``[E_loc, C, H]``); ``combine`` takes the expert outputs in that
same layout and returns ``Σ_k w[t, k] * y[row(t, k)]`` per home token. Exchanges are frozen
dataclasses: they are static configuration of the module (hashable, part of the jit cache key).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax

import jax_ep
from jax_ep import baselines
from jax_ep.capacity import DEFAULT_CAPACITY_FACTOR


class ExpertRows(NamedTuple):
    """Tokens at the experts, ragged layout.

    x: ``[rows, H]`` grouped by local expert (ragged), or ``[E_loc, C, H]`` (expert_major);
      rows past the valid ones are unspecified.
    group_sizes: ``[E_loc]`` int32 valid rows per local expert.
    num_dropped: ``[]`` int32 selections this rank could not take (capacity).
    state: what ``combine`` needs (a pytree).
    """

    x: jax.Array
    group_sizes: jax.Array
    num_dropped: jax.Array
    state: Any


class Exchange:
    """Interface of a token exchange (subclass it for another transport).

    ``name`` labels it in reports; ``layouts`` are the layouts ``dispatch`` can produce
    (``"ragged"`` always; others are requested with ``dispatch(..., layout=...)``).
    """

    name: ClassVar[str] = "exchange"
    layouts: ClassVar[tuple[str, ...]] = ("ragged",)

    def dispatch(self, x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array) -> ExpertRows:
        """``x`` ``[T, H]``, ``topk_idx``/``topk_weights`` ``[T, K]`` → :class:`ExpertRows`."""
        raise NotImplementedError

    def combine(self, y: jax.Array, topk_weights: jax.Array, rows: ExpertRows) -> jax.Array:
        """``y`` shaped like ``rows.x`` → ``[T, H]`` weighted sum over each token's experts."""
        raise NotImplementedError


def _rows_for(capacity_factor: float | None, num_tokens: int, num_topk: int) -> int | None:
    """Receive rows per rank for a capacity factor (``factor`` × the balanced ``T * K``)."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * num_tokens * num_topk))


@dataclasses.dataclass(frozen=True, eq=False)
class JaxEpExchange(Exchange):
    """:func:`jax_ep.dispatch` (``layout="ragged"`` or ``"expert_major"``, ``capacity_factor``
    as :func:`jax_ep.dispatch`) and :func:`jax_ep.combine` on ``group``.

    ``fp8=True`` sends FP8 (e4m3 + per-128-channel scales) and returns rows dequantised to the
    input dtype, with a straight-through gradient (``dequantize=True``).
    """

    group: jax_ep.Group
    capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR
    fp8: bool = False
    layouts: ClassVar[tuple[str, ...]] = ("ragged", "expert_major")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"jax_ep[{self.group.backend}]"

    def dispatch(self, x, topk_idx, topk_weights, layout: str = "ragged"):
        out = jax_ep.dispatch(
            x,
            topk_idx,
            topk_weights,
            group=self.group,
            layout=layout,
            capacity_factor=self.capacity_factor,
            fp8=self.fp8,
            dequantize=self.fp8,
        )
        return ExpertRows(out.x, out.counts, out.num_dropped, out.handle)

    def combine(self, y, topk_weights, rows):
        # the weights travelled with dispatch (handle.recv_weights) and get their gradient
        # through it; passing them again would cost one more exchange
        return jax_ep.combine(y, rows.state, group=self.group)


@dataclasses.dataclass(frozen=True)
class RaggedAllToAllExchange(Exchange):
    """MaxText's path: :func:`jax_ep.baselines.ragged_all_to_all_dispatch` / ``_combine``.

    ``emulate=True`` replaces ``jax.lax.ragged_all_to_all`` by a dense emulation (XLA:CPU has
    no ragged_all_to_all, jax-ml/jax#34755).
    """

    axis_name: Any
    num_experts: int
    capacity_factor: float | None = None
    emulate: bool = False
    name: ClassVar[str] = "ragged_all_to_all"

    def dispatch(self, x, topk_idx, topk_weights):
        out = baselines.ragged_all_to_all_dispatch(
            x,
            topk_idx,
            axis_name=self.axis_name,
            num_experts=self.num_experts,
            buffer_rows=_rows_for(self.capacity_factor, *topk_idx.shape),
            emulate=self.emulate,
        )
        return ExpertRows(*out)

    def combine(self, y, topk_weights, rows):
        return baselines.ragged_all_to_all_combine(
            y, topk_weights, rows.state, axis_name=self.axis_name, emulate=self.emulate
        )


@dataclasses.dataclass(frozen=True)
class AllToAllExchange(Exchange):
    """Padded ``jax.lax.all_to_all`` with a static per-destination capacity
    (:func:`jax_ep.baselines.all_to_all_dispatch`)."""

    axis_name: Any
    num_experts: int
    capacity_factor: float | None = None
    name: ClassVar[str] = "all_to_all"

    def dispatch(self, x, topk_idx, topk_weights):
        num_ranks = jax.lax.axis_size(self.axis_name)
        num_tokens, num_topk = topk_idx.shape
        capacity = baselines.all_to_all_capacity(
            num_ranks, num_tokens, num_topk, self.num_experts // num_ranks, self.capacity_factor
        )
        out = baselines.all_to_all_dispatch(
            x, topk_idx, axis_name=self.axis_name, num_experts=self.num_experts, capacity=capacity
        )
        return ExpertRows(*out)

    def combine(self, y, topk_weights, rows):
        return baselines.all_to_all_combine(y, topk_weights, rows.state, axis_name=self.axis_name)
