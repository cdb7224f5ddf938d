"""The expert FFN of an MoE layer (a gated FFN, SwiGLU by default) over grouped matmuls, with
one path per platform.

Paths (:data:`PATHS`), each a grouped matmul with a backward that never reads padding rows
(:mod:`jax_ep.experts.matmul`):

=============  ============  ===================================================================
path           layout        what runs
=============  ============  ===================================================================
``ragged_dot``  ragged        ``jax.lax.ragged_dot``. Native on TPU and fine on CPU; XLA:GPU
                              (jax 0.10/0.11) expands it into a dense masked product per
                              expert: 117 ms for 512 tokens at 256 experts, out of memory
                              (112 GiB asked) at 4096 (H200, issue #15).
``einsum``      expert_major  one batched ``einsum`` over ``[E_loc, capacity, D]`` (cuBLAS on
                              GPU). Every slot is computed, so its cost follows the capacity
                              (``capacity_factor`` × the balanced load): 5.6 ms forward at 512
                              tokens, 256 experts, 2× capacity (H200, docs/experts.md).
``mosaic``      ragged        jax's own Pallas Mosaic-GPU grouped GEMM kernels (Hopper, bf16/f16;
                              :mod:`jax_ep.experts.mosaic`); cost follows the buffer rows.
``tokamax``     ragged        ``tokamax.ragged_dot`` when tokamax is installed (optional;
                              :mod:`jax_ep.experts.tokamax_path`).
=============  ============  ===================================================================

``path="auto"`` picks :data:`DEFAULT_PATHS` for the platform (the first one that can run the
dtype, sizes and load): on Hopper GPUs the Mosaic kernels when an expert receives at least
:data:`MIN_ROWS_PER_EXPERT` rows on average, else the batched einsum; elsewhere ``ragged_dot``
(measured by ``python -m jax_ep.bench --mode layer``; docs/experts.md has the numbers and why).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.experts import matmul as _matmul
from jax_ep.experts import mosaic as _mosaic
from jax_ep.experts import tokamax_path as _tokamax
from jax_ep.experts.activation import ACTIVATIONS, Activation
from jax_ep.experts.layouts import expert_major_to_ragged, ragged_to_expert_major

SWIGLU = Activation()
PATHS = ("ragged_dot", "einsum", "mosaic", "tokamax")
LAYOUTS = {
    "ragged_dot": "ragged",
    "einsum": "expert_major",
    "mosaic": "ragged",
    "tokamax": "ragged",
}
# Per platform, in order of preference; "auto" takes the first path that can run.
DEFAULT_PATHS = {
    "gpu": ("mosaic", "einsum"),
    "cpu": ("ragged_dot",),
    "tpu": ("ragged_dot",),
}

# "auto" takes a path only from this many rows per expert on average (balanced load). The
# Mosaic kernels' persistent grid adds a tile per expert and computes whole 128-row tiles: on
# the H200 (benchmarks/2026-12-03_NVIDIA-H200_layer_ep1.json, forward+backward) they beat the
# einsum by 15% at 1024 and 2048 rows per expert and lose by 40-90% at 16 and 128.
MIN_ROWS_PER_EXPERT = {"mosaic": 512}

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_PATHS",
    "MIN_ROWS_PER_EXPERT",
    "Activation",
    "LAYOUTS",
    "PATHS",
    "expert_ffn",
    "expert_major_to_ragged",
    "ragged_to_expert_major",
    "resolve",
    "swiglu",
    "unsupported",
]


def unsupported(path: str, *, dtype, hidden: int, intermediate: int) -> str:
    """Why ``path`` cannot run the expert FFN on this process's devices ('' when it can)."""
    if path not in PATHS:
        raise ValueError(f"expert path must be 'auto' or one of {PATHS}, got {path!r}")
    if path == "mosaic":
        return _mosaic.unsupported(dtype, hidden, intermediate)
    if path == "tokamax":
        return _tokamax.unsupported()
    return ""


def resolve(
    path: str = "auto",
    *,
    dtype,
    hidden: int,
    intermediate: int,
    platform: str | None = None,
    rows_per_expert: float | None = None,
) -> str:
    """The path to run: ``path`` itself (checked), or for ``"auto"`` the platform's default.

    ``rows_per_expert``: the average rows a local expert receives (``R * T * K / E`` at the
    balanced load); paths with a :data:`MIN_ROWS_PER_EXPERT` are taken only when it is given
    and reaches it.
    """
    if path != "auto":
        why = unsupported(path, dtype=dtype, hidden=hidden, intermediate=intermediate)
        if why:
            raise ValueError(f"jax_ep expert path {path!r} cannot run here: {why}")
        return path
    platform = platform or jax.devices()[0].platform
    for candidate in DEFAULT_PATHS.get(platform, ("ragged_dot",)):
        least = MIN_ROWS_PER_EXPERT.get(candidate)
        if least is not None and (rows_per_expert is None or rows_per_expert < least):
            continue
        if not unsupported(candidate, dtype=dtype, hidden=hidden, intermediate=intermediate):
            return candidate
    return "ragged_dot"


def _matmul_for(path: str):
    return {
        "ragged_dot": _matmul.ragged_dot,
        "einsum": _matmul.einsum,
        "mosaic": _mosaic.ragged_matmul,
        "tokamax": _tokamax.ragged_matmul,
    }[path]


