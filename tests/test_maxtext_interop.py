"""jax_ep.flax.MoE with MaxText's weights and settings gives MaxText's outputs and gradients.

For each model family MaxText ships (Mixtral, Qwen3-MoE, DeepSeek-V2/V3/V4, GPT-OSS; sizes
scaled down, every routing/activation/bias setting of the family's config kept), random
weights under MaxText's names are loaded with :func:`jax_ep.flax.load_maxtext_weights` and
the layer's output and the gradients of ``sum(y * ct)`` (w.r.t. ``x`` and every trained
weight) are compared with MaxText's formulas written out in plain JAX
(``tests/maxtext_reference.py``, which cites the MaxText file and commit it transcribes).
The families run on different meshes (``(data, ep)``, a tuple EP axis ``(pod, ep)``,
``(fsdp, ep, tensor)``), with and without a mesh context and with Flax's
``flax_always_shard_variable`` on and off. float32, ``|got - want| <= 1e-5 * max|want|``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax
import jax
import jax.numpy as jnp
import maxtext_reference as mt
import numpy as np
import pytest
from conftest import requires_8_devices
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep.flax import MoE, load_maxtext_weights, route

pytestmark = requires_8_devices

D, F, N = 64, 32, 64
TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Family:
    cfg: mt.Config
    options: dict  # the MoE options that reproduce it (README, "Flax" section)
    mesh: tuple  # ((name, size), ...)
    ep: str | tuple[str, ...]
    token_axes: tuple[str, ...]
    weight_scale: float = 1.0  # > 1 drives pre-activations past the clipping limit


FAMILIES = {
    "mixtral": Family(
        mt.Config("mixtral-8x7b", "mixtral", num_experts=8, num_experts_per_tok=2),
        dict(score_func="softmax", norm_topk_prob=True),
        (("data", 2), ("ep", 4)),
        "ep",
        ("data", "ep"),
    ),
    "qwen3_moe": Family(
        mt.Config("qwen3-30b-a3b", "qwen3_moe", 16, 4, norm_topk_prob=True),
        dict(score_func="softmax", norm_topk_prob=True),
        (("pod", 2), ("ep", 4)),
        ("pod", "ep"),
        ("pod", "ep"),
    ),
    "deepseek2": Family(
        mt.Config(
            "deepseek2-236b",
            "deepseek",
            16,
            4,
            routed_score_func="softmax",
            routed_scaling_factor=16.0,
            shared_experts=2,
        ),
        dict(score_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0),
        (("fsdp", 2), ("ep", 2), ("tensor", 2)),
        "ep",
        ("fsdp", "ep"),
    ),
    "deepseek3": Family(
        mt.Config(
            "deepseek3-671b",
            "deepseek",
            16,
            4,
            routed_score_func="sigmoid",
            routed_bias=True,
            n_routing_groups=4,  # 671b: 8 groups, top 4 (set on MaxText's command line)
            topk_routing_group=2,
            routed_scaling_factor=2.5,
            shared_experts=1,
        ),
        dict(
            score_func="sigmoid",
            routing_bias=True,
            n_group=4,
            topk_group=2,
            group_score="top2_sum",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        (("data", 2), ("ep", 4)),
        "ep",
        ("data", "ep"),
    ),
    "deepseek4": Family(
        mt.Config(
            "deepseek4-284b",
            "deepseek4",
            16,
            4,
            routed_score_func="sqrtsoftplus",
            routed_bias=True,
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            mlp_activations_limit=10.0,
            shared_experts=1,
        ),
        dict(
            score_func="sqrtsoftplus",
            routing_bias=True,
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            activation_limit=10.0,
        ),
        (("pod", 2), ("ep", 4)),
        ("pod", "ep"),
        ("pod", "ep"),
        weight_scale=5.0,
    ),
    "gpt_oss": Family(
        mt.Config(
            "gpt-oss-20b",
            "gpt_oss",
            16,
            4,
            routed_bias=True,
            mlp_bias=True,
            mlp_activations=("sigmoid", "linear"),
            mlp_activations_limit=7.0,
        ),
        dict(
            score_func="softmax",
            norm_topk_prob=True,
            gate_bias=True,
            mlp_bias=True,
            activation="gpt_oss",
            activation_limit=7.0,
        ),
        (("data", 2), ("ep", 4)),
        "ep",
        ("data", "ep"),
        weight_scale=4.0,
    ),
}


def _mesh(shape):
    names = tuple(n for n, _ in shape)
    sizes = tuple(s for _, s in shape)
    return jax.make_mesh(sizes, names, devices=jax.devices()[: int(np.prod(sizes))])


def _maxtext_params(cfg: mt.Config, scale: float, seed: int = 0) -> dict:
    """Random weights under MaxText's names (``RoutedAndSharedMoE`` with shared experts)."""
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    e = cfg.num_experts

    def normal(shape, fan_in):
        return jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(fan_in)

    routed = {
        "gate": {"kernel": normal((D, e), D)},
        "wi_0": normal((e, D, F), D) * scale,
        "wi_1": normal((e, D, F), D) * scale,
        "wo": normal((e, F, D), F),
    }
    if cfg.routed_bias:  # DeepSeek: a selection bias the size of the scores; GPT-OSS: logits
        width = 0.3 if cfg.model_name.startswith("deepseek") else 1.0
        routed["gate"]["bias"] = jax.random.uniform(next(keys), (e,), minval=-width, maxval=width)
    if cfg.mlp_bias:
        routed["wi_0_bias"] = normal((e, F), 1)
        routed["wi_1_bias"] = normal((e, F), 1)
        routed["wo_bias"] = normal((e, D), 1)
    if not cfg.shared_experts:
        return routed
    fs = cfg.shared_experts * F
    shared = {
        "wi_0": {"kernel": normal((D, fs), D)},
        "wi_1": {"kernel": normal((D, fs), D)},
        "wo": {"kernel": normal((fs, D), fs)},
    }
    return {"MoeBlock_0": routed, "shared_experts": shared}


