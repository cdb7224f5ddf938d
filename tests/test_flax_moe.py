"""jax_ep.flax.MoE against a dense single-device MoE (same parameters, no communication).

The oracle below is written independently of the module: it runs every expert on every token
and weights the results with a dense ``[N, E]`` routing matrix, so dispatch/combine, the
ragged grouping and the expert slicing are all checked against plain matmuls.

Tolerances (``_close``: ``|got - want| <= rtol * max|want|`` elementwise):
  float32: 1e-5 (forward and gradients);
  bfloat16 compute: 2e-2 forward, 3e-2 gradients (bf16 has an 8-bit mantissa, 4e-3 per
    rounding; the module and the oracle round at different points);
  FP8 dispatch: 1e-5 against the oracle fed the same e4m3-quantised expert inputs, and 0.1
    against the unquantised oracle (e4m3 keeps 3 mantissa bits).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep.flax import MoE, routing_bias_update

D, F, FS, E, K, N = 128, 32, 16, 16, 4, 64  # hidden, expert FFN, shared FFN, experts, top-k, tokens

F32_TOL = 1e-5


def _mesh(num_ranks: int):
    if len(jax.devices()) < num_ranks:
        pytest.skip(
            f"needs {num_ranks} devices, have {len(jax.devices())} (XLA_FLAGS was set "
            "before this module could set it)"
        )
    return jax.make_mesh((num_ranks,), ("ep",), devices=jax.devices()[:num_ranks])


def _group(mesh, *, low_latency=False, tokens=N):
    return jax_ep.Group(
        mesh,
        "ep",
        num_experts=E,
        num_topk=K,
        hidden=D,
        num_max_tokens_per_rank=tokens // mesh.shape["ep"],
        low_latency=low_latency,
    )


def _tokens(mesh, seed=1, n=N):
    x = jax.random.normal(jax.random.key(seed), (n, D), jnp.float32)
    return jax.device_put(x, NamedSharding(mesh, P("ep")))


def _close(got, want, rtol, what=""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = float(np.max(np.abs(want))) or 1.0
    err = float(np.max(np.abs(got - want)))
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3g} > {rtol} * {scale:.3g}"


# ----------------------------------------------------------------------------
# the oracle
# ----------------------------------------------------------------------------


def _params(model: MoE) -> dict:
    """The module's parameters as plain host arrays, full E (no sharding)."""
    p = {
        "gate": model.gate.kernel[...],
        "wi_0": model.wi_0[...],
        "wi_1": model.wi_1[...],
        "wo": model.wo[...],
        "bias": None if model.gate.bias is None else model.gate.bias[...],
    }
    if model.shared_experts is not None:
        s = model.shared_experts
        p["shared"] = (s.wi_0[...], s.wi_1[...], s.wo[...])
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), p)


