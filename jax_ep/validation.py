"""Trace-time checks: bad input fails in Python with the argument's name, before any kernel runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import mesh_axes
from jax_ep.handles import LAYOUTS

PAYLOAD_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _dtype_name(d) -> str:
    return np.dtype(d).name


def check_tokens(x: jax.Array, name: str = "x") -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be [num_tokens, hidden] on each rank, got shape {x.shape}")
    if isinstance(x.shape[0], int) and x.shape[0] == 0:
        # every output has a static shape sized from the token count; an empty call would
        # have no rows to size them by (a symbolic count is at least 1)
        raise ValueError(
            f"{name} has 0 tokens (shape {x.shape}): every rank must pass at least one token per "
            "call; pad with a token whose topk_idx row is all -1 (masked: it is sent nowhere "
            "and combines to zeros)"
        )
    if x.dtype not in [np.dtype(d) for d in PAYLOAD_DTYPES]:
        allowed = ", ".join(_dtype_name(d) for d in PAYLOAD_DTYPES)
        raise TypeError(f"{name} must have dtype {allowed}; got {_dtype_name(x.dtype)}")


def check_routing(
    topk_idx: jax.Array,
    topk_weights: jax.Array | None,
    num_tokens: int | None,
) -> tuple[jax.Array, jax.Array | None]:
    """Validate and canonicalise routing: ``topk_idx`` → int32, ``topk_weights`` → float32."""
    if topk_idx.ndim != 2:
        raise ValueError(f"topk_idx must be [num_tokens, num_topk], got shape {topk_idx.shape}")
    if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise TypeError(
            f"topk_idx must be an integer array (expert ids, -1 = masked), "
            f"got {_dtype_name(topk_idx.dtype)}"
        )
    if num_tokens is not None and topk_idx.shape[0] != num_tokens:
        raise ValueError(f"topk_idx has {topk_idx.shape[0]} tokens but x has {num_tokens}")
    if topk_idx.shape[1] < 1:
        raise ValueError("topk_idx must have at least one column")
    topk_idx = topk_idx.astype(jnp.int32)
    if topk_weights is not None:
        if topk_weights.shape != topk_idx.shape:
            raise ValueError(
                f"topk_weights shape {topk_weights.shape} must equal "
                f"topk_idx shape {topk_idx.shape}"
            )
        if not jnp.issubdtype(topk_weights.dtype, jnp.floating):
            raise TypeError(
                f"topk_weights must be floating point, got {_dtype_name(topk_weights.dtype)}"
            )
        topk_weights = topk_weights.astype(jnp.float32)
    return topk_idx, topk_weights


def check_num_experts(num_experts: int, num_ranks: int) -> None:
    if not isinstance(num_experts, (int, np.integer)) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % num_ranks:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the EP axis size {num_ranks}"
        )


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_capacity(capacity, name: str = "capacity"):
    """A positive static int, or a symbolic dimension (``jax.export`` with symbolic tokens)."""
    if jax.export.is_symbolic_dim(capacity):
        return capacity
    if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool) or capacity <= 0:
        raise ValueError(f"{name} must be a positive int (static), got {capacity!r}")
    return int(capacity)


def check_fp8(hidden: int, fp8: bool) -> None:
    if fp8 and hidden % 128:
        raise ValueError(
            f"fp8 dispatch needs hidden % 128 == 0 (one scale per 128 channels), "
            f"got hidden={hidden}"
        )


def check_on_overflow(on_overflow: str) -> None:
    if on_overflow not in ("report", "error"):
        raise ValueError(f"on_overflow must be 'report' or 'error', got {on_overflow!r}")


def check_group(group, op: str) -> None:
    # imported here: jax_ep.group imports this module
    from jax_ep.group import Group

    if not isinstance(group, Group):
        raise TypeError(
            f"jax_ep.{op} needs group=jax_ep.Group(mesh, axis_name, num_experts=..., ...), "
            f"created once outside jit; got group={group!r}"
        )


def axis_size_or_raise(axis_name, op: str) -> int:
    """The EP axis size (the product over a tuple of axes), or a clear error when the op runs
    outside a ``shard_map``/``vmap`` that binds every axis of it."""
    unbound = [n for n in mesh_axes.names(axis_name) if n not in mesh_axes.bound(n)]
    if unbound:
        which = repr(unbound[0]) if len(unbound) == 1 else repr(tuple(unbound))
        raise ValueError(
            f"jax_ep.{op} must run per rank inside jax.shard_map (or jax.vmap) that binds the EP "
            f"axis {axis_name!r}; {which} is not bound here"
        )
    return jax.lax.axis_size(axis_name)
