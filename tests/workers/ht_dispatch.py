"""Worker of test_multiprocess: one process per EP rank (CUDA IPC), dispatch + combine vs oracle.

All processes may share one GPU (CUDA MPS makes their kernels run side by side).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_ep.launch import initialize  # noqa: E402

pid, count = initialize(timeout_s=120)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from harness import assert_equal, make_routing, make_tokens, oracle_combine, oracle_dispatch  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402

E, K, T, H = 16, 4, 24, 512
mesh = Mesh(np.array(jax.devices()), ("ep",))
R = mesh.shape["ep"]
config = jax_ep.Config(num_sms=4, num_copy_sms=8, timeout_s=60)
group = jax_ep.Group(
    mesh,
    "ep",
    num_experts=E,
    num_topk=K,
    hidden=H,
    num_max_tokens_per_rank=T,
    backend="cuda",
    config=config,
)
idx, w = make_routing("skewed", R, T, K, E, seed=42)
x = make_tokens(R, T, H)
sharding = NamedSharding(mesh, P("ep"))


def put(a):
    return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])


def per_rank(x, idx, w):
    out = jax_ep.dispatch(x[0], idx[0], w[0], group=group, layout="ragged")
    return jax.tree.map(lambda a: a[None], (out, jax_ep.combine(out.x, out.handle, group=group)))


f = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
for step in range(3):  # buffer reuse across calls
    out, combined = f(put(x), put(idx), put(w))
    local = jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data)[0], (out, combined))
    cap = R * T * min(K, E // R)
    want = oracle_dispatch(x, idx, w, E, "ragged", cap)[pid]
    assert_equal(local[0].x, want["x"], f"rank {pid} x step {step}")
    assert_equal(local[0].counts, want["counts"], f"rank {pid} counts")
    all_want = oracle_dispatch(x, idx, w, E, "ragged", cap)
    expect = oracle_combine([o["x"] for o in all_want], all_want, idx, E, "ragged", jnp.bfloat16)
    assert_equal(local[1], expect[pid], f"rank {pid} combine step {step}")
group.check()
print(f"rank {pid}/{count} OK on {jax.local_devices()[0].device_kind}")
