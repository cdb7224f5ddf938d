"""Grouped matmul on Hopper with the Pallas Mosaic-GPU kernels that ship inside jax.

``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot`` (forward, and with
``transpose_rhs=True`` the input gradient ``dy @ w[g]^T`` without a transposed copy of the
weights) and ``transposed_ragged_dot_mgpu.transposed_ragged_dot`` (the weight gradient
``a_g^T @ dy_g``, ragged over the contracted rows) are wgmma/TMA kernels in the jax wheel
(0.10 and 0.11): nothing to install, but they need an sm_90 GPU and the CUDA plugin's Mosaic
runtime. They have no VJP of their own; :func:`jax_ep.experts.matmul.masked_matmul` gives them
one. Facts that shape this module (read in the kernels' source):

* inputs and output share one dtype (bf16/f16): no float32 output;
* the forward's persistent grid has ``cdiv(rows, block_m) + G - 1`` row tiles: its cost follows
  the *buffer* rows, valid or not, so keep the dispatch capacity tight (``capacity_factor``);
* output rows past ``sum(sizes)`` are never written, and the weight-gradient kernel masks
  neighbouring groups' rows by multiplying, so padding rows must be zero in the backward
  (``masked_matmul`` does that);
* the contracted dimension must be a multiple of ``block_k``, and the weight gradient's two
  dimensions multiples of ``block_m``/``block_n``.

The tiles below are a starting point (the kernels' own sweep covers 64..192), not tuned.
"""

from __future__ import annotations

import jax

from jax_ep import _compat
from jax_ep.experts.matmul import masked_matmul

# SMEM per block: 4 stages x (128x64 + 64x128) x 2 B + a 128x128 bf16 output tile = 160 KiB.
BLOCK_MN = (128, 64)  # the first that divides the dimension
BLOCK_K = 64
STAGES = 4


def _block(dim: int) -> int | None:
    return next((b for b in BLOCK_MN if dim % b == 0), None)


def unsupported(dtype, hidden: int, intermediate: int) -> str:
    """Why the kernels cannot run the expert FFN here ('' when they can)."""
    import numpy as np

    devices = jax.devices()
    if devices[0].platform != "gpu":
        return f"the Mosaic GPU kernels need an NVIDIA GPU (devices are {devices[0].platform})"
    capability = str(getattr(devices[0], "compute_capability", ""))
    if not capability.startswith("9"):
        return f"the Mosaic GPU kernels use wgmma (sm_90); this GPU is sm_{capability}"
    if np.dtype(dtype) not in (np.dtype(jax.numpy.bfloat16), np.dtype(jax.numpy.float16)):
        return f"the Mosaic GPU kernels take bf16/f16 only, not {np.dtype(dtype).name}"
    for name, dim in (("hidden", hidden), ("intermediate", intermediate)):
        if dim % BLOCK_K or _block(dim) is None:
            return f"the Mosaic GPU kernels need {name} % {BLOCK_K} == 0, got {dim}"
    try:
        from jax.experimental.pallas.ops.gpu import (  # noqa: F401
            ragged_dot_mgpu,
            transposed_ragged_dot_mgpu,
        )
    except ImportError as e:
        return f"this jax has no Mosaic GPU ragged-dot kernels ({e})"
    return ""


def _config(n: int) -> dict:
    return dict(
        block_m=BLOCK_MN[0],
        block_n=_block(n),
        block_k=BLOCK_K,
        max_concurrent_steps=STAGES,
        grid_block_n=1,
    )


def _forward(a, w, sizes):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    y = ragged_dot_mgpu.ragged_dot(a, w, group_sizes=sizes, **_config(w.shape[2]))
    # Pallas outputs vary over no mesh axis; inside shard_map they must vary like the inputs
    return _compat.match_varying(y, a, w, sizes)[0]


def _backward(a, w, sizes, dy):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    da = ragged_dot_mgpu.ragged_dot(
        dy, w, group_sizes=sizes, transpose_rhs=True, **_config(w.shape[1])
    )
    cfg = _config(dy.shape[1])
    cfg["block_m"] = _block(a.shape[1])
    dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(a, dy, group_sizes=sizes, **cfg)
    # Pallas outputs vary over no mesh axis: give them their inputs' (masked_matmul then
    # matches the primals')
    return _compat.match_varying(da, dy, w)[0], _compat.match_varying(dw, a, dy)[0]


ragged_matmul = masked_matmul(_forward, _backward, "ragged")
