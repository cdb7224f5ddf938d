"""Worker of test_command_buffers: a decode-like jitted step of low-latency ops, run under
whatever XLA_FLAGS the test sets (command buffers on or off).

Loopback: 2 virtual ranks on the first GPU. The step chains dispatch (FP8, then BF16),
an expert stand-in and combine, and is called STEPS times, each call feeding the next.
Writes the final tokens and the group's call statistics to ``argv[1]`` (.npz) so the
test can compare runs with and without command buffers.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import jax_ep

R, E, K, T, H = 2, 16, 4, 8, 256
PAIRS, STEPS = 2, 8

mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
group = jax_ep.Group(
    mesh,
    "ep",
    num_experts=E,
    num_topk=K,
    hidden=H,
    num_max_tokens_per_rank=T,
    backend="cuda",
    loopback=R,
    low_latency=True,
    config=jax_ep.Config(num_sms=2, num_copy_sms=4, timeout_s=30),
)
rng = np.random.default_rng(7)
x = jnp.asarray(rng.standard_normal((R, T, H)), jnp.bfloat16)
idx = rng.integers(-1, E, (R, T, K)).astype(np.int32)  # -1: masked slots too
w = jnp.asarray(rng.random((R, T, K)), jnp.float32)


def step(x, idx, w):
    for pair in range(PAIRS):
        fp8 = pair % 2 == 0
        out = jax_ep.low_latency_dispatch(x, idx, group=group, fp8=fp8)
        rows = jax_ep.dequantize_fp8(out.x, out.scales, jnp.float32) if fp8 else out.x
        y = (rows.astype(jnp.float32) * 0.5).astype(jnp.bfloat16)  # expert stand-in
        x = jax_ep.low_latency_combine(y, idx, w, out.handle, group=group)
    return x


f = jax.jit(jax.vmap(step, axis_name="ep"))
dev = jax.devices()[0]
x, idx, w = (jax.device_put(a, dev) for a in (x, jnp.asarray(idx), w))
for _ in range(STEPS):
    x = f(x, idx, w)
x = np.asarray(jax.block_until_ready(x)).view(np.uint16)
(stats,) = group.call_stats()
group.check()
np.savez(sys.argv[1], x=x, stats=json.dumps(stats), pairs=PAIRS, steps=STEPS)
print(json.dumps(stats))
