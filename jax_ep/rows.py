"""Row gathers and padding shared by the specification and the gradient rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def take_rows(rows: jax.Array, index: jax.Array) -> jax.Array:
    """``rows[index]`` with zeros where ``index < 0``."""
    got = jnp.take(rows, jnp.maximum(index, 0), axis=0)
    mask = (index >= 0).reshape(index.shape + (1,) * (rows.ndim - 1))
    return jnp.where(mask, got, jnp.zeros((), rows.dtype))


def pad_rows(a: jax.Array, n: int, fill=0) -> jax.Array:
    """First ``n`` rows of ``a``, padded with ``fill`` if ``a`` is shorter."""
    if a.shape[0] >= n:
        return a[:n]
    pad = jnp.full((n - a.shape[0],) + a.shape[1:], fill, a.dtype)
    return jnp.concatenate([a, pad], axis=0)
