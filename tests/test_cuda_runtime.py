"""CUDA backend behaviour beyond one call: buffer reuse, bounded waits, error reporting.

* repeated calls inside one jit and across jits alternate the double-buffered
  regions and must stay exact;
* a rank that never sends (fault injection) makes its peers time out with an
  error naming rank, peer and phase: at once with ``sync_errors``, otherwise at
  the next call and from ``Group.check()``; the group refuses further work (the
  low-latency dispatch too, with ranks of one block or several).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_kernels
from harness import (
    Runner,
    assert_equal,
    default_capacity,
    make_routing,
    make_tokens,
    oracle_combine,
    oracle_dispatch,
)

import jax_ep

pytestmark = requires_kernels

E, K, T, H = 16, 4, 20, 256


def test_repeated_calls_in_one_jit_and_across_jits():
    runner = Runner("cuda", 4, "loopback", "gpu")
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    inputs = [
        make_routing(r, 4, T, K, E, seed=i) for i, r in enumerate(["random", "skewed", "masked"])
    ]
    x = make_tokens(4, T, H)

    def three_layers_on(g):
        def three_layers(x, i0, w0, i1, w1, i2, w2):
            outs = []
            h = x
            layers = ((i0, w0, "ragged"), (i1, w1, "per_rank"), (i2, w2, "expert_major"))
            for idx, w, layout in layers:
                out = jax_ep.dispatch(h, idx, w, group=g, layout=layout)
                h = jax_ep.combine(out.x, out.handle, group=g)
                outs.append(h)
            return outs

        return three_layers

    flat = [a for pair in inputs for a in pair]
    for _ in range(2):  # the second run re-enters with other parities
        got = runner.run(three_layers_on(group), x, *flat)
        h = x
        for (idx, w), layout, g in zip(
            inputs, ("ragged", "per_rank", "expert_major"), got, strict=True
        ):
            cap = default_capacity(layout, 4, T, K, E)
            want = oracle_dispatch(h, idx, w, E, layout, cap)
            h = oracle_combine([o["x"] for o in want], want, idx, E, layout, jnp.bfloat16)
            assert_equal(g, h, f"{layout} layer")
    other = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    assert other.key != group.key  # numbered: two live groups never share a key
    got2 = runner.run(three_layers_on(other), x, *flat)  # a second group beside the first
    assert_equal(got2[-1], got[-1], "same result from a second group")
    got3 = runner.run(three_layers_on(group), x, *flat)  # the first still works beside it
    assert_equal(got3[-1], got[-1], "first group after the second ran")
    other.close()
    group.close()


def _faulty_group(sync: bool, low_latency: bool = False, ranks: int = 2, **config):
    """A group whose rank ``fault_inject_rank`` (default 1) never sends; one GPU: loopback
    for several ranks, EP=1 for one."""
    runner = Runner("cuda", ranks, "loopback" if ranks > 1 else "shard_map", "gpu")
    cfg = jax_ep.Config(**{"timeout_s": 0.5, "fault_inject_rank": 1, "sync_errors": sync, **config})
    return runner, runner.group(
        num_experts=E,
        num_topk=K,
        hidden=H,
        num_max_tokens_per_rank=T,
        low_latency=low_latency,
        config=cfg,
    )


def _dispatch(group):
    def fn(x, idx, w):
        return jax_ep.dispatch(x, idx, w, group=group).counts

    return fn


PATTERN = (
    r"rank 0 timed out after 0\.\d+ s waiting for rank 1 in phase "
    r"'high-throughput dispatch: waiting for the peer's tokens'"
)


def test_missing_peer_times_out_at_once_with_sync_errors():
    runner, group = _faulty_group(sync=True)
    idx, w = make_routing("random", 2, T, K, E)
    with pytest.raises(jax.errors.JaxRuntimeError, match=PATTERN):
        runner.run(_dispatch(group), make_tokens(2, T, H), idx, w)


def test_missing_peer_reported_by_check_and_next_call():
    runner, group = _faulty_group(sync=False)
    idx, w = make_routing("random", 2, T, K, E)
    x = make_tokens(2, T, H)
    runner.run(_dispatch(group), x, idx, w)  # returns; the kernels gave up after 0.5 s
    with pytest.raises(RuntimeError, match=PATTERN):
        group.check()
    with pytest.raises(jax.errors.JaxRuntimeError, match="group is unusable now"):
        runner.run(_dispatch(group), x, idx, w)


def test_process_survives_a_peer_timeout():
    """After a timeout the group is unusable, but the process is not: the error is
    raised, the group closes, and a new group on the same device works."""
    runner, group = _faulty_group(sync=False)
    idx, w = make_routing("random", 2, T, K, E)
    x = make_tokens(2, T, H)
    runner.run(_dispatch(group), x, idx, w)
    with pytest.raises(RuntimeError, match=PATTERN):
        group.check()
    group.close()
    fresh = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    counts = runner.run(_dispatch(fresh), x, idx, w)
    want = oracle_dispatch(x, idx, w, E, "expert_major", 2 * T)
    assert_equal(counts, np.stack([o["counts"] for o in want]), "counts of the new group")
    fresh.check()
    fresh.close()


@pytest.mark.parametrize(
    "ranks,copy_sms",
    [(1, 1), (2, 2), (2, 0)],
    ids=["ep1-one-block", "loopback2-one-block-per-rank", "loopback2-default-blocks"],
)
def test_missing_peer_in_low_latency_dispatch(ranks, copy_sms):
    """A low-latency rank that never sends makes every receive that waits for it time out.
    With one block per rank its own receive takes its own rows' counts without a signal
    only once its send wrote them; this one never does, so it waits for the signal and
    times out too: at EP=1 that is the only rank, and the error must name it twice."""
    fault = ranks - 1
    runner, group = _faulty_group(
        sync=True, low_latency=True, ranks=ranks, fault_inject_rank=fault, num_copy_sms=copy_sms
    )
    idx, _ = make_routing("random", ranks, T, K, E)

    def fn(x, idx):
        return jax_ep.low_latency_dispatch(x, idx, group=group, fp8=False).counts

    pattern = (
        rf"rank \d timed out after 0\.\d+ s waiting for rank {fault} in phase "
        r"'low-latency dispatch receive: waiting for the peer's token count'"
    )
    with pytest.raises(jax.errors.JaxRuntimeError, match=pattern):
        runner.run(fn, make_tokens(ranks, T, H), idx)
    group.close()


def test_bad_expert_id_is_reported():
    runner = Runner("cuda", 2, "loopback", "gpu")
    group = runner.group(
        num_experts=E,
        num_topk=K,
        hidden=H,
        num_max_tokens_per_rank=T,
        config=jax_ep.Config(sync_errors=True),
    )
    idx, w = make_routing("random", 2, T, K, E)
    idx[1, 3, 2] = 77
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"topk_idx\[3, 2\] = 77 is out of range"):
        runner.run(_dispatch(group), make_tokens(2, T, H), idx, w)
    idx[1, 3, 2] = -1  # the group stays usable after bad input
    counts = runner.run(_dispatch(group), make_tokens(2, T, H), idx, w)
    want = oracle_dispatch(make_tokens(2, T, H), idx, w, E, "expert_major", 2 * T)
    assert_equal(counts, np.stack([o["counts"] for o in want]), "counts after the error")


def test_group_too_small_is_a_trace_time_error():
    runner = Runner("cuda", 2, "loopback", "gpu")
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=8)
    idx, w = make_routing("random", 2, T, K, E)
    with pytest.raises(ValueError, match="20 tokens > num_max_tokens_per_rank=8"):
        runner.run(_dispatch(group), make_tokens(2, T, H), idx, w)