def dense_moe(
    p: dict,
    x,
    *,
    score_func="softmax",
    n_group=1,
    topk_group=1,
    norm=True,
    scale=1.0,
    aux_coef=0.0,
    dtype=jnp.float32,
    fp8=False,
):
    """Every expert on every token, weighted by a dense routing matrix. Returns (y, aux_loss)."""
    x = x.astype(dtype)
    logits = x.astype(jnp.float32) @ p["gate"].astype(jnp.float32)
    scores = jax.nn.softmax(logits) if score_func == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if p["bias"] is None else scores + p["bias"]
    if n_group > 1:
        g = choice.reshape(N, n_group, E // n_group)
        gs = jnp.sort(g, axis=-1)[..., -2:].sum(-1) if p["bias"] is not None else g.max(-1)
        rank = jnp.argsort(jnp.argsort(-gs, axis=-1), axis=-1)  # 0 = best group
        allowed = jnp.repeat(rank < topk_group, E // n_group, axis=-1)
        choice = jnp.where(allowed, choice, -jnp.inf)
    order = jnp.argsort(-jax.lax.stop_gradient(choice), axis=-1)[:, :K]
    w = jnp.take_along_axis(scores, order, axis=-1)
    if norm:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    w = w * scale
    route = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], order].add(w)

    xe = x
    if fp8:  # what FP8 dispatch hands the experts, with a straight-through gradient
        q, s = jax_ep.quantize_fp8(x)
        xe = x + jax.lax.stop_gradient(jax_ep.dequantize_fp8(q, s, dtype) - x)

    def mm(a, b, spec):
        return jnp.einsum(spec, a, b.astype(dtype), preferred_element_type=jnp.float32)

    h = jax.nn.silu(mm(xe, p["wi_0"], "nd,edf->enf")) * mm(xe, p["wi_1"], "nd,edf->enf")
    ye = mm(h.astype(dtype), p["wo"], "enf,efd->end").astype(dtype)
    y = jnp.einsum("ne,end->nd", route, ye.astype(jnp.float32))
    if "shared" in p:
        s0, s1, so = p["shared"]
        hs = jax.nn.silu(mm(x, s0, "nd,df->nf")) * mm(x, s1, "nd,df->nf")
        y = y + mm(hs.astype(dtype), so, "nf,fd->nd").astype(dtype).astype(jnp.float32)
    counts = jnp.zeros((E,), jnp.float32).at[order.reshape(-1)].add(1.0)
    probs = scores / scores.sum(-1, keepdims=True)
    aux = aux_coef * jnp.sum(E * counts / (K * N) * probs.mean(0))
    return y.astype(dtype), aux


# ----------------------------------------------------------------------------
# running the module
# ----------------------------------------------------------------------------


def _module_fwd_grad(model: MoE, x, ct, **call):
    """(y, aux_loss, d params, dx) of ``sum(y * ct) + aux_loss`` through the global call."""

    @nnx.jit
    def run(model, x):
        def loss(model, x):
            y, aux = model(x, return_aux=True, **call)
            return jnp.sum(y.astype(jnp.float32) * ct) + aux.aux_loss, (y, aux.aux_loss)

        (_, (y, aux)), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        return y, aux, grads

    y, aux, (gp, gx) = run(model, x)
    grads = {
        "gate": gp["gate"]["kernel"][...],
        "wi_0": gp["wi_0"][...],
        "wi_1": gp["wi_1"][...],
        "wo": gp["wo"][...],
        "x": gx,
    }
    if "shared_experts" in gp:
        s = gp["shared_experts"]
        grads["shared"] = (s["wi_0"][...], s["wi_1"][...], s["wo"][...])
    return y, aux, grads


@functools.partial(jax.jit, static_argnames=("cfg",))
def _dense_run(p, x, ct, cfg):
    def loss(p, x):
        y, aux = dense_moe(p, x, **dict(cfg))
        return jnp.sum(y.astype(jnp.float32) * ct) + aux, (y, aux)

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)


def _dense_fwd_grad(p, x, ct, **cfg):
    # one compile per oracle configuration, shared by the tests that use it
    x = jnp.asarray(np.asarray(x))
    (_, (y, aux)), (gp, gx) = _dense_run(p, x, ct, tuple(sorted(cfg.items())))
    grads = {"gate": gp["gate"], "wi_0": gp["wi_0"], "wi_1": gp["wi_1"], "wo": gp["wo"], "x": gx}
    if "shared" in gp:
        grads["shared"] = gp["shared"]
    return y, aux, grads


def _check_against_dense(model, mesh, cfg, rtol=F32_TOL, grad_rtol=None, call=None):
    x = _tokens(mesh)
    ct = jax.random.normal(jax.random.key(7), (N, D), jnp.float32)
    y, aux, grads = _module_fwd_grad(model, x, ct, **(call or {}))
    want_y, want_aux, want_grads = _dense_fwd_grad(_params(model), x, ct, **cfg)
    _close(y, want_y, rtol, "forward")
    _close(aux, want_aux, rtol, "aux loss")
    flat_got, flat_want = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    names = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, _), got, want in zip(names, flat_got, flat_want, strict=True):
        assert float(np.max(np.abs(np.asarray(want, np.float32)))) > 0, f"zero grad {path}"
        _close(got, want, grad_rtol or rtol, f"grad {jax.tree_util.keystr(path)}")
    return y


