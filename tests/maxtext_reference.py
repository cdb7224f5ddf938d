"""MaxText's routed MoE written out in plain JAX, dense (every expert on every token), as the
reference for tests/test_maxtext_interop.py. No MaxText import: the formulas are transcribed.

Source: AI-Hypercomputer/maxtext at commit e591f30cbbf217ed67ef71263ec0538239f9c3b8
(2026-08-22):

* ``src/maxtext/layers/moe.py``: ``GateLogit.__call__`` (score function, then the bias;
  ``pre_bias_logits`` only for ``deepseek3``/``deepseek4`` model names), ``RoutedMoE.get_topk``
  (DeepSeek-V3/V4 routing by model name; ``deepseek_scale_weights`` for the ``deepseek`` and
  ``deepseek4`` decoder blocks, else a softmax over the chosen logits and ``norm_topk_prob``),
  ``expert_group_mask`` (a group scored by the sum of its two best biased scores),
  ``deepseek_routing``, ``deepseek_scale_weights``, ``apply_ffn_activation`` (GPT-OSS's clamped
  GLU, DeepSeek-V4's clipped SwiGLU), ``sparse_matmul``'s ``gmm_up`` (``wi_0_bias``/``wi_1_bias``
  after the up-projections) and ``wo_bias`` after the down-projection;
* ``src/maxtext/layers/linears.py``: ``_convert_to_activation_function`` (``sqrtsoftplus`` =
  ``sqrt(softplus(x))``, other names from ``flax.linen``) and ``MlpBlock`` (the shared expert
  of ``RoutedAndSharedMoE``: ``act(x @ wi_0) * (x @ wi_1) @ wo``, no clipping);
* ``src/maxtext/configs/models/*.yml``: the per-model settings in :data:`CONFIGS`.

DeepSeek-V2's group-limited greedy routing (MaxText does not group for ``deepseek2``) follows
DeepSeek-V2's reference ``MoEGate`` (``topk_method="group_limited_greedy"``: a group is scored
by its best expert), in :func:`deepseek2_group_limited`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Config:
    """The MaxText config keys the routed MoE reads (base.yml defaults)."""

    model_name: str
    decoder_block: str
    num_experts: int
    num_experts_per_tok: int
    routed_score_func: str = ""
    routed_bias: bool = False
    n_routing_groups: int = -1
    topk_routing_group: int = -1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    mlp_activations: tuple[str, str] = ("silu", "linear")
    mlp_activations_limit: float = -1.0
    mlp_bias: bool = False
    shared_experts: int = 0


def _activation(name: str):
    if name == "linear":
        return lambda x: x
    if name == "sqrtsoftplus":
        return lambda x: jnp.sqrt(jax.nn.softplus(x))
    return {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid, "softmax": jax.nn.softmax}[name]


def gate(cfg: Config, p: dict, x):
    """``GateLogit``: (logits after the score function and the bias, pre-bias logits or None)."""
    out = x @ p["gate"]["kernel"]
    if cfg.routed_score_func:
        out = _activation(cfg.routed_score_func)(out)
    pre_bias = out if cfg.model_name.startswith(("deepseek3", "deepseek4")) else None
    if cfg.routed_bias:
        out = out + p["gate"]["bias"]
    return out, pre_bias


def expert_group_mask(cfg: Config, gate_logits):
    grouped = gate_logits.reshape(gate_logits.shape[:-1] + (cfg.n_routing_groups, -1))
    top2, _ = jax.lax.top_k(grouped, k=2)
    group_scores = jnp.sum(top2.astype(jnp.float32), axis=-1)
    _, group_idx = jax.lax.top_k(group_scores, k=cfg.topk_routing_group)
    mask = jnp.sum(jax.nn.one_hot(group_idx, cfg.n_routing_groups, dtype=jnp.float32), axis=-2)
    per_group = cfg.num_experts // cfg.n_routing_groups
    mask = jnp.broadcast_to(mask[..., None], mask.shape + (per_group,))
    return mask.reshape(mask.shape[:-2] + (cfg.num_experts,))


def get_topk(cfg: Config, gate_logits, pre_bias):
    """``RoutedMoE.get_topk``: (weights, indices) ``[N, K]``."""
    if cfg.model_name.startswith(("deepseek3", "deepseek4")):
        mask = 1 if cfg.n_routing_groups == -1 else expert_group_mask(cfg, gate_logits)
        _, idx = jax.lax.top_k(
            jnp.where(mask > 0, gate_logits, -jnp.inf), k=cfg.num_experts_per_tok
        )
        weights = jnp.take_along_axis(pre_bias, idx, axis=-1)
    else:
        weights, idx = jax.lax.top_k(gate_logits, cfg.num_experts_per_tok)
    if cfg.decoder_block in ("deepseek", "deepseek4"):  # deepseek_scale_weights
        if cfg.routed_score_func in ("sigmoid", "sqrtsoftplus"):
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
    else:
        weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, idx


def ffn_activation(cfg: Config, h0, h1):
    """``RoutedMoE.apply_ffn_activation``."""
    act = _activation(cfg.mlp_activations[0])
    limit = cfg.mlp_activations_limit
    if cfg.decoder_block == "gpt_oss":
        h0 = jnp.clip(h0, min=None, max=limit)
        h1 = jnp.clip(h1, min=-limit, max=limit)
        return h0 * act(h0 * 1.702) * (h1 + 1)
    if cfg.decoder_block in ("deepseek", "deepseek4") and limit > 0.0:
        h0 = jnp.clip(h0, min=None, max=limit)
        h1 = jnp.clip(h1, min=-limit, max=limit)
    return act(h0) * h1


def routed_moe(cfg: Config, p: dict, x):
    """``RoutedMoE.__call__`` for ``x`` ``[N, D]``: every expert on every token, then
    ``Σ_k w[t, k] * expert_{idx[t, k]}(x[t])``."""
    weights, idx = get_topk(cfg, *gate(cfg, p, x))
    h0 = jnp.einsum("nd,edf->enf", x, p["wi_0"])
    h1 = jnp.einsum("nd,edf->enf", x, p["wi_1"])
    if cfg.mlp_bias:
        h0 = h0 + p["wi_0_bias"][:, None, :]
        h1 = h1 + p["wi_1_bias"][:, None, :]
    out = jnp.einsum("enf,efd->end", ffn_activation(cfg, h0, h1), p["wo"])
    if cfg.mlp_bias:
        out = out + p["wo_bias"][:, None, :]
    chosen = out[idx, jnp.arange(x.shape[0])[:, None]]  # [N, K, D]
    return jnp.einsum("nk,nkd->nd", weights.astype(jnp.float32), chosen)


def shared_mlp(cfg: Config, p: dict, x):
    """``MlpBlock`` with ``mlp_activations``: ``act(x @ wi_0) * (x @ wi_1) @ wo``."""
    act = _activation(cfg.mlp_activations[0])
    h = act(x @ p["wi_0"]["kernel"]) * _activation(cfg.mlp_activations[1])(x @ p["wi_1"]["kernel"])
    return h @ p["wo"]["kernel"]


def routed_and_shared(cfg: Config, params: dict, x):
    """``RoutedAndSharedMoE``: ``MoeBlock_0`` plus ``shared_experts`` (or the routed block
    alone when ``params`` has no ``MoeBlock_0``)."""
    if "MoeBlock_0" not in params:
        return routed_moe(cfg, params, x)
    return routed_moe(cfg, params["MoeBlock_0"], x) + shared_mlp(cfg, params["shared_experts"], x)


def deepseek2_group_limited(p: dict, x, *, num_topk, n_group, topk_group, scaling):
    """DeepSeek-V2's ``group_limited_greedy``: softmax scores, groups scored by their best
    expert, top-k inside the ``topk_group`` best groups, weights = scores * scaling."""
    scores = jax.nn.softmax(x @ p["gate"]["kernel"], axis=-1)
    n, e = scores.shape
    group_scores = scores.reshape(n, n_group, -1).max(-1)
    _, group_idx = jax.lax.top_k(group_scores, topk_group)
    mask = jnp.zeros((n, n_group)).at[jnp.arange(n)[:, None], group_idx].set(1.0)
    mask = jnp.repeat(mask, e // n_group, axis=-1)
    weights, idx = jax.lax.top_k(jnp.where(mask > 0, scores, 0.0), num_topk)
    weights = weights * scaling
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, p["wi_0"])) * jnp.einsum(
        "nd,edf->enf", x, p["wi_1"]
    )
    out = jnp.einsum("enf,efd->end", h, p["wo"])
    return jnp.einsum("nk,nkd->nd", weights, out[idx, jnp.arange(n)[:, None]])
