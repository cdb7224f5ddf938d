"""Custom VJPs of dispatch and combine against ``jax.grad`` of a dense, communication-free MoE.

The model: expert ``e`` maps a token row ``v`` to ``s_e * (v * v + v)``; the layer
output is ``Σ_k w[t,k] * s_{e_k} * g(x[t])``. Gradients of x and of the router
weights must match the dense formulation (float32, rtol 1e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HAS_KERNELS
from harness import (
    Runner,
    make_routing,
    make_tokens,
    runner_params,
    toy_dense_moe,
    toy_moe_layer,
)

import jax_ep

E, K, T, H = 16, 4, 6, 128

RUNNERS = [
    Runner("reference", 1, "shard_map"),
    Runner("reference", 4, "shard_map"),
    Runner("reference", 2, "loopback"),
]
if HAS_KERNELS:
    RUNNERS += [Runner("cuda", 2, "loopback", "gpu"), Runner("cuda", 1, "shard_map", "gpu")]


@pytest.mark.parametrize("runner", RUNNERS, ids=[str(r) for r in RUNNERS])
@pytest.mark.parametrize("layout", ["expert_major", "ragged", "per_rank"])
def test_gradients_match_dense(runner, layout):
    R = runner.num_ranks
    idx, w = make_routing("masked", R, T, K, E, seed=3)
    idx[..., 1] = idx[..., 0]  # include a repeated expert: its row is shared by two k
    x = make_tokens(R, T, H, jnp.float32) * 0.5
    group = runner.group(
        num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T, dtype=jnp.float32
    )
    cot = np.random.default_rng(0).standard_normal((R, T, H)).astype(np.float32)

    def fn(x, idx, w, cot):
        def loss(x, w):
            return jnp.sum(toy_moe_layer(x, idx, w, group, layout, False) * cot)

        return jax.grad(loss, argnums=(0, 1))(x, w)

    gx, gw = runner.run(fn, x, idx, w, cot)
    want_gx, want_gw = jax.grad(
        lambda x, w: jnp.sum(toy_dense_moe(x, idx, w, E, False) * cot), (0, 1)
    )(x, w)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, want_gw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("runner", runner_params(RUNNERS, "reference-shard_map-R4"))
def test_fp8_dequantize_is_straight_through(runner):
    """Forward within FP8 tolerance; d/dx exactly the dense gradient (the cast is skipped)."""
    R = runner.num_ranks
    idx, w = make_routing("random", R, T, K, E, seed=5)
    x = make_tokens(R, T, H, jnp.bfloat16)
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    cot = np.random.default_rng(1).standard_normal((R, T, H)).astype(np.float32)

    def fn(x, idx, w, cot):
        def loss(x, w):
            y = toy_moe_layer(x, idx, w, group, "expert_major", True).astype(jnp.float32)
            return jnp.sum(y * cot), y

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, w)

    (gx, gw), y = runner.run(fn, x, idx, w, cot)
    xf = x.astype(np.float32)
    want = np.asarray(toy_dense_moe(xf, idx, w, E, True))
    # e4m3 keeps 3 mantissa bits (rel. error <= 2^-4) plus bf16 rounding of partials
    np.testing.assert_allclose(y, want, rtol=0.08, atol=0.08 * np.abs(want).max())
    want_gx = np.asarray(jax.grad(lambda x: jnp.sum(toy_dense_moe(x, idx, w, E, True) * cot))(xf))
    np.testing.assert_allclose(gx.astype(np.float32), want_gx, rtol=2e-2, atol=2e-2)
    want_gw = np.asarray(jax.grad(lambda w: jnp.sum(toy_dense_moe(xf, idx, w, E, True) * cot))(w))
    np.testing.assert_allclose(gw, want_gw, rtol=0.1, atol=0.1 * np.abs(want_gw).max())


def test_combine_weight_override_gradient():
    runner = Runner("reference", 2, "shard_map")
    idx, w = make_routing("random", 2, T, K, E, seed=7)
    x = make_tokens(2, T, H, jnp.float32)
    group = runner.group(
        num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T, dtype=jnp.float32
    )

    def fn(x, idx, w):
        def loss(w2):
            out = jax_ep.dispatch(x, idx, w, group=group, layout="ragged")
            return jnp.sum(jax_ep.combine(out.x, out.handle, w2, group=group))

        return jax.grad(loss)(w * 3)

    got = runner.run(fn, x, idx, w)
    want = np.where(idx >= 0, x.sum(-1)[..., None], 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("layout", ["expert_major", "ragged", "per_rank"])
def test_two_exchanges_forward_and_two_backward(layout, monkeypatch):
    """A training step's layer: dispatch + combine forward, and backward one cached
    dispatch (combine's) plus one combine that carries dx and the router weights'
    cotangents together (dispatch's). Counted as calls of the backend's exchanges while
    the program is traced."""
    from jax_ep.backends.reference import BACKEND

    calls = []
    for name in ("dispatch", "combine", "token_dispatch", "token_combine"):
        real = getattr(BACKEND, name)
        monkeypatch.setattr(
            BACKEND,
            name,
            lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw),
        )
    runner = Runner("reference", 4, "shard_map")
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    idx, w = make_routing("random", 4, T, K, E)
    x = make_tokens(4, T, H, jnp.float32)

    def loss(x, w, idx):
        return jnp.sum(toy_moe_layer(x, idx, w, group, layout, False))

    args = [jnp.asarray(a) for a in (x, w, idx)]
    runner.run(lambda x, w, idx: loss(x, w, idx)[None], *args)
    assert calls == ["dispatch", "combine"], calls
    calls.clear()
    runner.run(lambda x, w, idx: jax.grad(loss, argnums=(0, 1))(x, w, idx), *args)
    forward, backward = calls[:2], calls[2:]
    assert forward == ["dispatch", "combine"], calls
    assert sorted(backward) == [
        "combine" if layout != "per_rank" else "token_combine",
        "token_dispatch",
    ], calls
