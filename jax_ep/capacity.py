"""How many rows a dispatch output holds: the capacity model, in one place.

Every output of :func:`jax_ep.dispatch` has a static shape, so its rows are fixed when the
program is traced, before anyone knows how the router will split the tokens. The model:

* the *balanced load* is what a rank (ragged) or an expert (expert_major) receives when every
  expert gets the same share of the ``R * T * K`` selections of the group:
  ``T * K`` rows per rank, ``R * T * K / E`` rows per expert;
* ``capacity_factor`` scales it: rows = ``ceil(capacity_factor * balanced)``, never more than
  the *worst case* (every selection that can reach this rank, which never drops):
  ``R * T * min(K, E_loc)`` rows per rank (ragged), ``R * T`` rows per expert (expert_major);
* ``capacity_factor=None`` asks for the worst case;
* per_rank holds one row per received token: the worst case ``R * T`` by default (its rows
  do not grow with top-k, so there is no factor to apply).

Selections past the capacity are dropped and counted (``DispatchOut.num_dropped``;
``on_overflow="error"`` fails the step instead). The default factor, 2, holds twice the
balanced load: with routing as uneven as a freshly initialised or well balanced router gives,
nothing drops, and the README's DeepSeek-V3 example (EP=8, 4096 tokens per rank, top-8 of 256,
hidden 7168) gets 0.88 GiB of expert rows per rank in either expert layout instead of the worst
case's 3.5 GiB (ragged) or 14 GiB (expert_major). A badly balanced router drops: watch
``num_dropped``, or raise the factor.
"""

from __future__ import annotations

import fractions
import math

import jax

from jax_ep import _compat
from jax_ep.handles import LAYOUTS

DEFAULT_CAPACITY_FACTOR = 2.0


def worst_case_rows(
    layout: str, *, num_ranks: int, num_tokens, num_topk: int, num_experts: int
) -> int:
    """Rows that never drop: per rank (ragged, per_rank) or per expert (expert_major)."""
    if layout == "ragged":
        return num_ranks * num_tokens * min(num_topk, num_experts // num_ranks)
    return num_ranks * num_tokens


def _ceil_scaled(count, scale: fractions.Fraction):
    """``ceil(count * scale)`` for an int or a symbolic dimension (``jax.export``)."""
    if not jax.export.is_symbolic_dim(count):
        return math.ceil(int(count) * scale)
    return (count * scale.numerator + scale.denominator - 1) // scale.denominator


def dispatch_capacity(
    layout: str,
    *,
    num_ranks: int,
    num_tokens,
    num_topk: int,
    num_experts: int,
    capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR,
):
    """Static rows of a dispatch output (per expert for expert_major, else per rank).

    ``capacity_factor`` over the balanced load (module docstring), at most the worst case;
    ``None`` = the worst case. per_rank ignores the factor (always the worst case).
    ``num_tokens`` may be a symbolic dimension.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    sizes = dict(
        num_ranks=num_ranks, num_tokens=num_tokens, num_topk=num_topk, num_experts=num_experts
    )
    worst = worst_case_rows(layout, **sizes)
    if capacity_factor is None or layout == "per_rank":
        return worst
    if not capacity_factor > 0:
        raise ValueError(
            f"capacity_factor must be > 0 (or None: never drop), got {capacity_factor}"
        )
    # the factor as an exact fraction, so a symbolic token count stays an integer expression
    factor = fractions.Fraction(capacity_factor).limit_denominator(1 << 16)
    if layout == "ragged":
        scale = factor * num_topk
    else:
        scale = factor * fractions.Fraction(num_ranks * num_topk, num_experts)
    rows = _ceil_scaled(num_tokens, scale)
    if jax.export.is_symbolic_dim(rows):
        return _compat.min_dim(worst, rows)
    return max(1, min(worst, rows))
