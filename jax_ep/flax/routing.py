"""Router math of :class:`jax_ep.flax.MoE` as pure functions (no communication).

Conventions follow DeepSeek-V3's reference ``Gate`` and MaxText's ``RoutedMoE``
(``src/maxtext/layers/moe.py``: ``GateLogit``, ``get_topk``, ``expert_group_mask``,
``deepseek_routing``, ``deepseek_scale_weights``):

* logits: ``x @ gate.kernel (+ logit_bias)`` in float32; ``logit_bias`` is a trained linear
  bias that enters the weights (GPT-OSS's router);
* scores: ``softmax``, ``sigmoid`` or ``sqrtsoftplus`` (``sqrt(softplus(logits))``,
  DeepSeek-V4) of the logits, in float32;
* selection: top-k of ``scores + bias`` (``bias`` is the DeepSeek-V3 balancing bias; it steers
  the choice and never enters the weights); with ``n_group > 1`` only the ``topk_group``
  best expert groups are eligible, a group scored by ``group_score``: ``"top2_sum"``, the sum
  of its two best entries (DeepSeek-V3's reference and MaxText), or ``"max"``, its best entry
  (DeepSeek-V2's ``group_limited_greedy``);
* weights: the *scores* (not biased) of the chosen experts, optionally divided by their sum
  (``norm_topk_prob``), times ``routed_scaling_factor``. A softmax over all experts
  renormalised over the chosen ones equals MaxText's softmax over the chosen logits
  (Mixtral, Qwen3-MoE, GPT-OSS).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
GROUP_SCORES = ("top2_sum", "max")


class Routing(NamedTuple):
    """Result of :func:`route` for ``N`` tokens.

    topk_idx: ``[N, K]`` int32 expert ids.
    topk_weights: ``[N, K]`` float32 combine weights.
    scores: ``[N, E]`` float32 scores (before the bias), for the balancing loss.
    """

    topk_idx: jax.Array
    topk_weights: jax.Array
    scores: jax.Array


def route(
    logits: jax.Array,
    *,
    num_topk: int,
    score_func: str = "softmax",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    bias: jax.Array | None = None,
    group_score: str = "top2_sum",
    logit_bias: jax.Array | None = None,
) -> Routing:
    """Top-k routing of ``[N, E]`` gate logits (see the module docstring for the rules).

    Args:
      logits: ``[N, E]`` gate logits (computed in float32 by the caller).
      num_topk: ``K``.
      score_func: ``"softmax"``, ``"sigmoid"`` or ``"sqrtsoftplus"``.
      n_group, topk_group: group-limited routing (``E % n_group == 0``); ``n_group=1`` is off.
      norm_topk_prob: divide the chosen scores by their sum (plus 1e-20).
      routed_scaling_factor: multiplies the weights after normalisation.
      bias: ``[E]`` selection-only bias (gradient stopped), or None.
      group_score: how a group of experts is scored for group-limited routing:
        ``"top2_sum"`` (DeepSeek-V3, MaxText) or ``"max"`` (DeepSeek-V2).
      logit_bias: ``[E]`` bias added to the logits (trained; enters the weights), or None.
    Returns:
      :class:`Routing`.
    """
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    num_experts = logits.shape[-1]
    if num_experts % n_group:
        raise ValueError(f"num_experts={num_experts} is not divisible by n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if num_topk > num_experts // n_group * topk_group:
        raise ValueError(
            f"num_topk={num_topk} exceeds the {topk_group} eligible groups of "
            f"{num_experts // n_group} experts"
        )
    if group_score == "top2_sum" and n_group > 1 and num_experts // n_group < 2:
        raise ValueError(
            f"group_score='top2_sum' needs at least 2 experts per group, got "
            f"{num_experts // n_group} (num_experts={num_experts}, n_group={n_group})"
        )
    logits = logits.astype(jnp.float32)
    if logit_bias is not None:
        logits = logits + logit_bias.astype(jnp.float32)
    scores = score(logits, score_func)
    choice = scores if bias is None else scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    if n_group > 1:
        grouped = choice.reshape(choice.shape[:-1] + (n_group, num_experts // n_group))
        if group_score == "max":
            group_scores = jnp.max(grouped, axis=-1)
        else:
            group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        _, top_groups = jax.lax.top_k(group_scores, topk_group)
        keep = jnp.any(top_groups[..., :, None] == jnp.arange(n_group), axis=-2)  # [N, n_group]
        keep = jnp.repeat(keep, num_experts // n_group, axis=-1)
        choice = jnp.where(keep, choice, -jnp.inf)
    _, topk_idx = jax.lax.top_k(jax.lax.stop_gradient(choice), num_topk)
    weights = jnp.take_along_axis(scores, topk_idx, axis=-1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return Routing(topk_idx.astype(jnp.int32), weights.astype(jnp.float32), scores)


def score(logits: jax.Array, score_func: str) -> jax.Array:
    """Router scores of float32 ``logits`` (``[..., E]``)."""
    if score_func == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if score_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    if score_func == "sqrtsoftplus":  # DeepSeek-V4 (MaxText linears.py)
        return jnp.sqrt(jax.nn.softplus(logits))
    raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")


def balance_statistics(routing: Routing, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Per-expert sums over this block's tokens, to be summed over all token shards.

    Returns:
      tokens_per_expert: ``[E]`` float32, tokens that chose expert e.
      score_sum: ``[E]`` float32, ``Σ_t scores[t, e] / Σ_e' scores[t, e']``.
    """
    hits = routing.topk_idx[..., None] == jnp.arange(num_experts, dtype=jnp.int32)
    tokens_per_expert = jnp.sum(jnp.any(hits, axis=-2), axis=0, dtype=jnp.float32)
    s = routing.scores
    score_sum = jnp.sum(s / jnp.sum(s, axis=-1, keepdims=True), axis=0)
    return tokens_per_expert, score_sum


def balance_loss(
    tokens_per_expert: jax.Array, score_sum: jax.Array, num_tokens: jax.Array, num_topk: int
) -> jax.Array:
    """Switch/DeepSeek balancing loss ``Σ_e f_e P_e`` over ``num_tokens`` tokens.

    ``f_e = E * tokens_per_expert[e] / (K * N)`` (1 for a perfectly balanced router),
    ``P_e = score_sum[e] / N`` (sums to 1). The loss is 1 for a uniform router and up to E/K
    when every token puts all its score on the same K experts. Gradients reach the gate
    through ``P`` only (the counts in ``f`` are piecewise constant).
    """
    num_experts = tokens_per_expert.shape[-1]
    n = num_tokens.astype(jnp.float32)
    f = num_experts * tokens_per_expert / (num_topk * n)
    p = score_sum / n
    return jnp.sum(f * p)


def routing_bias_update(bias: jax.Array, tokens_per_expert: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3 auxiliary-loss-free balancing: ``bias + rate * sign(mean_load - load)``.

    Overloaded experts get a lower bias (chosen less), underloaded ones a higher bias.
    """
    load = tokens_per_expert.astype(jnp.float32)
    return bias + rate * jnp.sign(jnp.mean(load) - load).astype(bias.dtype)
