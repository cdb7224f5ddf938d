"""EP over a tuple of mesh axes, and EP beside other mesh axes (data, fsdp, tensor).

Every case runs a toy MoE layer (dispatch → per-expert map → combine, ``harness.toy_moe_layer``)
per rank inside ``jax.jit(jax.shard_map(...))`` over the whole mesh, with the tokens sharded over
``token_axes`` (replicated over the rest, as a model's activations are over a tensor axis), and
compares the global output and the gradients of ``x`` and of the router weights with the same
layer written densely, token by token (``harness.toy_dense_moe``): the oracle does not care
which rank or EP group holds a token, so a rank order that disagreed with
``jax.lax.axis_index`` (or a group that mixed coordinates of another axis) would send rows to
the wrong experts and show. float32, tolerance 1e-5.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_kernels
from harness import make_routing, toy_dense_moe, toy_moe_layer, toy_scales
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import baselines
from jax_ep.backends.cuda.runtime import ep_groups

E, K, H = 16, 4, 128
TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    """A mesh (axis sizes in order), the EP axis (a name or a tuple) and the token axes."""

    shape: tuple[tuple[str, int], ...]
    ep: str | tuple[str, ...]
    tokens: tuple[str, ...]

    def mesh(self) -> Mesh:
        names = tuple(n for n, _ in self.shape)
        sizes = tuple(s for _, s in self.shape)
        return jax.make_mesh(sizes, names, devices=jax.devices("cpu")[: int(np.prod(sizes))])

    def __str__(self):
        mesh = "x".join(f"{n}{s}" for n, s in self.shape)
        ep = self.ep if isinstance(self.ep, str) else "+".join(self.ep)
        return f"{mesh}-ep={ep}-tokens={'+'.join(self.tokens)}"


CASES = [
    Case((("data", 2), ("ep", 4)), "ep", ("data", "ep")),
    Case((("pod", 2), ("ep", 4)), ("pod", "ep"), ("pod", "ep")),
    # the tuple's order, not the mesh's, defines the rank: ranks interleave the mesh axes
    Case((("pod", 2), ("ep", 4)), ("ep", "pod"), ("pod", "ep")),
    # tokens sharded over fsdp x ep and replicated over tensor; experts over ep
    Case((("fsdp", 2), ("ep", 2), ("tensor", 2)), "ep", ("fsdp", "ep")),
    Case((("fsdp", 2), ("ep", 2), ("tensor", 2)), ("fsdp", "ep"), ("fsdp", "ep")),
]


def _group(case: Case, tokens_per_rank: int, **kw) -> jax_ep.Group:
    return jax_ep.Group(
        case.mesh(),
        case.ep,
        num_experts=E,
        num_topk=K,
        hidden=H,
        num_max_tokens_per_rank=tokens_per_rank,
        dtype=jnp.float32,
        backend="reference",
        **kw,
    )


def _inputs(num_tokens: int, seed: int = 0):
    idx, w = make_routing("masked", 1, num_tokens, K, E, seed=seed)
    idx, w = idx[0], w[0]
    idx[::3, 1] = idx[::3, 0]  # repeated experts share one row
    x = np.random.default_rng(seed + 1).standard_normal((num_tokens, H)).astype(np.float32) * 0.5
    cot = np.random.default_rng(seed + 2).standard_normal((num_tokens, H)).astype(np.float32)
    return x, idx, w, cot


def _global(case: Case, per_rank, mesh: Mesh):
    """``per_rank(x, idx, w)`` over the mesh, tokens split over ``case.tokens``, jitted."""
    spec = P(case.tokens)
    return jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=spec, out_specs=spec))


def _place(mesh, spec, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays]


def _check_forward_and_grads(case: Case, layer, num_tokens: int = 64, grads: bool = True):
    mesh = case.mesh()
    x, idx, w, cot = _inputs(num_tokens)
    xs, idxs, ws, cots = _place(mesh, P(case.tokens), x, idx, w, cot)
    f = _global(case, layer, mesh)
    np.testing.assert_allclose(f(xs, idxs, ws), toy_dense_moe(x, idx, w, E), rtol=TOL, atol=TOL)
    if not grads:
        return

    @jax.jit
    def grad(x, idx, w, cot):
        return jax.grad(lambda x, w: jnp.sum(f(x, idx, w) * cot), argnums=(0, 1))(x, w)

    gx, gw = grad(xs, idxs, ws, cots)
    want_gx, want_gw = jax.grad(
        lambda x, w: jnp.sum(toy_dense_moe(x, idx, w, E) * cot), argnums=(0, 1)
    )(x, w)
    np.testing.assert_allclose(gx, want_gx, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(gw, want_gw, rtol=TOL, atol=TOL)


def _rank_of_device(mesh: Mesh, axis) -> dict:
    """Device → ``jax.lax.axis_index(axis)`` as shard_map sees it."""
    spec = P(*mesh.axis_names)
    out = jax.jit(
        jax.shard_map(
            lambda: jax.lax.axis_index(axis).reshape((1,) * len(mesh.axis_names)),
            mesh=mesh,
            in_specs=(),
            out_specs=spec,
        )
    )()
    return {s.device: int(np.asarray(s.data).reshape(())) for s in out.addressable_shards}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_runtime_rank_order_is_axis_index_order(case):
    """The CUDA runtime wires each EP group's devices in ``jax.lax.axis_index`` order."""
    mesh = case.mesh()
    rank = _rank_of_device(mesh, case.ep)
    groups = ep_groups(mesh, case.ep)
    ep_names = (case.ep,) if isinstance(case.ep, str) else case.ep
    assert len(groups) == mesh.size // len(groups[0])
    coords = {d: idx for idx, d in np.ndenumerate(mesh.devices)}
    for members in groups:
        assert [rank[d] for d in members] == list(range(len(members)))
        # one group = one coordinate on every other mesh axis
        others = {
            tuple(c for n, c in zip(mesh.axis_names, coords[d], strict=True) if n not in ep_names)
            for d in members
        }
        assert len(others) == 1
    assert sorted(d.id for m in groups for d in m) == sorted(d.id for d in mesh.devices.flat)


