"""Low-latency dispatch/combine (decode path) against the NumPy oracle.

Checked: counts, src info, first-k slots and layout ranges exact; BF16 payload
rows exact; FP8 payload and scales exact against jax_ep.fp8.quantize of the
source tokens; combine in float32 k order (bit-exact for bf16 outputs). Rows
past ``counts[e]`` are undefined and never compared. Also: the split
send/receive forms with work and a second dispatch in between, T < T_max,
ranks marked failed in ``active_ranks``, and ranks served by one block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HAS_KERNELS
from harness import (
    Runner,
    assert_equal,
    assert_within_ulps,
    make_routing,
    make_tokens,
    oracle_low_latency,
    oracle_low_latency_combine,
    runner_params,
)

import jax_ep

E, K, H, T_MAX = 16, 4, 256, 8

RUNNERS = [
    Runner("reference", 2, "shard_map"),
    Runner("reference", 4, "shard_map"),
    Runner("reference", 2, "loopback"),
]
if HAS_KERNELS:
    RUNNERS += [
        Runner("cuda", 1, "shard_map", "gpu"),
        Runner("cuda", 2, "loopback", "gpu"),
        Runner("cuda", 4, "loopback", "gpu"),
    ]
IDS = [str(r) for r in RUNNERS]


def ll_group(runner, **config):
    return runner.group(
        num_experts=E,
        num_topk=K,
        hidden=H,
        num_max_tokens_per_rank=T_MAX,
        low_latency=True,
        config=jax_ep.Config(**config),
    )


def check_combine(runner, got, want):
    """Bit-exact for the kernels; the reference's multiply-add may become an FMA under XLA,
    which moves a rounding by at most 1 bf16 ulp."""
    if runner.backend == "cuda":
        assert_equal(got, want, "combine")
    else:
        assert_within_ulps(got, want, jnp.bfloat16, 1)


def check_rows(out, want, fp8, x):
    for me, o in enumerate(want):
        assert_equal(out.counts[me], o["counts"], f"rank {me} counts")
        assert_equal(out.handle.layout_range[me], o["ranges"], f"rank {me} layout_range")
        for e, n in enumerate(o["counts"]):
            assert_equal(
                out.handle.recv_src_info[me, e, :n], o["src_info"][e], f"rank {me} e{e} src"
            )
            assert_equal(
                out.handle.recv_topk_slot[me, e, :n], o["topk_slot"][e], f"rank {me} e{e} k"
            )
            if fp8:
                q, s = jax.jit(jax_ep.quantize_fp8)(
                    jax.device_put(o["x"][e], jax.devices("cpu")[0])
                )
                np.testing.assert_array_equal(
                    np.asarray(out.x[me, e, :n]).view(np.uint8),
                    np.asarray(q).view(np.uint8),
                    f"rank {me} e{e} fp8",
                )
                assert_equal(out.scales[me, e, :n], s, f"rank {me} e{e} scales")
            else:
                assert_equal(out.x[me, e, :n], o["x"][e], f"rank {me} e{e} x")


@pytest.mark.parametrize("runner", RUNNERS, ids=IDS)
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(
    "routing,num_tokens", [("random", T_MAX), ("masked", 5), ("duplicates", 1)]
)
def test_dispatch_and_combine(runner, fp8, routing, num_tokens, one_launch=True):
    R = runner.num_ranks
    idx, w = make_routing(routing, R, num_tokens, K, E, seed=R + num_tokens)
    x = make_tokens(R, num_tokens, H)
    group = ll_group(runner, low_latency_one_launch=one_launch)

    def fn(x, idx, w):
        out = jax_ep.low_latency_dispatch(x, idx, group=group, fp8=fp8)
        rows = out.x if not fp8 else jax_ep.dequantize_fp8(out.x, out.scales)
        y = (rows.astype(jnp.float32) * 0.5 + 1).astype(jnp.bfloat16)  # stand-in expert
        return out, y, jax_ep.low_latency_combine(y, idx, w, out.handle, group=group)

    out, y, combined = runner.run(fn, x, idx, w)
    want, dropped = oracle_low_latency(x, idx, E, T_MAX)
    check_rows(out, want, fp8, x)
    assert_equal(out.num_dropped, np.array(dropped, np.int32), "num_dropped")
    check_combine(runner, combined, oracle_low_latency_combine(y, idx, w, E, T_MAX, jnp.bfloat16))


@pytest.mark.parametrize(
    "runner",
    runner_params(RUNNERS, "reference-shard_map-R2", "cuda-shard_map-R1", "cuda-loopback-R2"),
)
@pytest.mark.parametrize("fp8", [False, True])
def test_one_block_per_rank(runner, fp8):
    """Config.num_copy_sms = the launch's ranks: one block per rank, where the one-launch
    ops skip a rank's signal to itself (its receive reads the rows its own send wrote, in
    the same block). Four rounds of different routings in order, so each buffer half is
    reused and its receive record waited on. A short timeout and synchronous errors: a
    receive that waited for a signal never sent fails in seconds, naming the phase."""
    R = runner.num_ranks
    group = ll_group(
        runner, num_copy_sms=R if runner.mode == "loopback" else 1, timeout_s=5.0, sync_errors=True
    )
    cases = [("random", T_MAX), ("masked", 5), ("duplicates", 1), ("skewed", T_MAX)]
    inputs = []
    for i, (routing, n) in enumerate(cases):
        idx, w = make_routing(routing, R, n, K, E, seed=20 + i)
        inputs.append((make_tokens(R, n, H, seed=30 + i), idx, w))

    def fn(*args):
        rounds = []
        for x, idx, w in zip(args[0::3], args[1::3], args[2::3], strict=True):
            out = jax_ep.low_latency_dispatch(x, idx, group=group, fp8=fp8)
            rows = out.x if not fp8 else jax_ep.dequantize_fp8(out.x, out.scales)
            y = (rows.astype(jnp.float32) * 0.5 + 1).astype(jnp.bfloat16)  # stand-in expert
            rounds.append((out, y, jax_ep.low_latency_combine(y, idx, w, out.handle, group=group)))
        return rounds

    results = runner.run(fn, *[a for case in inputs for a in case])
    for (x, idx, w), (out, y, combined) in zip(inputs, results, strict=True):
        want, dropped = oracle_low_latency(x, idx, E, T_MAX)
        check_rows(out, want, fp8, x)
        assert_equal(out.num_dropped, np.array(dropped, np.int32), "num_dropped")
        want_y = oracle_low_latency_combine(y, idx, w, E, T_MAX, jnp.bfloat16)
        check_combine(runner, combined, want_y)


@pytest.mark.parametrize("runner", runner_params(RUNNERS, "cuda-shard_map-R1", "cuda-loopback-R4"))
def test_one_call_forms_in_two_launches(runner):
    """Config(low_latency_one_launch=False): the one-call ops launch the split forms'
    two kernels (what a GPU shared with another process's rank gets), same results."""
    test_dispatch_and_combine(runner, True, "masked", 5, one_launch=False)


@pytest.mark.parametrize(
    "runner", runner_params(RUNNERS, "reference-shard_map-R4", "cuda-loopback-R2")
)
def test_split_halves_with_work_and_two_outstanding(runner):
    """send(A), send(B), compute, recv(A), recv(B) equals two fused dispatches."""
    R = runner.num_ranks
    idx_a, w_a = make_routing("random", R, T_MAX, K, E, seed=1)
    idx_b, w_b = make_routing("skewed", R, T_MAX, K, E, seed=2)
    x_a, x_b = make_tokens(R, T_MAX, H, seed=3), make_tokens(R, T_MAX, H, seed=4)
    group = ll_group(runner)

    def fn(x_a, idx_a, x_b, idx_b, w_a, w_b):
        ta = jax_ep.low_latency_dispatch_send(x_a, idx_a, group=group, fp8=False)
        tb = jax_ep.low_latency_dispatch_send(x_b, idx_b, group=group, fp8=False)
        busy = jnp.tanh(
            x_a.astype(jnp.float32) @ x_b.astype(jnp.float32).T
        ).sum()  # overlapped work
        a = jax_ep.low_latency_dispatch_recv(ta)
        b = jax_ep.low_latency_dispatch_recv(tb)
        ca = jax_ep.low_latency_combine_send(a.x, idx_a, w_a, a.handle, group=group)
        ya = jax_ep.low_latency_combine_recv(ca, idx_a, w_a, a.handle)
        fa = jax_ep.low_latency_dispatch(x_a, idx_a, group=group, fp8=False)
        return a, b, ya, fa, busy

    a, b, ya, fa, busy = runner.run(fn, x_a, idx_a, x_b, idx_b, w_a, w_b)
    check_rows(a, oracle_low_latency(x_a, idx_a, E, T_MAX)[0], False, x_a)
    check_rows(b, oracle_low_latency(x_b, idx_b, E, T_MAX)[0], False, x_b)
    check_rows(fa, oracle_low_latency(x_a, idx_a, E, T_MAX)[0], False, x_a)
    assert np.isfinite(busy).all()
    want = oracle_low_latency_combine(
        [a.x[r] for r in range(R)], idx_a, w_a, E, T_MAX, jnp.bfloat16
    )
    check_combine(runner, ya, want)


@pytest.mark.parametrize(
    "runner", runner_params(RUNNERS, "reference-shard_map-R4", "cuda-loopback-R4")
)
def test_failed_rank_is_skipped(runner):
    R = runner.num_ranks
    idx, w = make_routing("random", R, T_MAX, K, E, seed=9)
    x = make_tokens(R, T_MAX, H)
    active = np.ones(R, np.int32)
    active[1] = 0
    group = ll_group(runner)

    def fn(x, idx, w, act):
        out = jax_ep.low_latency_dispatch(x, idx, group=group, fp8=False, active_ranks=act)
        return out, jax_ep.low_latency_combine(out.x, idx, w, out.handle, group=group)

    out, combined = runner.run(fn, x, idx, w, np.broadcast_to(active, (R, R)).copy())
    want, dropped = oracle_low_latency(x, idx, E, T_MAX, active)
    live = [r for r in range(R) if active[r]]
    for me in live:
        assert_equal(out.counts[me], want[me]["counts"], f"rank {me} counts")
        assert_equal(out.num_dropped[me], dropped[me], f"rank {me} dropped")
        for e, n in enumerate(want[me]["counts"]):
            assert_equal(out.x[me, e, :n], want[me]["x"][e], f"rank {me} e{e} x")
    expect = oracle_low_latency_combine(
        [out.x[r] for r in range(R)], idx, w, E, T_MAX, jnp.bfloat16, active
    )
    check_combine(runner, combined[live], expect[live])
    assert sum(dropped) > 0