def _to_layer_names(tree: dict) -> dict:
    """A MaxText-named tree (params or their gradients) → ``{layer path: array}``."""
    flat = {}
    routed = tree.get("MoeBlock_0", tree)
    for path, leaf in jax.tree_util.tree_flatten_with_path(routed)[0]:
        flat["/".join(k.key for k in path)] = leaf
    for name, sub in tree.get("shared_experts", {}).items():
        flat[f"shared_experts/{name}"] = sub["kernel"]
    return flat


def _model(fam: Family, params: dict, mesh) -> MoE:
    cfg = fam.cfg
    group = jax_ep.Group(
        mesh,
        fam.ep,
        num_experts=cfg.num_experts,
        num_topk=cfg.num_experts_per_tok,
        hidden=D,
        num_max_tokens_per_rank=N,
    )
    model = MoE(
        D,
        F,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        group=group,
        rngs=nnx.Rngs(1),
        shared_intermediate=cfg.shared_experts * F,
        **fam.options,
    )
    loaded = load_maxtext_weights(model, params)
    assert sorted(loaded) == sorted(_to_layer_names(params))
    return model


def _grads_by_name(grads: nnx.State) -> dict:
    flat = {}
    for path, v in nnx.to_flat_state(grads):
        flat["/".join(map(str, path))] = v[...] if isinstance(v, nnx.Variable) else v
    return flat


