"""The gated activation of an expert FFN: ``act(h0, h1)`` with ``h0 = x @ wi_0``,
``h1 = x @ wi_1``, as MaxText's ``RoutedMoE.apply_ffn_activation`` writes it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu", "gpt_oss")


@dataclasses.dataclass(frozen=True)
class Activation:
    """``act(h0, h1)``, computed in the dtype it is given (float32 in :func:`swiglu`):

    * ``"silu"``: ``silu(h0) * h1`` (SwiGLU); ``"gelu"``: ``gelu(h0) * h1`` (tanh form, as
      ``flax.linen.gelu``; GeGLU);
    * ``"gpt_oss"``: ``h0 * sigmoid(alpha * h0) * (h1 + 1)``;
    * ``limit``: first ``h0 = min(h0, limit)``, ``h1 = clip(h1, -limit, limit)`` (GPT-OSS: 7,
      DeepSeek-V4: 10).
    """

    name: str = "silu"
    limit: float | None = None
    alpha: float = 1.702

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.name!r}")

    def __call__(self, h0: jax.Array, h1: jax.Array) -> jax.Array:
        if self.limit is not None:
            h0 = jnp.clip(h0, min=None, max=self.limit)
            h1 = jnp.clip(h1, min=-self.limit, max=self.limit)
        if self.name == "gpt_oss":
            return h0 * jax.nn.sigmoid(h0 * self.alpha) * (h1 + 1)
        gate = jax.nn.silu if self.name == "silu" else jax.nn.gelu
        return gate(h0) * h1

    def unclipped(self) -> Activation:
        """The same without the limit (MaxText's shared-expert ``MlpBlock`` clips nothing)."""
        return dataclasses.replace(self, limit=None)