# every mesh with the ragged layout; the other layouts on an interleaved tuple and a 3-D mesh
HT_CASES = [(c, "ragged") for c in CASES] + [
    (c, layout) for c in (CASES[2], CASES[3]) for layout in ("expert_major", "per_rank")
]


@pytest.mark.parametrize("case,layout", HT_CASES, ids=[f"{c}-{lay}" for c, lay in HT_CASES])
def test_high_throughput_matches_dense(case, layout):
    group = _group(case, 64)

    def layer(x, idx, w):
        return toy_moe_layer(x, idx, w, group, layout)

    _check_forward_and_grads(case, layer)


def _toy_low_latency(group):
    e_loc = group.num_local_experts

    def layer(x, idx, w):
        me = jax.lax.axis_index(group.axis_name)
        out = jax_ep.low_latency_dispatch(x, idx, group=group, fp8=False)
        s = toy_scales(E)[me * e_loc + jnp.arange(e_loc)]
        y = s[:, None, None] * (out.x * out.x + out.x)
        return jax_ep.low_latency_combine(y, idx, w, out.handle, group=group)

    return layer


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:4], ids=str)
def test_low_latency_matches_dense(case):
    mesh = case.mesh()
    tokens_per_rank = 64 // int(np.prod([mesh.shape[a] for a in case.tokens]))
    group = _group(case, tokens_per_rank, low_latency=True)
    _check_forward_and_grads(case, _toy_low_latency(group), grads=False)


def _toy_baseline(dispatch, combine, group):
    e_loc = group.num_local_experts

    def layer(x, idx, w):
        me = jax.lax.axis_index(group.axis_name)
        rows = dispatch(x, idx)
        e = jnp.searchsorted(jnp.cumsum(rows.group_sizes), jnp.arange(rows.x.shape[0]), "right")
        s = toy_scales(E)[jnp.minimum(me * e_loc + e, E - 1)]
        return combine(s[:, None] * (rows.x * rows.x + rows.x), w, rows.state)

    return layer


