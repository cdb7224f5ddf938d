"""dispatch/combine against the NumPy oracle: every backend, layout, EP size and routing pattern.

The reference backend runs under ``shard_map`` on 8 CPU devices (EP 1/2/4/8) and
under ``vmap`` (loopback); the CUDA backend on GPUs, in loopback and across real
devices. BF16 dispatch outputs, counts and handles must be bit-exact; combine
follows the contract's float32 order: bit-exact for bf16/f16 outputs; for float32
outputs within 2 ulp (XLA may fuse the multiply-add of the expert-side sum into
an FMA, which the contract and the kernels do not).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HAS_KERNELS, gpu_count
from harness import (
    ROUTINGS,
    Runner,
    assert_equal,
    assert_valid_rows_equal,
    assert_within_ulps,
    default_capacity,
    make_routing,
    make_tokens,
    oracle_combine,
    oracle_dispatch,
    runner_params,
)

import jax_ep

E, K, T, H = 16, 4, 12, 256

RUNNERS = [Runner("reference", r, "shard_map") for r in (1, 2, 4, 8)] + [
    Runner("reference", 4, "loopback")
]
if HAS_KERNELS:
    RUNNERS += [Runner("cuda", r, "loopback", "gpu") for r in (1, 2, 4)]
    RUNNERS += [Runner("cuda", gpu_count(), "shard_map", "gpu")]
RUNNER_IDS = [str(r) for r in RUNNERS]


def expert_scale(layout, counts, num_rows, e_loc):
    """Per-row factor ``(global expert + 1) / 8`` so combine sees different expert outputs."""
    me = jax.lax.axis_index("ep")
    if layout == "expert_major":
        e = jnp.arange(num_rows) // (num_rows // e_loc)
    elif layout == "ragged":
        e = jnp.searchsorted(jnp.cumsum(counts), jnp.arange(num_rows), side="right")
    else:
        return jnp.full((num_rows,), 1.0, jnp.float32)
    return (e + me * e_loc + 1).astype(jnp.float32) / 8


def run_case(
    runner,
    layout,
    routing,
    capacity=None,
    dtype=jnp.bfloat16,
    hidden=H,
    num_tokens=T,
    num_topk=K,
    fp8=False,
):
    R = runner.num_ranks
    idx, w = make_routing(
        routing, R, num_tokens, num_topk, E, seed=zlib.crc32(f"{routing}{R}".encode()) % 1000
    )
    x = make_tokens(R, num_tokens, hidden, dtype)
    group = runner.group(
        num_experts=E,
        num_topk=num_topk,
        hidden=hidden,
        num_max_tokens_per_rank=num_tokens,
        dtype=dtype,
    )
    e_loc = E // R

    def fn(x, idx, w):
        out = jax_ep.dispatch(x, idx, w, group=group, layout=layout, capacity=capacity, fp8=fp8)
        payload = out.x if not fp8 else jax_ep.dequantize_fp8(out.x, out.scales, dtype)
        rows = payload.reshape(-1, payload.shape[-1])
        scale = expert_scale(layout, out.counts, rows.shape[0], e_loc)
        y = (rows.astype(jnp.float32) * scale[:, None]).astype(dtype).reshape(payload.shape)
        combined = jax_ep.combine(y, out.handle, group=group)
        return out, y, combined

    out, y, combined = runner.run(fn, x, idx, w)
    cap = capacity or default_capacity(layout, R, num_tokens, num_topk, E)
    want = oracle_dispatch(x, idx, w, E, layout, cap)
    return x, idx, w, out, y, combined, want


def check_dispatch(out, want, layout, fp8=False):
    for me, o in enumerate(want):
        h = jax.tree.map(lambda a, me=me: a[me], out.handle)
        for name in ("recv_src", "recv_topk_idx", "recv_rows", "recv_weights", "num_recv"):
            assert_equal(getattr(h, name), o[name], f"rank {me} handle.{name}")
        assert_equal(out.counts[me], o["counts"], f"rank {me} counts")
        assert_equal(out.num_dropped[me], o["num_dropped"], f"rank {me} num_dropped")
        if not fp8:
            assert_valid_rows_equal(out.x[me], o["x"], o["counts"], layout, f"rank {me} x")
        if layout == "per_rank":
            assert_equal(out.topk_idx[me], o["topk_idx"], f"rank {me} topk_idx")
            assert_equal(out.topk_weights[me], o["topk_weights"], f"rank {me} topk_weights")


def check_combine(y, combined, want, idx, layout, dtype, backend):
    """The kernels follow the contract's order without FMA: bit-exact. XLA may contract the
    reference's multiply-add into an FMA, which moves a rounding: 1 ulp of the output dtype."""
    ys = [y[me] for me in range(len(want))]
    expect = oracle_combine(ys, want, idx, E, layout, dtype)
    if backend == "cuda" and np.dtype(dtype) != np.float32:
        assert_equal(combined, expect, "combine")
    else:
        assert_within_ulps(combined, expect, dtype, 2 if np.dtype(dtype) == np.float32 else 1)


