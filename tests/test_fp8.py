"""FP8 quantisation (jax_ep/fp8.py is the definition) and FP8 dispatch.

Tolerances: e4m3 keeps 3 mantissa bits, so a dequantised value is within
2^-4 relative of the input, plus half the smallest subnormal step (scale * 2^-10)
near zero. FP8 dispatch payloads and scales must equal the quantised source
tokens bit for bit (the kernels quantise with the same arithmetic).
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
    assert_valid_rows_equal,
    default_capacity,
    make_routing,
    make_tokens,
    oracle_dispatch,
)

import jax_ep

E, K, T, H = 16, 4, 10, 512


@pytest.mark.parametrize("round_scale", [False, True])
def test_quantize_roundtrip_tolerance(round_scale):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, H)) * np.exp(rng.uniform(-8, 8, (64, 1)))).astype(np.float32)
    x[3] = 0.0  # an all-zero token: scale from the 1e-4 floor
    q, s = jax_ep.quantize_fp8(jnp.asarray(x), round_scale=round_scale)
    assert q.dtype == jnp.float8_e4m3fn and s.shape == (64, H // 128)
    back = np.asarray(jax_ep.dequantize_fp8(q, s, jnp.float32))
    s_full = np.repeat(np.asarray(s), 128, axis=1)
    np.testing.assert_array_less(np.abs(back - x), np.abs(x) * 2.0**-4 + s_full * 2.0**-10 + 1e-30)
    amax = np.maximum(np.abs(x).reshape(64, -1, 128).max(-1), 1e-4)
    if round_scale:
        mant, _ = np.frexp(np.asarray(s))
        assert np.all(mant == 0.5), "scales must be powers of two"
        lower = amax * np.float32(1 / 448)
        assert np.all(np.asarray(s) >= lower) and np.all(np.asarray(s) < lower * 2)
    else:
        np.testing.assert_array_equal(
            np.asarray(s), (amax * np.float32(1 / 448)).astype(np.float32)
        )


def test_quantize_rejects_bad_hidden():
    with pytest.raises(ValueError, match="hidden % 128"):
        jax_ep.quantize_fp8(jnp.ones((2, 100)))


RUNNERS = [Runner("reference", 4, "shard_map"), Runner("reference", 2, "loopback")]
if HAS_KERNELS:
    RUNNERS += [Runner("cuda", 2, "loopback", "gpu"), Runner("cuda", 1, "shard_map", "gpu")]


@pytest.mark.parametrize("runner", RUNNERS, ids=[str(r) for r in RUNNERS])
@pytest.mark.parametrize("layout", ["expert_major", "ragged", "per_rank"])
@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_dispatch_payload(runner, layout, round_scale):
    R = runner.num_ranks
    idx, w = make_routing("masked", R, T, K, E, seed=11)
    x = make_tokens(R, T, H, jnp.bfloat16) * 3
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)

    def fn(x, idx, w):
        out = jax_ep.dispatch(
            x, idx, w, group=group, layout=layout, fp8=True, round_scale=round_scale
        )
        return out.x, out.scales, out.counts

    ox, os_, counts = runner.run(fn, x, idx, w)
    # the expected bytes come from XLA:CPU (IEEE arithmetic), whatever device runs the op
    q, s = jax.jit(lambda v: jax_ep.quantize_fp8(v, round_scale=round_scale))(
        jax.device_put(x, jax.devices("cpu")[0])
    )
    cap = default_capacity(layout, R, T, K, E)
    want_q = oracle_dispatch(np.asarray(q), idx, w, E, layout, cap)
    want_s = oracle_dispatch(np.asarray(s), idx, w, E, layout, cap)
    for me in range(R):
        n = want_q[me]["counts"]
        assert_equal(counts[me], n, f"rank {me} counts")
        assert_valid_rows_equal(os_[me], want_s[me]["x"], n, layout, f"rank {me} scales")
        # as bytes: bit-exact e4m3
        got_q, want = np.asarray(ox[me]).view(np.uint8), np.asarray(want_q[me]["x"]).view(np.uint8)
        assert_valid_rows_equal(got_q, want, n, layout, f"rank {me} payload")
