"""FP8 (e4m3) quantisation used by FP8 dispatch: the definition the kernels follow.

One float32 scale per 128 channels of a token. ``scale`` is the dequantisation
multiplier (``x ≈ q * scale``), as in DeepEP:

* ``amax = max(|x[group]|, 1e-4)`` over the 128 channels, in float32;
* plain scales: ``scale = amax * f32(1/448)`` and ``q = cast_e4m3(x * (448 / amax))``
  (a multiply by the rounded reciprocal, not a division: XLA rewrites division by a
  constant that way, and the kernels must agree with it bit for bit);
* power-of-two scales (``round_scale=True``, UE8M0-compatible): ``scale`` is
  the smallest power of two ``>= amax * f32(1/448)`` (found from the float's bits, so
  no log2 rounding can move it) and ``q = cast_e4m3(x * (1 / scale))``.

The remaining divisions are IEEE float32 divisions; the cast rounds to nearest even and
saturates at ±448 (it can only overshoot by rounding, never by range).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0
FP8_INV_MAX = 0.002232142857142857  # 1/448, rounds to float32 0x3B124925
GROUP = 128
AMAX_FLOOR = 1e-4


def quantize(x: jax.Array, *, round_scale: bool = False) -> tuple[jax.Array, jax.Array]:
    """``[..., hidden]`` → (``[..., hidden]`` float8_e4m3fn, ``[..., hidden/128]`` float32)."""
    hidden = x.shape[-1]
    if hidden % GROUP:
        raise ValueError(f"fp8 quantisation needs hidden % {GROUP} == 0, got hidden={hidden}")
    g = x.astype(jnp.float32).reshape(*x.shape[:-1], hidden // GROUP, GROUP)
    amax = jnp.maximum(jnp.max(jnp.abs(g), axis=-1), jnp.float32(AMAX_FLOOR))
    if round_scale:
        scale = _pow2_ceil(amax * jnp.float32(FP8_INV_MAX))
        inv = jnp.float32(1.0) / scale
    else:
        scale = amax * jnp.float32(FP8_INV_MAX)
        inv = jnp.float32(FP8_MAX) / amax
    q = jnp.clip(g * inv[..., None], -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return q.reshape(x.shape), scale


def _pow2_ceil(v: jax.Array) -> jax.Array:
    """Smallest power of two >= v, for positive normal float32 ``v``."""
    bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
    exponent = bits & jnp.uint32(0x7F800000)
    exact = (bits & jnp.uint32(0x007FFFFF)) == 0
    up = jnp.where(exact, exponent, exponent + jnp.uint32(0x00800000))
    return jax.lax.bitcast_convert_type(up, jnp.float32)


def dequantize(q: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Inverse of :func:`quantize`: ``q * scale`` per 128-channel group, cast to ``dtype``."""
    hidden = q.shape[-1]
    g = q.astype(jnp.float32).reshape(*q.shape[:-1], hidden // GROUP, GROUP)
    return (g * scales[..., None]).reshape(q.shape).astype(dtype)