@pytest.mark.parametrize("runner", RUNNERS, ids=RUNNER_IDS)
@pytest.mark.parametrize("layout", ["expert_major", "ragged", "per_rank"])
def test_random_routing(runner, layout):
    _, idx, _, out, y, combined, want = run_case(runner, layout, "random")
    check_dispatch(out, want, layout)
    check_combine(y, combined, want, idx, layout, jnp.bfloat16, runner.backend)


@pytest.mark.parametrize(
    "runner",
    [r for r in RUNNERS if r.num_ranks == 4 or r.backend == "cuda"],
    ids=[str(r) for r in RUNNERS if r.num_ranks == 4 or r.backend == "cuda"],
)
@pytest.mark.parametrize("routing", [r for r in ROUTINGS if r != "random"])
def test_routing_patterns(runner, routing):
    for layout in ("expert_major", "per_rank"):
        _, idx, _, out, y, combined, want = run_case(runner, layout, routing)
        check_dispatch(out, want, layout)
        check_combine(y, combined, want, idx, layout, jnp.bfloat16, runner.backend)


@pytest.mark.parametrize("runner", runner_params(RUNNERS, "reference-shard_map-R4", "cuda"))
@pytest.mark.parametrize("layout,capacity", [("expert_major", 3), ("ragged", 20), ("per_rank", 7)])
def test_capacity_drops_are_counted(runner, layout, capacity):
    _, idx, _, out, y, combined, want = run_case(runner, layout, "skewed", capacity=capacity)
    check_dispatch(out, want, layout)
    assert sum(int(o["num_dropped"]) for o in want) > 0, "the case must overflow"
    check_combine(y, combined, want, idx, layout, jnp.bfloat16, runner.backend)


@pytest.mark.parametrize("runner", runner_params(RUNNERS, "reference-shard_map-R4", "cuda"))
@pytest.mark.parametrize(
    "dtype,hidden", [(jnp.float32, 129), (jnp.bfloat16, 131), (jnp.float16, 64)]
)
def test_odd_sizes_and_dtypes(runner, dtype, hidden):
    for layout in ("ragged", "per_rank"):
        _, idx, _, out, y, combined, want = run_case(
            runner,
            layout,
            "masked",
            dtype=dtype,
            hidden=hidden,
            num_tokens=1 if hidden == 64 else 7,
        )
        check_dispatch(out, want, layout)
        check_combine(y, combined, want, idx, layout, dtype, runner.backend)


@pytest.mark.parametrize("runner", runner_params(RUNNERS, "reference-shard_map-R4", "cuda"))
@pytest.mark.parametrize("dtype,hidden", [(jnp.bfloat16, 1280), (jnp.float32, 2112)])
def test_rows_of_several_units_with_few_tokens(runner, dtype, hidden):
    """Few tokens and long rows: the CUDA combine cuts each token's row into 512-byte parts,
    a warp each (2560 and 8448 bytes: 5 and 17 parts, the last one short); the sums stay
    the same, bit for bit, for the expert layouts and per_rank's single row."""
    for layout in ("ragged", "per_rank"):
        _, idx, _, out, y, combined, want = run_case(
            runner, layout, "random", dtype=dtype, hidden=hidden, num_tokens=5
        )
        check_dispatch(out, want, layout)
        check_combine(y, combined, want, idx, layout, dtype, runner.backend)


@pytest.mark.parametrize("runner", runner_params(RUNNERS, "reference-shard_map-R4", "cuda"))
def test_many_tokens_in_one_launch_group(runner):
    """A group that runs whole in one launch (EP=1, loopback) reads every source's routing
    and rows from its operands; EP=1 with few ids and loopback groups run one launch
    (csrc/high_throughput/dispatch_here.cu), EP=1 with more than 8 K ids (R * T * K) the
    bitmap, scan and copy kernels: the same results either way."""
    num_tokens = 8 * 1024 // (runner.num_ranks * K) + 3
    for layout in ("expert_major", "ragged", "per_rank"):
        _, idx, _, out, y, combined, want = run_case(
            runner, layout, "random", hidden=128, num_tokens=num_tokens
        )
        check_dispatch(out, want, layout)
        check_combine(y, combined, want, idx, layout, jnp.bfloat16, runner.backend)


def test_on_overflow_error_fails_the_step():
    runner = Runner("reference", 2, "shard_map")
    idx, w = make_routing("one_expert", 2, T, K, E)
    x = make_tokens(2, T, H)
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)

    def fn(x, idx, w):
        return jax_ep.dispatch(x, idx, w, group=group, capacity=2, on_overflow="error").counts

    with pytest.raises(Exception, match="rows did not fit"):
        runner.run(fn, x, idx, w)


def test_combine_with_explicit_weights_matches_dispatch_weights():
    runner = Runner("reference", 4, "shard_map")
    idx, w = make_routing("random", 4, T, K, E)
    x = make_tokens(4, T, H, jnp.float32)
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)

    def fn(x, idx, w):
        out = jax_ep.dispatch(x, idx, w, group=group, layout="ragged")
        return (
            jax_ep.combine(out.x, out.handle, group=group),
            jax_ep.combine(out.x, out.handle, w * 2, group=group),
        )

    a, b = runner.run(fn, x, idx, w)
    np.testing.assert_allclose(b, 2 * a, rtol=1e-6)
