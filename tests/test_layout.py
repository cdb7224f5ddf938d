"""get_dispatch_layout: counts per rank and per (distinct) expert, token-in-rank mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_kernels
from harness import ROUTINGS, make_routing

import jax_ep


def numpy_layout(idx, num_experts, num_ranks):
    e_loc = num_experts // num_ranks
    T = idx.shape[0]
    in_rank = np.zeros((T, num_ranks), bool)
    per_expert = np.zeros(num_experts, np.int32)
    for t in range(T):
        for e in set(int(v) for v in idx[t] if v >= 0):
            per_expert[e] += 1
            in_rank[t, e // e_loc] = True
    return in_rank.sum(0).astype(np.int32), per_expert, in_rank


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("num_ranks", [1, 4, 8])
def test_layout_reference(routing, num_ranks):
    idx, _ = make_routing(routing, 1, 37, 6, 32, seed=num_ranks)
    got = jax_ep.get_dispatch_layout(jnp.asarray(idx[0]), 32, num_ranks=num_ranks)
    for g, w in zip(got, numpy_layout(idx[0], 32, num_ranks), strict=False):
        np.testing.assert_array_equal(np.asarray(g), w)


def test_layout_accepts_int64_and_group():
    runner_mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:2]), ("ep",))
    group = jax_ep.Group(
        runner_mesh,
        "ep",
        num_experts=8,
        num_topk=2,
        hidden=128,
        num_max_tokens_per_rank=4,
        backend="reference",
    )
    idx = np.array([[0, 7], [-1, 3], [5, 5], [-1, -1]], np.int64)
    got = jax_ep.get_dispatch_layout(idx, group=group)
    np.testing.assert_array_equal(got.num_tokens_per_rank, [2, 2])
    np.testing.assert_array_equal(got.num_tokens_per_expert, [1, 0, 0, 1, 0, 1, 0, 1])


@requires_kernels
@pytest.mark.parametrize("routing", ROUTINGS)
def test_layout_kernel_bit_exact(routing):
    gpu = jax.devices("gpu")[0]
    idx, _ = make_routing(routing, 3, 257, 8, 256, seed=1)
    cuda = jax_ep.backends.backend_for("cuda")
    for num_ranks in (1, 2, 8):
        want = [jax_ep.reference.get_dispatch_layout(jnp.asarray(i), 256, num_ranks) for i in idx]
        f = jax.jit(jax.vmap(lambda i, r=num_ranks: cuda.layout(i, 256, r)))
        got = f(jax.device_put(idx, gpu))
        for r in range(3):
            for g, w in zip(got, want[r], strict=False):
                np.testing.assert_array_equal(np.asarray(g)[r], np.asarray(w))


@requires_kernels
def test_layout_kernel_reports_bad_expert_id():
    idx = np.zeros((4, 2), np.int32)
    idx[2, 1] = 999
    f = jax.jit(lambda i: jax_ep.backends.backend_for("cuda").layout(i, 8, 1))
    with pytest.raises(Exception, match=r"topk_idx\[2, 1\] = 999 is out of range"):
        jax.block_until_ready(f(idx))
        jax.block_until_ready(f(idx))  # reported by the next call when not synchronised