def _row_bias(b: jax.Array, sizes: jax.Array, x: jax.Array) -> jax.Array:
    """Per-expert bias ``[G, N]`` → per row of ``x``'s layout, float32, zero on padding rows.

    Selected (not multiplied) to zero, so the bias's gradient never sums a padding row's
    cotangent (which may be NaN: :mod:`jax_ep.experts.matmul`).
    """
    b = b.astype(jnp.float32)
    if x.ndim == 3:  # expert_major [G, C, D]
        return jnp.where(_matmul.expert_major_row_mask(x, sizes), b[:, None, :], 0.0)
    ends = jnp.cumsum(sizes)
    row = jnp.arange(x.shape[0], dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), sizes.shape[0] - 1)
    return jnp.where(_matmul.ragged_row_mask(x, sizes), b[group], 0.0)


def swiglu(
    x: jax.Array,
    group_sizes: jax.Array,
    wi_0: jax.Array,
    wi_1: jax.Array,
    wo: jax.Array,
    *,
    path: str,
    dtype=None,
    activation: Activation = SWIGLU,
    bias: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """``act(x @ wi_0[e] + b0[e], x @ wi_1[e] + b1[e]) @ wo[e] + bo[e]`` for the rows of each
    local expert ``e`` (SwiGLU, ``silu(h0) * h1``, by default).

    Args:
      x: rows in the layout of ``path`` (:data:`LAYOUTS`): ragged ``[rows, D]`` grouped by
        expert, or expert_major ``[E_loc, C, D]``. Padding rows may hold anything.
      group_sizes: ``[E_loc]`` int32 valid rows per expert.
      wi_0, wi_1: ``[E_loc, D, F]``; wo: ``[E_loc, F, D]`` (any float dtype: cast to ``dtype``).
      path: one of :data:`PATHS` (resolve ``"auto"`` with :func:`resolve` first).
      dtype: compute dtype (default ``x``'s): matmul inputs and outputs, with float32
        accumulation; the activation and the biases are applied in float32.
      activation: the gated activation (:class:`Activation`: SwiGLU, GeGLU, GPT-OSS's, clipping).
      bias: None or per-expert biases ``(b0 [E_loc, F], b1 [E_loc, F], bo [E_loc, D])``
        (MaxText's ``wi_0_bias``/``wi_1_bias``/``wo_bias``).
    Returns:
      ``x``'s layout with ``D`` columns, ``dtype``; padding rows are unspecified.
    """
    layout = "expert_major" if x.ndim == 3 else "ragged"
    if LAYOUTS[path] != layout:
        raise ValueError(f"expert path {path!r} computes on {LAYOUTS[path]} rows, got {layout}")
    dtype = dtype or x.dtype
    mm = _matmul_for(path)
    x = x.astype(dtype)
    h0 = mm(x, wi_0.astype(dtype), group_sizes).astype(jnp.float32)
    h1 = mm(x, wi_1.astype(dtype), group_sizes).astype(jnp.float32)
    if bias is not None:
        h0 = h0 + _row_bias(bias[0], group_sizes, x)
        h1 = h1 + _row_bias(bias[1], group_sizes, x)
    h = activation(h0, h1).astype(dtype)
    out = mm(h, wo.astype(dtype), group_sizes)
    if bias is None:
        return out
    return (out.astype(jnp.float32) + _row_bias(bias[2], group_sizes, x)).astype(dtype)


def expert_ffn(
    x: jax.Array,
    group_sizes: jax.Array,
    wi_0: jax.Array,
    wi_1: jax.Array,
    wo: jax.Array,
    *,
    path: str,
    dtype=None,
    capacity: int | None = None,
    activation: Activation = SWIGLU,
    bias: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`swiglu` (same ``activation``/``bias``) on rows in either layout, converting to
    the path's layout and back.

    ``capacity``: rows per expert when ragged rows must become expert_major (``einsum``);
    rows that do not fit are dropped (zero output) and counted. Returns ``(y in x's layout,
    dropped [] int32)``.
    """
    ffn = dict(activation=activation, bias=bias)
    layout = "expert_major" if x.ndim == 3 else "ragged"
    want = LAYOUTS[path]
    no_drops = jnp.int32(0)
    if want == layout:
        return swiglu(x, group_sizes, wi_0, wi_1, wo, path=path, dtype=dtype, **ffn), no_drops
    if want == "expert_major":
        if capacity is None:
            raise ValueError("ragged rows for an expert_major path need a capacity (rows/expert)")
        em, kept, dropped = ragged_to_expert_major(x, group_sizes, capacity)
        y = swiglu(em, kept, wi_0, wi_1, wo, path=path, dtype=dtype, **ffn)
        return expert_major_to_ragged(y, group_sizes, x.shape[0]), dropped
    # expert_major rows for a ragged path: pack the valid rows of every expert
    num_groups, slots, hidden = x.shape
    rows = expert_major_to_ragged(x, group_sizes, num_groups * slots)
    y = swiglu(rows, group_sizes, wi_0, wi_1, wo, path=path, dtype=dtype, **ffn)
    back, _, _ = ragged_to_expert_major(y, group_sizes, slots)
    return back, no_drops
