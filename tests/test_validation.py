"""Bad input fails at trace time with a clear error naming the argument."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import Runner

import jax_ep
from jax_ep.transports import nvshmem_bootstrap

E, K, T, H = 8, 2, 4, 128


@pytest.fixture(scope="module")
def runner():
    return Runner("reference", 2, "shard_map")


@pytest.fixture(scope="module")
def group(runner):
    return runner.group(
        num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T, low_latency=True
    )


def trace(runner, fn, *args):
    """Traces fn per rank under shard_map (errors surface at trace time)."""
    mesh = runner.mesh

    def per_rank(*a):
        return fn(*[v[0] for v in a])

    f = jax.shard_map(
        per_rank,
        mesh=mesh,
        in_specs=jax.sharding.PartitionSpec("ep"),
        out_specs=jax.sharding.PartitionSpec("ep"),
    )
    return jax.eval_shape(f, *[jax.ShapeDtypeStruct((2,) + a.shape, a.dtype) for a in args])


X = jnp.zeros((T, H), jnp.bfloat16)
IDX = jnp.zeros((T, K), jnp.int32)
W = jnp.zeros((T, K), jnp.float32)


@pytest.mark.parametrize(
    "args,kwargs,err,match",
    [
        ((X.astype(jnp.int32), IDX, W), {}, TypeError, "x must have dtype"),
        ((X[0], IDX, W), {}, ValueError, r"x must be \[num_tokens, hidden\]"),
        ((X, IDX.astype(jnp.float32), W), {}, TypeError, "topk_idx must be an integer"),
        ((X, IDX[:2], W), {}, ValueError, "topk_idx has 2 tokens but x has 4"),
        ((X, IDX, W[:, :1]), {}, ValueError, "topk_weights shape"),
        ((X[:, :100], IDX, W), {"fp8": True}, ValueError, "hidden % 128"),
        ((X, IDX, W), {"layout": "bogus"}, ValueError, "layout must be one of"),
        ((X, IDX, W), {"capacity": 0}, ValueError, "capacity must be a positive int"),
        ((X, IDX, W), {"on_overflow": "drop"}, ValueError, "on_overflow"),
        ((X, IDX, W), {"dequantize": True}, ValueError, "dequantize=True only makes sense"),
    ],
)
def test_dispatch_argument_errors(runner, group, args, kwargs, err, match):
    with pytest.raises(err, match=match):
        trace(runner, lambda x, i, w: jax_ep.dispatch(x, i, w, group=group, **kwargs).counts, *args)


def test_missing_axis(group):
    with pytest.raises(ValueError, match="must run per rank inside jax.shard_map"):
        jax.eval_shape(lambda x, i, w: jax_ep.dispatch(x, i, w, group=group), X, IDX, W)


def test_axis_size_mismatch(runner):
    other = jax_ep.Group(
        jax.sharding.Mesh(np.array(jax.devices("cpu")[:4]), ("ep",)),
        "ep",
        num_experts=E,
        num_topk=K,
        hidden=H,
        num_max_tokens_per_rank=T,
        backend="reference",
    )
    with pytest.raises(ValueError, match="created for 4 ranks"):
        trace(runner, lambda x, i, w: jax_ep.dispatch(x, i, w, group=other).counts, X, IDX, W)


def test_group_errors():
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:4]), ("ep",))
    with pytest.raises(ValueError, match="not divisible by the EP axis size 4"):
        jax_ep.Group(mesh, "ep", num_experts=6, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    with pytest.raises(ValueError, match="is not an axis of the mesh"):
        jax_ep.Group(mesh, "expert", num_experts=8, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    with pytest.raises(ValueError, match="backend must be one of"):
        jax_ep.Group(
            mesh,
            "ep",
            num_experts=8,
            num_topk=K,
            hidden=H,
            num_max_tokens_per_rank=T,
            backend="tpu",
        )
    with pytest.raises(ValueError, match="num_topk must be a positive int"):
        jax_ep.Group(mesh, "ep", num_experts=8, num_topk=0, hidden=H, num_max_tokens_per_rank=T)
    with pytest.raises(ValueError, match="Config.timeout_s"):
        jax_ep.Config(timeout_s=0)


def test_transport_options():
    with pytest.raises(ValueError, match="Config.transport must be one of"):
        jax_ep.Config(transport="mpi")
    with pytest.raises(ValueError, match="NVSHMEM_"):
        jax_ep.Config(transport="nvshmem", nvshmem_env={"IB_SL": "3"})
    cfg = jax_ep.Config(transport="nvshmem", nvshmem_env={"NVSHMEM_IB_SL": 3})
    assert cfg.nvshmem_env == (("NVSHMEM_IB_SL", "3"),)
    hash(cfg)  # still a frozen, hashable config
    traffic = jax_ep.Config(
        transport="nvshmem", ib_service_level=5, ib_traffic_class=106, ibgda=True
    ).nvshmem_environment()
    assert traffic == {
        "NVSHMEM_IB_SL": "5",
        "NVSHMEM_IB_TRAFFIC_CLASS": "106",
        "NVSHMEM_IB_ENABLE_IBGDA": "1",
    }
    with pytest.raises(ValueError, match=r"ib_service_level must be in \[0, 15\]"):
        jax_ep.Config(transport="nvshmem", ib_service_level=16)
    env = nvshmem_bootstrap.heap_env(1 << 20, cfg.nvshmem_environment())
    assert int(env["NVSHMEM_SYMMETRIC_SIZE"]) > 1 << 20
    assert env["NVSHMEM_DISABLE_NVLS"] == "1" and env["NVSHMEM_IB_SL"] == "3"
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:1]), ("ep",))
    with pytest.raises(ValueError, match="loopback runs every rank in one process"):
        jax_ep.Group(
            mesh,
            "ep",
            num_experts=8,
            num_topk=K,
            hidden=H,
            num_max_tokens_per_rank=T,
            loopback=2,
            config=jax_ep.Config(transport="nvshmem"),
        )


def test_node_layout():
    """Ranks per node: Config.node_size (checked against hosts), or the runs of one host."""
    hosts = ["a", "a", "b", "b"]
    assert nvshmem_bootstrap.node_size(hosts, 0) == 2
    assert nvshmem_bootstrap.node_size(hosts, 1) == 1  # virtual nodes inside a host
    assert nvshmem_bootstrap.node_size(["a"] * 4, 0) == 4
    with pytest.raises(ValueError, match="does not divide"):
        nvshmem_bootstrap.node_size(hosts, 3)
    with pytest.raises(ValueError, match="must share a host"):
        nvshmem_bootstrap.node_size(hosts, 4)
    with pytest.raises(ValueError, match="contiguous run"):
        nvshmem_bootstrap.node_size(["a", "b", "a", "b"], 0)
    with pytest.raises(ValueError, match="contiguous run"):
        nvshmem_bootstrap.node_size(["a", "a", "a", "b"], 0)
    with pytest.raises(ValueError, match="with transport='nvshmem'"):
        jax_ep.Config(node_size=2)
    with pytest.raises(ValueError, match="node_size must be >= 0"):
        jax_ep.Config(transport="nvshmem", node_size=-1)


@pytest.mark.skipif(importlib.util.find_spec("nvshmem") is not None, reason="nvshmem4py present")
def test_nvshmem_missing_is_a_clear_error():
    assert "pip install nvshmem4py-cu13" in nvshmem_bootstrap.missing_reason()
    with pytest.raises(RuntimeError, match="needs NVSHMEM: nvshmem4py is not installed"):
        nvshmem_bootstrap.initialize(1 << 20)


def test_combine_shape_errors(runner, group):
    def fn(x, i, w):
        out = jax_ep.dispatch(x, i, w, group=group, layout="ragged")
        return jax_ep.combine(out.x[:-1], out.handle, group=group)

    with pytest.raises(ValueError, match="y has shape"):
        trace(runner, fn, X, IDX, W)

    def fn2(x, i, w):
        out = jax_ep.dispatch(x, i, w, group=group, layout="per_rank")
        return jax_ep.combine(out.x, out.handle, w, group=group)

    with pytest.raises(ValueError, match="unweighted sum"):
        trace(runner, fn2, X, IDX, W)


def test_low_latency_ops_are_forward_only(runner, group):
    def loss(x, i, w):
        out = jax_ep.low_latency_dispatch(x, i, group=group, fp8=False)
        return jnp.sum(out.x.astype(jnp.float32))

    with pytest.raises(NotImplementedError, match="low_latency_dispatch is forward-only"):
        trace(runner, lambda x, i, w: jax.grad(loss)(x.astype(jnp.float32), i, w), X, IDX, W)


def test_low_latency_too_many_tokens(runner, group):
    with pytest.raises(ValueError, match="num_max_low_latency_tokens_per_rank=4"):
        trace(
            runner,
            lambda x, i, w: (
                jax_ep.low_latency_dispatch(
                    jnp.concatenate([x, x]), jnp.concatenate([i, i]), group=group
                ).counts
            ),
            X,
            IDX,
            W,
        )