@pytest.mark.parametrize("case", CASES[1:3] + CASES[4:], ids=str)
@pytest.mark.parametrize("baseline", ["ragged_all_to_all", "all_to_all"])
def test_baselines_take_a_tuple_axis(case, baseline):
    group = _group(case, 64)
    axis = group.axis_name
    if baseline == "all_to_all":
        layer = _toy_baseline(
            lambda x, idx: baselines.all_to_all_dispatch(x, idx, axis_name=axis, num_experts=E),
            lambda y, w, st: baselines.all_to_all_combine(y, w, st, axis_name=axis),
            group,
        )
    else:  # XLA:CPU has no ragged_all_to_all: the emulation keeps its semantics
        layer = _toy_baseline(
            lambda x, idx: baselines.ragged_all_to_all_dispatch(
                x, idx, axis_name=axis, num_experts=E, emulate=True
            ),
            lambda y, w, st: baselines.ragged_all_to_all_combine(
                y, w, st, axis_name=axis, emulate=True
            ),
            group,
        )
    # the baselines send one row per (token, k): no repeated experts in their routing contract
    mesh = case.mesh()
    idx, w = make_routing("masked", 1, 64, K, E, seed=4)
    x = np.random.default_rng(5).standard_normal((64, H)).astype(np.float32)
    xs, idxs, ws = _place(mesh, P(case.tokens), x, idx[0], w[0])
    got = _global(case, layer, mesh)(xs, idxs, ws)
    np.testing.assert_allclose(got, toy_dense_moe(x, idx[0], w[0], E), rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------
# loopback inside one axis: a mesh axis of devices x virtual EP ranks under jax.vmap
# ----------------------------------------------------------------------------


def _data_by_loopback(backend: str, platform: str, num_data: int, num_ranks: int, layout: str):
    """Tokens over ``data`` (a mesh axis) x ``ep`` (``num_ranks`` virtual ranks of a loopback
    group under ``jax.vmap`` on each device), forward and gradients against the dense layer."""
    devices = jax.devices(platform)[:num_data]
    mesh = Mesh(np.array(devices), ("data",))
    tokens_per_rank = 8
    n = num_data * num_ranks * tokens_per_rank
    group = jax_ep.Group(
        mesh,
        "ep",
        num_experts=E,
        num_topk=K,
        hidden=H,
        num_max_tokens_per_rank=tokens_per_rank,
        dtype=jnp.float32,
        backend=backend,
        loopback=num_ranks,
    )

    def per_device(x, idx, w, cot):
        def split(a):
            return a.reshape((num_ranks, tokens_per_rank) + a.shape[1:])

        def rank(x, idx, w, cot):
            # gradients per rank, inside the vmap (as tests/test_vjp.py's loopback runs): JAX
            # re-traces a custom_vjp's forward without the vmap axis when the grad is taken
            # outside the vmap (NameError: unbound axis name)
            def loss(x, w):
                y = toy_moe_layer(x, idx, w, group, layout)
                return jnp.sum(y * cot), y

            (gx, gw), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, w)
            return y, gx, gw

        out = jax.vmap(rank, axis_name="ep")(split(x), split(idx), split(w), split(cot))
        return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), out)

    # check_vma=False: JAX's varying-axes check asserts on a collective over a vmap axis
    # inside shard_map (jax 0.10.2, insert_collective_pvary), which the reference's
    # all_to_all over the virtual "ep" axis is
    f = jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False
        )
    )
    x, idx, w, cot = _inputs(n, seed=9)
    y, gx, gw = f(*_place(mesh, P("data"), x, idx, w, cot))
    np.testing.assert_allclose(y, toy_dense_moe(x, idx, w, E), rtol=TOL, atol=TOL)
    want_gx, want_gw = jax.grad(
        lambda x, w: jnp.sum(toy_dense_moe(x, idx, w, E) * cot), argnums=(0, 1)
    )(x, w)
    np.testing.assert_allclose(gx, want_gx, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(gw, want_gw, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("layout", ["ragged", "per_rank"])
def test_data_axis_by_loopback_ep_reference(layout):
    _data_by_loopback("reference", "cpu", 2, 4, layout)


@requires_kernels
@pytest.mark.parametrize("layout", ["ragged", "expert_major", "per_rank"])
def test_data_axis_by_loopback_ep_cuda_kernel(layout):
    """The CUDA kernels on one GPU: a ``data`` mesh axis (the GPU) x 2 virtual EP ranks."""
    _data_by_loopback("cuda", "gpu", 1, 2, layout)


# ----------------------------------------------------------------------------
# the NVSHMEM node split of a tuple axis, and clear errors
# ----------------------------------------------------------------------------


def test_tuple_axis_sets_the_nvshmem_node_size():
    mesh = jax.make_mesh((2, 4), ("node", "gpu"), devices=jax.devices("cpu")[:8])
    kw = dict(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=8, backend="reference")
    nvshmem = jax_ep.Config(transport="nvshmem")
    assert jax_ep.Group(mesh, ("node", "gpu"), config=nvshmem, **kw).config.node_size == 4
    assert jax_ep.Group(mesh, ("gpu", "node"), config=nvshmem, **kw).config.node_size == 2
    # one axis keeps 0 (the ranks of each host); an explicit node_size wins
    assert jax_ep.Group(mesh, "gpu", config=nvshmem, **kw).config.node_size == 0
    explicit = jax_ep.Config(transport="nvshmem", node_size=2)
    assert jax_ep.Group(mesh, ("node", "gpu"), config=explicit, **kw).config.node_size == 2
    assert jax_ep.Group(mesh, ("node", "gpu"), **kw).config.node_size == 0  # ipc: no nodes


def test_mesh_and_axis_errors_name_the_axis_and_the_mesh():
    mesh = jax.make_mesh((2, 4), ("pod", "ep"), devices=jax.devices("cpu")[:8])
    kw = dict(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=8)
    with pytest.raises(ValueError, match=r"'gpu' is not an axis of the mesh Mesh\('pod': 2"):
        jax_ep.Group(mesh, ("pod", "gpu"), **kw)
    with pytest.raises(ValueError, match="names an axis twice"):
        jax_ep.Group(mesh, ("ep", "ep"), **kw)
    with pytest.raises(ValueError, match=r"12 is not divisible .* axis \('pod', 'ep'\)"):
        jax_ep.Group(mesh, ("pod", "ep"), **{**kw, "num_experts": 12})
    with pytest.raises(ValueError, match="one axis name"):
        jax_ep.Group(None, ("pod", "ep"), loopback=4, **kw)
    group = jax_ep.Group(mesh, ("pod", "ep"), **kw)
    x = jnp.zeros((8, 8, H), jnp.float32)
    idx = jnp.zeros((8, 8, K), jnp.int32)

    def only_ep(x, idx):  # shard_map over "ep" alone leaves "pod" unbound
        return jax_ep.dispatch(x[0], idx[0], idx[0] * 1.0, group=group).x[None]

    small = jax.make_mesh((4,), ("ep",), devices=jax.devices("cpu")[:4])
    with pytest.raises(ValueError, match=r"\('pod', 'ep'\); 'pod' is not bound here"):
        jax.shard_map(only_ep, mesh=small, in_specs=P("ep"), out_specs=P("ep"))(
            *_place(small, P("ep"), x[:4], idx[:4])
        )
    # bound, but over a mesh where the tuple has another size
    other = jax.make_mesh((2, 2), ("pod", "ep"), devices=jax.devices("cpu")[:4])
    spec = P(("pod", "ep"))
    with pytest.raises(ValueError, match=r"axis \('pod', 'ep'\) has size 4 here but the group"):
        jax.shard_map(only_ep, mesh=other, in_specs=spec, out_specs=spec)(
            *_place(other, spec, x[:4], idx[:4])
        )