def _close(got, want, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = float(np.max(np.abs(want))) or 1.0
    err = float(np.max(np.abs(got - want)))
    assert err <= TOL * scale, f"{what}: max |diff| {err:.3g} > {TOL} * {scale:.3g}"


@contextlib.contextmanager
def _always_shard(value: bool):
    """Flax's global flag (MaxText's import turns it off), restored afterwards."""
    old = flax.config.flax_always_shard_variable
    flax.config.update("flax_always_shard_variable", value)
    try:
        yield
    finally:
        flax.config.update("flax_always_shard_variable", old)


# family -> (flax_always_shard_variable, mesh context): every family covers one combination
SETTINGS = {
    "mixtral": (True, False),
    "qwen3_moe": (False, False),
    "deepseek2": (True, True),
    "deepseek3": (False, True),
    "deepseek4": (False, False),
    "gpt_oss": (False, True),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_outputs_and_gradients_match_maxtext(family):
    fam = FAMILIES[family]
    always_shard, in_context = SETTINGS[family]
    mesh = _mesh(fam.mesh)
    params = _maxtext_params(fam.cfg, fam.weight_scale)
    x = jax.random.normal(jax.random.key(2), (N, D), jnp.float32) * 2.0
    ct = jax.random.normal(jax.random.key(3), (N, D), jnp.float32)

    def ref_loss(params, x):
        return jnp.sum(mt.routed_and_shared(fam.cfg, params, x) * ct)

    want_y = mt.routed_and_shared(fam.cfg, params, x)
    want_gp, want_gx = jax.grad(ref_loss, argnums=(0, 1))(params, x)
    if fam.cfg.mlp_activations_limit > 0:  # the clipping is exercised, not just configured
        routed = params.get("MoeBlock_0", params)
        h1 = jnp.einsum("nd,edf->enf", x, routed["wi_1"])
        assert float(jnp.max(jnp.abs(h1))) > fam.cfg.mlp_activations_limit

    context = jax.set_mesh(mesh) if in_context else contextlib.nullcontext()
    with _always_shard(always_shard), context:
        model = _model(fam, params, mesh)
        xs = jax.device_put(x, NamedSharding(mesh, P(fam.token_axes)))

        @nnx.jit
        def run(model, x):
            def loss(model, x):
                y = model(x)
                return jnp.sum(y * ct), y

            return nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)

        (_, y), (gmodel, gx) = run(model, xs)
        assert jax.typeof(y).sharding.spec == jax.typeof(xs).sharding.spec  # x's placement back
        _close(y, want_y, "forward")
        _close(gx, want_gx, "d x")
        got = _grads_by_name(nnx.state(gmodel, nnx.Param))
        want = _to_layer_names(want_gp)
        if fam.options.get("routing_bias"):
            # DeepSeek's selection bias gets no gradient (MaxText: weights from pre-bias
            # scores); here it is no nnx.Param at all
            assert float(jnp.max(jnp.abs(want.pop("gate/bias")))) == 0.0
        assert sorted(got) == sorted(want)
        for name in want:
            _close(got[name], want[name], f"d {name}")


def test_deepseek2_group_limited_routing_scores_groups_by_their_best_expert():
    """DeepSeek-V2's reference routing (group_score="max"); MaxText does not group for V2."""
    mesh = _mesh((("data", 2), ("ep", 4)))
    cfg = mt.Config("deepseek2-236b", "deepseek", 16, 4, routed_score_func="softmax")
    fam = Family(
        cfg,
        dict(
            score_func="softmax",
            norm_topk_prob=False,
            routed_scaling_factor=16.0,
            n_group=4,
            topk_group=2,
            group_score="max",
        ),
        (("data", 2), ("ep", 4)),
        "ep",
        ("data", "ep"),
    )
    params = _maxtext_params(cfg, 1.0, seed=5)
    x = jax.random.normal(jax.random.key(6), (N, D), jnp.float32) * 2.0
    model = _model(fam, params, mesh)
    got = model(jax.device_put(x, NamedSharding(mesh, P(("data", "ep")))))
    want = mt.deepseek2_group_limited(params, x, num_topk=4, n_group=4, topk_group=2, scaling=16.0)
    _close(got, want, "group-limited greedy")


def test_group_score_is_an_explicit_choice():
    """The two rules pick different groups on the same logits, and each matches its formula."""
    logits = jax.random.normal(jax.random.key(0), (256, 16), jnp.float32) * 3
    kw = dict(num_topk=2, score_func="sigmoid", n_group=4, topk_group=1)
    top2 = route(logits, group_score="top2_sum", **kw).topk_idx
    best = route(logits, group_score="max", **kw).topk_idx
    grouped = jax.nn.sigmoid(logits).reshape(256, 4, 4)
    want_top2 = jnp.argmax(jnp.sum(jnp.sort(grouped, -1)[..., -2:], -1), -1)
    want_best = jnp.argmax(jnp.max(grouped, -1), -1)
    np.testing.assert_array_equal(top2 // 4, want_top2[:, None].repeat(2, 1))
    np.testing.assert_array_equal(best // 4, want_best[:, None].repeat(2, 1))
    assert bool(jnp.any(want_top2 != want_best))
    with pytest.raises(ValueError, match="group_score"):
        route(logits, group_score="mean", **kw)


def test_natural_set_value_with_sharding_flag_off():
    """The issue's recipe: with flax_always_shard_variable off (as after importing MaxText),
    ``param.set_value(jax.device_put(w, param[...].sharding))`` keeps the weights on the mesh,
    and the layer runs, eagerly and jitted, with and without a mesh context."""
    fam = FAMILIES["mixtral"]
    mesh = _mesh(fam.mesh)
    params = _maxtext_params(fam.cfg, 1.0, seed=7)
    x = jax.random.normal(jax.random.key(8), (N, D), jnp.float32)
    want = mt.routed_moe(fam.cfg, params, x)
    with _always_shard(False):
        group = jax_ep.Group(
            mesh, "ep", num_experts=8, num_topk=2, hidden=D, num_max_tokens_per_rank=N
        )
        model = MoE(D, F, 8, 2, group=group, rngs=nnx.Rngs(0), **fam.options)
        for name in ("wi_0", "wi_1", "wo"):
            param = getattr(model, name)
            assert param[...].sharding.spec == P("ep", None, None)
            param.set_value(jax.device_put(params[name], param[...].sharding))
        model.gate.kernel.set_value(
            jax.device_put(params["gate"]["kernel"], model.gate.kernel[...].sharding)
        )
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "ep"))))
        _close(model(xs), want, "eager, no mesh context")
        _close(nnx.jit(lambda m, x: m(x))(model, xs), want, "jit, no mesh context")
        with jax.set_mesh(mesh):
            _close(model(xs), want, "eager, mesh context")
            loss, _ = nnx.value_and_grad(lambda m, x: jnp.sum(m(x)))(model, xs)
            _close(loss, jnp.sum(want), "eager value_and_grad, mesh context")


