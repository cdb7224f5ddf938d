"""The capacity model (jax_ep.capacity), the low-latency token bound and Group.memory_report.

Sizes of the README example (EP=8, 4096 tokens per rank, top-8 of 256 experts, hidden 7168)
are checked by arithmetic written out here; the Python buffer formula is checked against the
CUDA extension's own ``buffer_bytes`` wherever the extension is built (CI builds it).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import Runner, make_routing, make_tokens

import jax_ep
from jax_ep.backends.cuda import extension
from jax_ep.capacity import dispatch_capacity
from jax_ep.memory import buffer_regions

GIB = 1 << 30
README = dict(num_ranks=8, num_tokens=4096, num_topk=8, num_experts=256)


def test_capacity_is_a_factor_of_the_balanced_load():
    # balanced: T*K = 32768 rows per rank (ragged), R*T*K/E = 1024 per expert (expert_major)
    assert dispatch_capacity("ragged", **README) == 2 * 32768
    assert dispatch_capacity("expert_major", **README) == 2 * 1024
    assert dispatch_capacity("ragged", **README, capacity_factor=1.25) == 40960
    assert dispatch_capacity("expert_major", **README, capacity_factor=1.3) == 1332  # ceil
    # None: the worst case, which never drops
    assert dispatch_capacity("ragged", **README, capacity_factor=None) == 8 * 4096 * 8
    assert dispatch_capacity("expert_major", **README, capacity_factor=None) == 8 * 4096
    # never more than the worst case; per_rank is always the worst case
    assert dispatch_capacity("ragged", **README, capacity_factor=100) == 8 * 4096 * 8
    assert dispatch_capacity("per_rank", **README, capacity_factor=0.5) == 8 * 4096
    with pytest.raises(ValueError, match="capacity_factor"):
        dispatch_capacity("ragged", **README, capacity_factor=0)


def test_capacity_of_a_symbolic_token_count():
    # jax.export with symbolic tokens: the capacity stays an integer expression of `t`
    (t,) = jax.export.symbolic_shape("t")
    for layout in ("ragged", "expert_major"):

        def rows(x, layout=layout):
            sizes = dict(README, num_tokens=x.shape[0])
            return jnp.zeros((dispatch_capacity(layout, **sizes, capacity_factor=1.3),))

        exported = jax.export.export(jax.jit(rows))(jax.ShapeDtypeStruct((t,), jnp.float32))
        for n in (1, 7, 4096):
            want = dispatch_capacity(layout, **dict(README, num_tokens=n), capacity_factor=1.3)
            assert exported.call(jnp.zeros((n,))).shape == (want,)


@pytest.mark.parametrize("layout", ["ragged", "expert_major"])
def test_dispatch_default_capacity_and_the_never_drop_worst_case(layout):
    runner = Runner("reference", 4, "shard_map")
    E, K, T, H = 16, 4, 12, 128
    idx, w = make_routing("skewed", 4, T, K, E, seed=3)
    x = make_tokens(4, T, H)
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)

    def fn(x, idx, w):
        default = jax_ep.dispatch(x, idx, w, group=group, layout=layout)
        worst = jax_ep.dispatch(x, idx, w, group=group, layout=layout, capacity_factor=None)
        return default.x, default.num_dropped, worst.x, worst.num_dropped

    dx, d_dropped, wx, w_dropped = runner.run(fn, x, idx, w)
    sizes = dict(num_ranks=4, num_tokens=T, num_topk=K, num_experts=E)
    rows = dispatch_capacity(layout, **sizes)
    worst = dispatch_capacity(layout, **sizes, capacity_factor=None)
    shape = (E // 4, rows, H) if layout == "expert_major" else (rows, H)
    assert dx.shape[1:] == shape and wx.shape[1:] == shape[:-2] + (worst, H)
    assert int(np.sum(d_dropped)) > 0, "skewed routing must overflow twice the balanced load"
    assert int(np.sum(w_dropped)) == 0


def _readme_group(**options) -> jax_ep.Group:
    """The README's example group (EP=8, 4096 tokens/rank, top-8 of 256, hidden 7168), on the
    8 virtual CPU devices (conftest) so that a one-GPU machine can make it too."""
    mesh = jax.make_mesh((8,), ("ep",), devices=jax.devices("cpu")[:8])
    return jax_ep.Group(
        mesh,
        "ep",
        num_experts=256,
        num_topk=8,
        hidden=7168,
        num_max_tokens_per_rank=4096,
        backend="reference",
        low_latency=True,
        **options,
    )


def test_memory_report_of_the_readme_example():
    group = _readme_group()
    assert group.num_max_low_latency_tokens_per_rank == 256  # the decode default
    r = group.memory_report()
    assert not r.buffers_allocated  # the reference backend allocates none
    row = 7168 * 2
    # ragged at twice the balanced load: 65536 rows of 7168 bf16
    assert r.dispatch["rows"] == 65536 and r.dispatch["x"] == 65536 * row
    em = group.memory_report(layout="expert_major")
    assert em.dispatch["rows"] == 32 * 2048 and em.dispatch["x"] == 65536 * row
    # the never-drop worst case, as the issue measured it: 3.5 GiB ragged, 14 GiB expert_major
    worst = group.memory_report(capacity_factor=None).dispatch["x"]
    assert worst == 8 * 4096 * 8 * row and round(worst / GIB, 1) == 3.5
    worst_em = group.memory_report(layout="expert_major", capacity_factor=None).dispatch["x"]
    assert worst_em / GIB == 14.0
    # buffers: dispatch + combine payloads double-buffered for 8 x 4096 tokens (1.75 GiB),
    # low-latency receive slots for 32 experts x 8 ranks x 256 tokens (16-byte headers) and
    # combine slots for 256 tokens x top-8, double-buffered
    assert r.buffers["high_throughput"] >= 2 * 2 * 8 * 4096 * row
    ll_data = 2 * 32 * 8 * 256 * (16 + row) + 2 * 256 * 8 * row
    assert ll_data <= r.buffers["low_latency"] < ll_data + (1 << 20)
    old = _readme_group(num_max_low_latency_tokens_per_rank=4096)
    assert old.memory_report().buffers["low_latency"] > 28 * GIB  # what one shared bound cost
    assert r.total < 80 * GIB / 10
    assert "GiB" in str(r)


@pytest.mark.skipif(extension.extension() is None, reason=extension.missing_reason() or "built")
@pytest.mark.parametrize(
    "sizes",
    [
        dict(
            num_ranks=8,
            max_tokens=4096,
            hidden=7168,
            elem_bytes=2,
            num_topk=8,
            num_local_experts=32,
            low_latency=1,
            ll_max_tokens=256,
            num_nodes=1,
        ),
        dict(
            num_ranks=4,
            max_tokens=100,
            hidden=256,
            elem_bytes=4,
            num_topk=6,
            num_local_experts=3,
            low_latency=1,
            ll_max_tokens=100,
            num_nodes=2,
        ),
        dict(
            num_ranks=2,
            max_tokens=37,
            hidden=128,
            elem_bytes=2,
            num_topk=1,
            num_local_experts=5,
            low_latency=0,
            ll_max_tokens=37,
            num_nodes=1,
        ),
        dict(
            num_ranks=4,
            max_tokens=512,
            hidden=512,
            elem_bytes=2,
            num_topk=8,
            num_local_experts=8,
            low_latency=1,
            ll_max_tokens=16,
            num_nodes=2,
        ),
    ],
)
def test_buffer_formula_matches_the_cuda_extension(sizes):
    ext = extension.extension()
    assert buffer_regions(**sizes)["total"] == ext.buffer_bytes(sizes)
    # what a group hands the extension has exactly the extension's fields
    assert sorted(_readme_group().buffer_sizes()) == sorted(ext.size_fields())


def test_low_latency_ops_use_their_own_token_bound():
    runner = Runner("reference", 2, "shard_map")
    E, K, H = 8, 2, 128
    group = runner.group(
        num_experts=E,
        num_topk=K,
        hidden=H,
        num_max_tokens_per_rank=64,
        low_latency=True,
        num_max_low_latency_tokens_per_rank=4,
    )
    idx, _ = make_routing("random", 2, 3, K, E)
    x = make_tokens(2, 3, H)

    def fn(x, idx):
        return jax_ep.low_latency_dispatch(x, idx, group=group, fp8=False).x

    assert runner.run(fn, x, idx).shape == (2, E // 2, 2 * 4, H)
    idx9, _ = make_routing("random", 2, 9, K, E)
    with pytest.raises(ValueError, match="num_max_low_latency_tokens_per_rank=4"):
        runner.run(fn, make_tokens(2, 9, H), idx9)


def test_readme_shows_the_report_of_its_example():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    group = _readme_group()
    assert f"```\n{group.memory_report()}\n```" in readme