# ----------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------


def test_parameters_follow_maxtext_names_shapes_and_sharding():
    mesh = _mesh(4)
    model = MoE(
        D, F, E, K, group=_group(mesh), rngs=nnx.Rngs(0), shared_intermediate=FS, routing_bias=True
    )
    state = nnx.state(model, nnx.Param)
    shapes = {"/".join(map(str, path)): v.shape for path, v in nnx.to_flat_state(state)}
    assert shapes == {
        "gate/kernel": (D, E),
        "wi_0": (E, D, F),
        "wi_1": (E, D, F),
        "wo": (E, F, D),
        "shared_experts/wi_0": (D, FS),
        "shared_experts/wi_1": (D, FS),
        "shared_experts/wo": (FS, D),
    }
    # the expert dim lives on the EP axis: each device holds E/R experts
    assert model.wi_0[...].sharding.spec == P("ep", None, None)
    assert model.wi_0[...].addressable_shards[0].data.shape == (E // 4, D, F)
    assert nnx.get_partition_spec(nnx.state(model))["wo"].get_value() == P("ep", None, None)
    # the DeepSeek bias is not an nnx.Param: optimisers over nnx.Param skip it
    assert "bias" not in nnx.state(model, nnx.Param)["gate"]
    assert nnx.state(model, jax_ep.flax.RoutingBias)["gate"]["bias"][...].shape == (E,)


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
def test_matches_dense_f32(num_ranks):
    mesh = _mesh(num_ranks)
    model = MoE(
        D, F, E, K, group=_group(mesh), rngs=nnx.Rngs(0), shared_intermediate=FS, aux_loss_coef=0.01
    )
    _check_against_dense(model, mesh, dict(aux_coef=0.01))


@functools.cache
def _jax_ep_output(num_ranks: int) -> np.ndarray:
    mesh = _mesh(num_ranks)
    model = MoE(D, F, E, K, group=_group(mesh), rngs=nnx.Rngs(0), aux_loss_coef=0.01)
    return np.asarray(model(_tokens(mesh)))


@pytest.mark.parametrize("impl", ["reference", "ragged_all_to_all", "all_to_all"])
def test_impls_match_dense_and_jax_ep(impl):
    mesh = _mesh(8)
    warns = impl == "ragged_all_to_all" and jax.default_backend() == "cpu"
    with pytest.warns(UserWarning, match="34755") if warns else contextlib.nullcontext():
        model = MoE(D, F, E, K, group=_group(mesh), rngs=nnx.Rngs(0), impl=impl, aux_loss_coef=0.01)
    y = _check_against_dense(model, mesh, dict(aux_coef=0.01))
    _close(y, _jax_ep_output(8), F32_TOL, f"{impl} vs jax_ep")


@pytest.mark.parametrize(
    "impl,path", [("jax_ep", "einsum"), ("jax_ep", "ragged_dot"), ("all_to_all", "einsum")]
)
def test_expert_paths_match_dense(impl, path):
    # einsum runs on expert_major rows: jax_ep dispatches straight into that layout, the
    # baseline's ragged rows are regrouped; both against the dense oracle, values and grads
    mesh = _mesh(4)
    model = MoE(
        D,
        F,
        E,
        K,
        group=_group(mesh),
        rngs=nnx.Rngs(0),
        impl=impl,
        expert_path=path,
        aux_loss_coef=0.01,
        capacity_factor=None,
    )
    assert model.expert_path == path
    _check_against_dense(model, mesh, dict(aux_coef=0.01))


def test_expert_path_auto_is_per_platform():
    mesh = _mesh(2)
    model = MoE(D, F, E, K, group=_group(mesh), rngs=nnx.Rngs(0))
    want = "einsum" if jax.devices()[0].platform == "gpu" else "ragged_dot"
    assert model.expert_path == want
    with pytest.raises(ValueError, match="expert path"):
        MoE(D, F, E, K, group=_group(mesh), rngs=nnx.Rngs(0), expert_path="dense")


def test_deepseek_v3_routing_matches_dense():
    mesh = _mesh(8)
    model = MoE(
        D,
        F,
        E,
        K,
        group=_group(mesh),
        rngs=nnx.Rngs(0),
        score_func="sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        routing_bias=True,
        shared_intermediate=FS,
        aux_loss_coef=0.001,
        capacity_factor=None,  # group-limited routing loads half the ranks: never drop here
    )
    # a bias that really moves the selection (scores are in (0, 1))
    model.gate.bias[...] = jax.random.uniform(jax.random.key(3), (E,), minval=-0.3, maxval=0.3)
    _check_against_dense(
        model, mesh, dict(score_func="sigmoid", n_group=4, topk_group=2, scale=2.5, aux_coef=0.001)
    )


def test_bf16_matches_dense():
    mesh = _mesh(4)
    model = MoE(
        D, F, E, K, group=_group(mesh), rngs=nnx.Rngs(0), dtype=jnp.bfloat16, shared_intermediate=FS
    )
    y = _check_against_dense(model, mesh, dict(dtype=jnp.bfloat16), rtol=2e-2, grad_rtol=3e-2)
    assert y.dtype == jnp.bfloat16


def test_fp8_dispatch():
    mesh = _mesh(4)
    model = MoE(D, F, E, K, group=_group(mesh), rngs=nnx.Rngs(0), fp8=True, shared_intermediate=FS)
    # exact up to f32 rounding against experts fed the same quantised rows (straight-through)
    y = _check_against_dense(model, mesh, dict(fp8=True))
    x = _tokens(mesh)
    want, _ = dense_moe(_params(model), jnp.asarray(np.asarray(x)))
    _close(y, want, 0.1, "fp8 vs unquantised")
    assert float(np.max(np.abs(np.asarray(y) - np.asarray(want)))) > 0  # it did quantise


@pytest.mark.parametrize("num_ranks,fp8", [(2, False), (8, False), (8, True)])
def test_low_latency_matches_dense(num_ranks, fp8):
    mesh = _mesh(num_ranks)
    model = MoE(
        D,
        F,
        E,
        K,
        group=_group(mesh, low_latency=True),
        rngs=nnx.Rngs(0),
        fp8=fp8,
        low_latency=True,
        shared_intermediate=FS,
    )
    x = _tokens(mesh)
    y = jax.jit(lambda x: model(x))(x)
    want, _ = dense_moe(_params(model), jnp.asarray(np.asarray(x)), fp8=fp8)
    _close(y, want, F32_TOL, "low latency")
    if num_ranks == 2:  # the per-call switch reaches the high-throughput path, same parameters
        _close(model(x, low_latency=False), y, F32_TOL, "ll vs high-throughput")


def test_per_rank_call_inside_user_shard_map():
    mesh = _mesh(4)
    model = MoE(D, F, E, K, group=_group(mesh), rngs=nnx.Rngs(0), shared_intermediate=FS)
    x = _tokens(mesh)
    graphdef, state = nnx.split(model)
    specs = nnx.get_partition_spec(state)

    @jax.jit
    def per_rank(state, x):
        def body(state, x):
            m = nnx.merge(graphdef, state)
            assert m.wi_0[...].shape[0] == E // 4  # each rank sees its own experts
            return m(x)

        return jax.shard_map(body, mesh=mesh, in_specs=(specs, P("ep")), out_specs=P("ep"))(
            state, x
        )

    _close(per_rank(state, x), model(x), F32_TOL, "per-rank vs global")


def test_loopback_group_under_vmap_slices_its_experts():
    # virtual ranks on one device: each vmap rank holds all E experts and takes its E/R
    num_ranks = 4
    group = jax_ep.Group(
        None,
        "ep",
        num_experts=E,
        num_topk=K,
        hidden=D,
        num_max_tokens_per_rank=N // num_ranks,
        loopback=num_ranks,
        backend="reference",
    )
    model = MoE(
        D, F, E, K, group=group, rngs=nnx.Rngs(0), shared_intermediate=FS, aux_loss_coef=0.01
    )
    x = jax.random.normal(jax.random.key(1), (N, D), jnp.float32)

    @jax.jit
    def run(x):
        y, aux = jax.vmap(lambda xb: model(xb, return_aux=True), axis_name="ep")(
            x.reshape(num_ranks, N // num_ranks, D)
        )
        return y.reshape(N, D), aux.aux_loss[0]

    y, aux = run(x)
    want, want_aux = dense_moe(_params(model), x, aux_coef=0.01)
    _close(y, want, F32_TOL, "loopback")
    _close(aux, want_aux, F32_TOL, "loopback aux loss")
    with pytest.raises(ValueError, match="loopback"):
        model(x)  # no mesh to shard_map over


def test_routing_bias_load_and_update():
    mesh = _mesh(4)
    model = MoE(D, F, E, K, group=_group(mesh), rngs=nnx.Rngs(0), routing_bias=True)
    x = _tokens(mesh)
    _, aux = model(x, return_aux=True)
    model(x)
    load = np.asarray(model.expert_load[...])
    np.testing.assert_array_equal(load, 2 * np.asarray(aux.tokens_per_expert))
    assert load.sum() == 2 * N * K
    model.update_routing_bias(0.01)
    bias = np.asarray(model.gate.bias[...])
    np.testing.assert_allclose(bias, 0.01 * np.sign(load.mean() - load))
    assert np.all(np.asarray(model.expert_load[...]) == 0)
    # the update pushes load from the busiest expert towards the idlest one
    np.testing.assert_allclose(
        routing_bias_update(jnp.zeros(3), jnp.array([5.0, 1.0, 3.0]), 0.5), [-0.5, 0.5, 0.0]
    )


def test_aux_loss_is_sown():
    mesh = _mesh(2)
    model = MoE(D, F, E, K, group=_group(mesh), rngs=nnx.Rngs(0), aux_loss_coef=0.1)
    x = _tokens(mesh)
    (_, aux), sown = nnx.capture(model, nnx.Intermediate)(x, return_aux=True)
    assert float(sown["aux_loss"][0]) == pytest.approx(float(aux.aux_loss))
    model(x)  # outside nnx.capture nothing is sown (and nothing accumulates on the module)
    assert not nnx.state(model, nnx.Intermediate)
    _, want = dense_moe(_params(model), jnp.asarray(np.asarray(x)), aux_coef=0.1)
    assert float(aux.aux_loss) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("impl", ["jax_ep", "ragged_all_to_all", "all_to_all"])
def test_capacity_factor_drops_are_reported(impl):
    # (with the default capacity nothing drops: the dense comparisons above would fail)
    mesh = _mesh(4)
    emulate = jax.default_backend() == "cpu" if impl == "ragged_all_to_all" else None
    model = MoE(
        D,
        F,
        E,
        K,
        group=_group(mesh),
        rngs=nnx.Rngs(0),
        impl=impl,
        capacity_factor=0.25,
        ragged_all_to_all_emulation=emulate,
    )
    y, aux = model(_tokens(mesh), return_aux=True)
    assert 0 < int(aux.num_dropped) < N * K
    assert np.all(np.isfinite(np.asarray(y)))


def test_bad_configurations_fail_clearly():
    mesh = _mesh(2)
    group = _group(mesh)
    with pytest.raises(ValueError, match="num_experts"):
        MoE(D, F, E * 2, K, group=group, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="fp8"):
        MoE(D, F, E, K, group=group, rngs=nnx.Rngs(0), impl="all_to_all", fp8=True)
    with pytest.raises(ValueError, match="low_latency"):
        MoE(D, F, E, K, group=group, rngs=nnx.Rngs(0), impl="all_to_all", low_latency=True)
    with pytest.raises(ValueError, match="impl"):
        MoE(D, F, E, K, group=group, rngs=nnx.Rngs(0), impl="nccl")
