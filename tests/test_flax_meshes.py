"""jax_ep.flax.MoE on 2-D and 3-D meshes and over tuple EP axes, against the dense oracle of
tests/test_flax_moe.py (every expert on every token, no communication).

The tokens are split over ``data x ep`` (or ``fsdp x ep`` and replicated over ``tensor``),
the experts over the EP axis (or axes); forward, the aux loss and the gradients of every
parameter and of ``x`` must match at float32 tolerance (1e-5 of the largest value).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_8_devices
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_flax_moe import (
    F32_TOL,
    FS,
    D,
    E,
    F,
    K,
    N,
    _close,
    _dense_fwd_grad,
    _module_fwd_grad,
    _params,
    dense_moe,
)

import jax_ep
from jax_ep.flax import MoE

pytestmark = requires_8_devices

# (mesh axes and sizes, EP axis, the split of x's leading dim, MoE token_axes)
CASES = {
    "data2xep4": ((("data", 2), ("ep", 4)), "ep", ("data", "ep"), None),
    "pod2xep4-tuple": ((("pod", 2), ("ep", 4)), ("pod", "ep"), ("pod", "ep"), None),
    # tokens over fsdp x ep, replicated over tensor: read from x's sharding...
    "fsdp2xep2xtensor2": ((("fsdp", 2), ("ep", 2), ("tensor", 2)), "ep", ("fsdp", "ep"), None),
    # ... or given; x arrives split over fsdp only, the layer adds ep and gives fsdp back
    "fsdp2xep2xtensor2-given": (
        (("fsdp", 2), ("ep", 2), ("tensor", 2)),
        "ep",
        ("fsdp",),
        ("fsdp", "ep"),
    ),
    "fsdp2xep2xtensor2-tuple": (
        (("fsdp", 2), ("ep", 2), ("tensor", 2)),
        ("fsdp", "ep"),
        ("fsdp", "ep"),
        None,
    ),
}


def _mesh(shape):
    names = tuple(n for n, _ in shape)
    sizes = tuple(s for _, s in shape)
    return jax.make_mesh(sizes, names, devices=jax.devices()[: int(np.prod(sizes))])


def _group(mesh, ep, *, low_latency=False, tokens_per_rank=N):
    return jax_ep.Group(
        mesh,
        ep,
        num_experts=E,
        num_topk=K,
        hidden=D,
        num_max_tokens_per_rank=tokens_per_rank,
        low_latency=low_latency,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_global_call_matches_dense(case):
    shape, ep, x_split, token_axes = CASES[case]
    mesh = _mesh(shape)
    model = MoE(
        D,
        F,
        E,
        K,
        group=_group(mesh, ep),
        rngs=nnx.Rngs(0),
        shared_intermediate=FS,
        aux_loss_coef=0.01,
        token_axes=token_axes,
    )
    x = jax.random.normal(jax.random.key(1), (N, D), jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P(x_split)))
    ct = jax.random.normal(jax.random.key(7), (N, D), jnp.float32)
    y, aux, grads = _module_fwd_grad(model, xs, ct)
    assert jax.typeof(y).sharding.spec == P(x_split, None)  # x's placement back
    assert jax.typeof(grads["x"]).sharding.spec == P(x_split, None)
    want_y, want_aux, want_grads = _dense_fwd_grad(_params(model), x, ct, aux_coef=0.01)
    _close(y, want_y, F32_TOL, "forward")
    _close(aux, want_aux, F32_TOL, "aux loss")
    names = jax.tree_util.tree_flatten_with_path(grads)[0]
    flat_want = jax.tree.leaves(want_grads)
    for (path, got), want in zip(names, flat_want, strict=True):
        _close(got, want, F32_TOL, f"grad {jax.tree_util.keystr(path)}")
    # the experts live on the EP axes only: replicated over data/fsdp/tensor
    assert model.wi_0[...].sharding.spec == P(ep, None, None)


@pytest.mark.parametrize("case", ["data2xep4", "pod2xep4-tuple"])
def test_low_latency_on_meshes_matches_dense(case):
    shape, ep, x_split, _ = CASES[case]
    mesh = _mesh(shape)
    model = MoE(
        D,
        F,
        E,
        K,
        group=_group(mesh, ep, low_latency=True, tokens_per_rank=N // 8),
        rngs=nnx.Rngs(0),
        low_latency=True,
        shared_intermediate=FS,
    )
    x = jax.random.normal(jax.random.key(1), (N, D), jnp.float32)
    y = jax.jit(lambda x: model(x))(jax.device_put(x, NamedSharding(mesh, P(x_split))))
    want, _ = dense_moe(_params(model), x)
    _close(y, want, F32_TOL, "low latency")


def test_per_rank_call_inside_a_user_shard_map_over_a_tuple_axis():
    mesh = _mesh((("data", 2), ("pod", 2), ("ep", 2)))
    model = MoE(D, F, E, K, group=_group(mesh, ("pod", "ep")), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (N, D), jnp.float32)
    spec = P(("data", "pod", "ep"))
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    graphdef, state = nnx.split(model)
    specs = nnx.get_partition_spec(state)

    @jax.jit
    def per_rank(state, x):
        def body(state, x):
            m = nnx.merge(graphdef, state)
            assert m.wi_0[...].shape[0] == E // 4
            return m(x)

        return jax.shard_map(body, mesh=mesh, in_specs=(specs, spec), out_specs=spec)(state, x)

    want, _ = dense_moe(_params(model), x)
    _close(per_rank(state, xs), want, F32_TOL, "per rank")


def test_mesh_errors_name_the_axis_and_the_mesh():
    mesh = _mesh((("data", 2), ("ep", 4)))
    group = _group(mesh, "ep")
    x = jax.random.normal(jax.random.key(1), (N, D), jnp.float32)
    bad_axes = MoE(D, F, E, K, group=group, rngs=nnx.Rngs(0), token_axes=("data", "tensor"))
    with pytest.raises(ValueError, match=r"'tensor' is not an axis of the mesh Mesh\('data': 2"):
        bad_axes(x)
    no_ep = MoE(D, F, E, K, group=group, rngs=nnx.Rngs(0), token_axes=("data",))
    with pytest.raises(ValueError, match=r"leave out the EP axis \('ep',\)"):
        no_ep(x)
    model = MoE(D, F, E, K, group=group, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"12 does not split over the token axes"):
        model(x[:12])
    other = jax.make_mesh((4, 2), ("ep", "data"))
    with jax.set_mesh(other), pytest.raises(ValueError, match=r"mesh context .* is Mesh\('ep': 4"):
        model(x)
    elsewhere = jax.device_put(x, NamedSharding(other, P("ep")))
    with pytest.raises(ValueError, match=r"x is sharded on the mesh Mesh\('ep': 4, 'data': 2\)"):
        model(elsewhere)
    tuple_model = MoE(D, F, E, K, group=_group(mesh, ("data", "ep")), rngs=nnx.Rngs(0))
    ep_only = jax.make_mesh((4,), ("ep",), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=r"only partly bound here \(\('data',\) is not\)"):
        jax.shard_map(lambda x: tuple_model(x), mesh=ep_only, in_specs=P("ep"), out_specs=P("ep"))(
            jax.device_put(x[:32], NamedSharding(ep_only, P("ep")))
        )
