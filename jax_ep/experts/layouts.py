"""Moving expert rows between the ragged and the expert_major layout (local gathers).

An exchange that only produces the ragged layout (the baselines) can still feed an expert
path that computes on expert_major, and back. Rows that do not fit the target are dropped:
their outputs are zero, which is what a dropped selection contributes to combine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.rows import take_rows


def ragged_to_expert_major(x: jax.Array, sizes: jax.Array, capacity: int):
    """``[rows, D]`` grouped by expert → (``[G, capacity, D]``, kept ``[G]``, dropped ``[]``).

    Rows past ``kept[g]`` are zero.
    """
    num_groups = sizes.shape[0]
    offsets = jnp.cumsum(sizes) - sizes
    slot = jnp.arange(capacity, dtype=jnp.int32)
    src = jnp.where(slot[None, :] < sizes[:, None], offsets[:, None] + slot[None, :], -1)
    out = take_rows(x, src.reshape(-1)).reshape(num_groups, capacity, x.shape[-1])
    kept = jnp.minimum(sizes, capacity).astype(jnp.int32)
    return out, kept, jnp.sum(sizes - kept, dtype=jnp.int32)


def expert_major_to_ragged(y: jax.Array, sizes: jax.Array, num_rows: int) -> jax.Array:
    """Inverse of :func:`ragged_to_expert_major`: ``[G, C, D]`` → ``[num_rows, D]``.

    Row ``offset[g] + c`` takes slot ``c`` of expert ``g``; rows of slots ``>= C`` (dropped)
    and rows past ``sum(sizes)`` are zero.
    """
    num_groups, capacity, hidden = y.shape
    ends = jnp.cumsum(sizes)
    row = jnp.arange(num_rows, dtype=jnp.int32)
    group = jnp.searchsorted(ends, row, side="right").astype(jnp.int32)
    g = jnp.minimum(group, num_groups - 1)
    slot = row - (ends[g] - sizes[g])
    src = jnp.where((group < num_groups) & (slot < capacity), g * capacity + slot, -1)
    return take_rows(y.reshape(num_groups * capacity, hidden), src)