def test_eager_value_and_grad_without_mesh_context_on_an_auto_mesh():
    """Eager autodiff outside ``jax.set_mesh`` works on an Auto mesh. (On an Explicit mesh JAX
    itself needs the context for any eager grad, with or without jax_ep: its cotangent seed is
    built on the loss's mesh, "Please enter your jit into a mesh context via jax.set_mesh".)"""
    fam = FAMILIES["qwen3_moe"]
    names = tuple(n for n, _ in fam.mesh)
    mesh = jax.make_mesh(
        (2, 4), names, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:8]
    )
    params = _maxtext_params(fam.cfg, 1.0, seed=9)
    x = jax.random.normal(jax.random.key(10), (N, D), jnp.float32)
    model = _model(fam, params, mesh)
    loss, grads = nnx.value_and_grad(lambda m, x: jnp.sum(m(x)))(model, x)
    want_loss, want_g = jax.value_and_grad(lambda p: jnp.sum(mt.routed_moe(fam.cfg, p, x)))(params)
    _close(loss, want_loss, "loss")
    _close(grads["wi_0"][...], want_g["wi_0"], "d wi_0")


def test_load_maxtext_weights_errors_name_what_does_not_fit():
    fam = FAMILIES["gpt_oss"]
    mesh = _mesh(fam.mesh)
    params = _maxtext_params(fam.cfg, 1.0)
    group = jax_ep.Group(
        mesh, "ep", num_experts=16, num_topk=4, hidden=D, num_max_tokens_per_rank=N
    )
    plain = MoE(D, F, 16, 4, group=group, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"no \['gate/bias', 'wi_0_bias'.*mlp_bias"):
        load_maxtext_weights(plain, params)
    assert "wi_0_bias" not in load_maxtext_weights(plain, params, strict=False)
    full = MoE(D, F, 16, 4, group=group, rngs=nnx.Rngs(0), **fam.options)
    with pytest.raises(ValueError, match=r"lacks \['wo_bias'\]"):
        load_maxtext_weights(full, {k: v for k, v in params.items() if k != "wo_bias"})
    with pytest.raises(ValueError, match=r"wo has shape \(16, 64, 32\) in the checkpoint"):
        load_maxtext_weights(full, {**params, "wo": params["wi_0"]})
    with pytest.raises(ValueError, match="choose one"):
        MoE(D, F, 16, 4, group=group, rngs=nnx.Rngs(0), routing_bias=True, gate_bias=True)
