"""``jax.export`` with a symbolic token count, and jit cache reuse.

The handlers read every size from their buffers, so one exported artifact
serves any token count; the CUDA targets need the custom-call safety check
disabled, as every FFI extension does. The reference backend is exported at EP 1
only: with symbolic shapes, XLA:CPU crashes on collectives across several devices
(jax 0.10.2: a plain ``psum`` under ``shard_map`` segfaults), which the CUDA
backend does not use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HAS_KERNELS
from harness import Runner, make_routing, make_tokens
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep

E, K, H = 16, 4, 128
CUDA_TARGETS = [
    "jax_ep_high_throughput_dispatch",
    "jax_ep_high_throughput_combine",
    "jax_ep_dispatch_layout",
]

RUNNERS = [Runner("reference", 1, "shard_map")]
if HAS_KERNELS:
    RUNNERS += [Runner("cuda", 1, "shard_map", "gpu"), Runner("cuda", 2, "loopback", "gpu")]


def layer(runner, group, layout):
    def per_rank(x, idx, w):
        out = jax_ep.dispatch(x, idx, w, group=group, layout=layout)
        return jax_ep.combine(out.x, out.handle, group=group)

    if runner.mode == "loopback":
        return jax.jit(jax.vmap(per_rank, axis_name="ep"))

    def sharded(x, idx, w):
        return per_rank(x[0], idx[0], w[0])[None]

    return jax.jit(jax.shard_map(sharded, mesh=group.mesh, in_specs=P("ep"), out_specs=P("ep")))


@pytest.mark.parametrize("runner", RUNNERS, ids=[str(r) for r in RUNNERS])
@pytest.mark.parametrize("layout", ["ragged", "per_rank"])
def test_export_symbolic_tokens(runner, layout):
    R = runner.num_ranks
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=16)
    f = layer(runner, group, layout)
    (t,) = jax.export.symbolic_shape("t")
    sharding = NamedSharding(runner.mesh, P("ep") if runner.mode == "shard_map" else P())
    args = (
        jax.ShapeDtypeStruct((R, t, H), jnp.bfloat16, sharding=sharding),
        jax.ShapeDtypeStruct((R, t, K), jnp.int32, sharding=sharding),
        jax.ShapeDtypeStruct((R, t, K), jnp.float32, sharding=sharding),
    )
    checks = [jax.export.DisabledSafetyCheck.custom_call(n) for n in CUDA_TARGETS]
    # lowered for the runner's devices (the reference runners use the CPU devices, also on a
    # GPU machine, where export would otherwise lower for the default backend, CUDA)
    platforms = ["cpu"] if runner.platform == "cpu" else None
    exported = jax.export.export(f, disabled_checks=checks, platforms=platforms)(*args)
    restored = jax.export.deserialize(exported.serialize())
    for num_tokens in (5, 16):
        idx, w = make_routing("masked", R, num_tokens, K, E, seed=num_tokens)
        x = make_tokens(R, num_tokens, H)
        put = [jax.device_put(a, sharding) for a in (x, idx, w)]
        np.testing.assert_array_equal(
            np.asarray(restored.call(*put)).astype(np.float32),
            np.asarray(f(*put)).astype(np.float32),
        )


def test_jit_cache_is_reused():
    runner = Runner("reference", 4, "shard_map")
    group = runner.group(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=8)
    traces = []

    def per_rank(x, idx, w):
        traces.append(1)
        out = jax_ep.dispatch(x[0], idx[0], w[0], group=group)
        return jax_ep.combine(out.x, out.handle, group=group)[None]

    f = jax.jit(jax.shard_map(per_rank, mesh=group.mesh, in_specs=P("ep"), out_specs=P("ep")))
    sharding = NamedSharding(runner.mesh, P("ep"))
    for seed in range(3):
        idx, w = make_routing("random", 4, 8, K, E, seed=seed)
        jax.block_until_ready(
            f(*[jax.device_put(a, sharding) for a in (make_tokens(4, 8, H), idx, w)])
        )
    assert len(traces) == 1
