"""Misuse fails with one clear error, the same whichever backend runs (issue #19).

Trace-time misuse (bad group, call larger than the group, bad Config) is checked before
any backend code, so the tests trace it on the reference backend and on a group that
lowers as the CUDA backend (no GPU needed: nothing runs). Run-time misuse (expert ids
out of range, rows dropped with ``on_overflow="error"``) fails the step on the reference
backend through :mod:`jax_ep.checks`; the CUDA backend finds the same ids on the device
(tests/test_cuda_runtime.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import Runner, make_routing, make_tokens

import jax_ep
from jax_ep import checks
from jax_ep.ordering import OrderChain

E, K, T, H, R = 8, 2, 4, 128, 2
P = jax.sharding.PartitionSpec


def _group(backend: str, **kw) -> jax_ep.Group:
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:R]), ("ep",))
    sizes = dict(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    group = jax_ep.Group(mesh, "ep", backend="reference", **(sizes | kw))
    if backend == "cuda-lowering":  # ops trace as the CUDA backend's calls
        group.backend, group.order = "cuda", OrderChain()
    return group


def _trace(group, fn, *shapes):
    """Traces ``fn`` per rank under shard_map over ``group``'s mesh (nothing runs)."""
    f = jax.shard_map(
        lambda *a: fn(*[v[0] for v in a]), mesh=group.mesh, in_specs=P("ep"), out_specs=P("ep")
    )
    return jax.eval_shape(f, *[jax.ShapeDtypeStruct((R,) + s, d) for s, d in shapes])


def _x(t=T, h=H, dtype=jnp.bfloat16):
    return ((t, h), dtype)


def _idx(t=T, k=K):
    return ((t, k), jnp.int32)


def _w(t=T, k=K):
    return ((t, k), jnp.float32)


BACKENDS = ["reference", "cuda-lowering"]

# ---------------------------------------------------------------------------
# the group's limits: the same check on every backend, before backend code
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens_is_a_clear_error(backend):
    group = _group(backend, low_latency=True)
    ops = {
        "dispatch": lambda x, i, w: jax_ep.dispatch(x, i, w, group=group).counts,
        "low_latency_dispatch": lambda x, i, w: jax_ep.low_latency_dispatch(x, i, group=group).x,
    }
    for op in ops.values():
        with pytest.raises(ValueError, match="x has 0 tokens .* pad with a token"):
            _trace(group, op, _x(t=0), _idx(t=0), _w(t=0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_experts_per_token_than_experts_works(backend):
    """top-k above the number of experts (K=4 of E=2): the extra slots repeat experts, and
    the reference backend gives a result (the CUDA backend runs the same code path)."""
    if backend != "reference":
        pytest.skip("runs the step: the reference backend on CPU")
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:1]), ("ep",))
    group = jax_ep.Group(
        mesh,
        "ep",
        num_experts=2,
        num_topk=4,
        hidden=H,
        num_max_tokens_per_rank=T,
        backend="reference",
        loopback=2,
    )
    x = jnp.ones((2, T, H), jnp.bfloat16)
    idx = jnp.tile(jnp.array([0, 1, 0, 1], jnp.int32), (2, T, 1))
    w = jnp.full((2, T, 4), 0.25, jnp.float32)

    def layer(x, i, w):
        out = jax_ep.dispatch(x, i, w, group=group)
        return jax_ep.combine(out.x, out.handle, group=group)

    y = jax.vmap(layer, axis_name="ep")(x, idx, w)
    np.testing.assert_allclose(np.asarray(y, np.float32), 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_larger_than_group(backend):
    group = _group(backend)
    with pytest.raises(ValueError, match=r"hidden 256 > hidden=128"):
        _trace(
            group,
            lambda x, i, w: jax_ep.dispatch(x, i, w, group=group).counts,
            _x(h=256),
            _idx(),
            _w(),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_tokens_than_group(backend):
    group = _group(backend)
    with pytest.raises(ValueError, match=r"8 tokens > num_max_tokens_per_rank=4"):
        _trace(
            group,
            lambda x, i, w: jax_ep.dispatch(x, i, w, group=group).counts,
            _x(t=8),
            _idx(t=8),
            _w(t=8),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_above_group(backend):
    group = _group(backend)
    with pytest.raises(ValueError, match=r"top-k 3 > num_topk=2"):
        _trace(
            group,
            lambda x, i, w: jax_ep.dispatch(x, i, w, group=group).counts,
            _x(),
            _idx(k=3),
            _w(k=3),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_needs_low_latency_group(backend):
    group = _group(backend)
    with pytest.raises(ValueError, match="created without low_latency=True"):
        _trace(
            group,
            lambda x, i: jax_ep.low_latency_dispatch(x, i, group=group, fp8=False).counts,
            _x(),
            _idx(),
        )


# ---------------------------------------------------------------------------
# group=None and other non-groups
# ---------------------------------------------------------------------------


def test_dispatch_group_none():
    group = _group("reference")
    with pytest.raises(TypeError, match=r"jax_ep.dispatch needs group=jax_ep.Group"):
        _trace(
            group, lambda x, i, w: jax_ep.dispatch(x, i, w, group=None).counts, _x(), _idx(), _w()
        )


def test_combine_group_none():
    group = _group("reference")

    def fn(x, i, w):
        out = jax_ep.dispatch(x, i, w, group=group)
        return jax_ep.combine(out.x, out.handle, group=None)

    with pytest.raises(TypeError, match=r"jax_ep.combine needs group=jax_ep.Group"):
        _trace(group, fn, _x(), _idx(), _w())


def test_get_dispatch_layout_not_a_group():
    with pytest.raises(TypeError, match=r"jax_ep.get_dispatch_layout needs group=jax_ep.Group"):
        jax_ep.get_dispatch_layout(jnp.zeros((T, K), jnp.int32), group="ep")
    with pytest.raises(ValueError, match=r"needs num_experts and num_ranks \(or group=\)"):
        jax_ep.get_dispatch_layout(jnp.zeros((T, K), jnp.int32), group=None)


def test_low_latency_group_none():
    group = _group("reference", low_latency=True)
    with pytest.raises(TypeError, match=r"jax_ep.low_latency_dispatch needs group="):
        _trace(
            group, lambda x, i: jax_ep.low_latency_dispatch(x, i, group=None).counts, _x(), _idx()
        )


def test_low_latency_combine_group_none():
    group = _group("reference", low_latency=True)

    def fn(x, i, w):
        out = jax_ep.low_latency_dispatch(x, i, group=group, fp8=False)
        return jax_ep.low_latency_combine(out.x, i, w, out.handle, group=None)

    with pytest.raises(TypeError, match=r"jax_ep.low_latency_combine needs group="):
        _trace(group, fn, _x(), _idx(), _w())


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def test_config_num_sms_must_be_int():
    with pytest.raises(TypeError, match=r"Config.num_sms must be an int, got 2.5"):
        jax_ep.Config(num_sms=2.5)


def test_config_timeout_must_be_a_number():
    with pytest.raises(TypeError, match=r"Config.timeout_s must be a number of seconds"):
        jax_ep.Config(timeout_s="1")


# ---------------------------------------------------------------------------
# run time: expert ids out of range, dropped rows (reference backend; both run modes)
# ---------------------------------------------------------------------------

MODES = ["shard_map", "loopback"]
BAD_IDS = [E, -2]


def _bad_routing(bad: int):
    idx, w = make_routing("random", R, T, K, E)
    idx = np.array(idx)
    idx[1, 2, 1] = bad  # rank 1, token 2, k 1
    return jnp.asarray(idx), w


def _expect_bad_id(bad: int):
    return pytest.raises(
        Exception, match=rf"topk_idx\[2, 1\] = {bad} on rank 1 is out of range \[-1, 8\)"
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", BAD_IDS)
def test_dispatch_bad_expert_id(mode, bad):
    runner = Runner("reference", R, mode)
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    idx, w = _bad_routing(bad)
    with _expect_bad_id(bad):
        runner.run(
            lambda x, i, w: jax_ep.dispatch(x, i, w, group=group).x, make_tokens(R, T, H), idx, w
        )


@pytest.mark.parametrize("mode", MODES)
def test_low_latency_dispatch_bad_expert_id(mode):
    runner = Runner("reference", R, mode)
    group = runner.group(
        num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T, low_latency=True
    )
    idx, _ = _bad_routing(E)
    with _expect_bad_id(E):
        runner.run(
            lambda x, i: jax_ep.low_latency_dispatch(x, i, group=group, fp8=False).x,
            make_tokens(R, T, H),
            idx,
        )


@pytest.mark.parametrize("jit", [True, False])
def test_get_dispatch_layout_bad_expert_id(jit):
    idx = jnp.array([[0, 1], [2, 9]], jnp.int32)
    f = lambda i: jax_ep.get_dispatch_layout(i, E, num_ranks=R).num_tokens_per_expert  # noqa: E731
    run = jax.jit(f) if jit else f
    with pytest.raises(Exception, match=r"topk_idx\[1, 1\] = 9 is out of range \[-1, 8\)"):
        # the reference backend fails this call; the CUDA layout kernel finds the id on the
        # device and the next jax_ep call on that device reports it
        for _ in range(2):
            np.asarray(run(idx))


def test_good_expert_ids_pass():
    runner = Runner("reference", R, "shard_map")
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    idx, w = make_routing("masked", R, T, K, E)  # -1 is masking, not an error
    runner.run(
        lambda x, i, w: jax_ep.dispatch(x, i, w, group=group).counts, make_tokens(R, T, H), idx, w
    )


def _overflow_loss(group, capacity):
    def loss(x, i, w):
        out = jax_ep.dispatch(x, i, w, group=group, capacity=capacity, on_overflow="error")
        return jnp.sum(jax_ep.combine(out.x, out.handle, group=group).astype(jnp.float32))

    return loss


def test_grad_through_on_overflow_error(caplog):
    """The safety option works in training: the gradient runs, and the check still fires."""
    runner = Runner("reference", R, "shard_map")
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    x = make_tokens(R, T, H, jnp.float32)
    idx, w = make_routing("random", R, T, K, E)
    loss = _overflow_loss(group, capacity=R * T)  # the worst case: nothing dropped
    g = runner.run(lambda x, i, w: jax.grad(loss)(x, i, w), x, idx, w)
    assert g.shape == x.shape and np.isfinite(g).all() and np.abs(g).sum() > 0
    loss = _overflow_loss(group, capacity=2)
    with pytest.raises(Exception, match="rows did not fit") as info:
        runner.run(lambda x, i, w: jax.grad(loss)(x, i, w), x, idx, w)
    # the first thing on stderr is the sentence (logged by jax_ep before JAX's report)
    first = caplog.records[0]
    assert first.name == "jax_ep" and "rows did not fit" in first.getMessage()
    # the text XLA raises ends with the one sentence (the lines before are XLA's and the
    # callback's traceback); jax_ep.checks.message recovers it
    assert checks.message(info.value).startswith(
        "jax_ep.dispatch(layout='expert_major', capacity=2): "
    )
    assert checks.message(info.value).endswith(
        "rows did not fit and were dropped (summed over the EP ranks; on_overflow='error'); "
        "raise capacity/capacity_factor, or pass capacity_factor=None for the worst case "
        "(never drops)"
    )


def test_host_checks_off_exports_with_concrete_shapes():
    """Config(host_checks=False) leaves the host check out, so jax.export can serialise."""
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:1]), ("ep",))
    group = jax_ep.Group(
        mesh,
        "ep",
        num_experts=E,
        num_topk=K,
        hidden=H,
        num_max_tokens_per_rank=T,
        backend="reference",
        config=jax_ep.Config(host_checks=False),
    )
    f = jax.jit(
        jax.shard_map(
            lambda x, i, w: jax_ep.dispatch(x, i, w, group=group, layout="ragged").x,
            mesh=mesh,
            in_specs=P("ep"),
            out_specs=P("ep"),
        )
    )
    shapes = [jax.ShapeDtypeStruct(s, d) for s, d in (_x(), _idx(), _w())]
    jax.export.deserialize(jax.export.export(f)(*shapes).serialize())
