"""Worker of test_multiprocess: one process per EP rank, dispatch + combine (high-throughput
and low-latency) vs the oracle.

argv[1]: the transport, "ipc" (cudaMalloc + CUDA IPC, default) or "nvshmem" (NVSHMEM
symmetric heap); argv[2]: Config.node_size (NVSHMEM; 0 = ranks per host), so one host
splits into virtual nodes and the two-level internode kernels run; argv[3] = "fault":
rank 1 never sends, every rank must fail with a timeout error instead of hanging. All
processes may share one GPU (CUDA MPS makes their kernels run side by side).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_ep.launch import initialize  # noqa: E402

pid, count = initialize(timeout_s=120)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from harness import (  # noqa: E402
    assert_equal,
    assert_valid_rows_equal,
    default_capacity,
    make_routing,
    make_tokens,
    oracle_combine,
    oracle_dispatch,
    oracle_low_latency,
    oracle_low_latency_combine,
)
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402

E, K, T, H = 16, 4, 24, 512
mesh = Mesh(np.array(jax.devices()), ("ep",))
R = mesh.shape["ep"]
transport = sys.argv[1] if len(sys.argv) > 1 else "ipc"
node_size = int(sys.argv[2]) if len(sys.argv) > 2 else 0
fault = len(sys.argv) > 3 and sys.argv[3] == "fault"
config = jax_ep.Config(
    num_sms=4,
    num_copy_sms=8,
    timeout_s=2 if fault else 60,
    transport=transport,
    node_size=node_size,
    fault_inject_rank=1 if fault else -1,
    sync_errors=fault,
)
group = jax_ep.Group(
    mesh,
    "ep",
    num_experts=E,
    num_topk=K,
    hidden=H,
    num_max_tokens_per_rank=T,
    backend="cuda",
    low_latency=True,
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
if fault:
    try:
        jax.block_until_ready(f(put(x), put(idx), put(w)))
    except Exception as e:  # JaxRuntimeError with the kernel's record
        assert "timed out" in str(e) and "waiting for rank" in str(e), e
        print(f"rank {pid}: timeout reported: {str(e).splitlines()[0][:300]}")
        sys.exit(0)
    raise SystemExit(f"rank {pid}: a peer that never sends did not time out")
nodes = R // group._runtime.node_size
if node_size:  # the two-level kernels run: ranks split into nodes of node_size
    assert group._runtime.node_size == node_size and nodes > 1, group._runtime.node_size
for step in range(3):  # buffer reuse across calls
    out, combined = f(put(x), put(idx), put(w))
    local = jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data)[0], (out, combined))
    cap = default_capacity("ragged", R, T, K, E)
    want = oracle_dispatch(x, idx, w, E, "ragged", cap)[pid]
    assert_valid_rows_equal(local[0].x, want["x"], want["counts"], "ragged", f"rank {pid} x")
    assert_equal(local[0].counts, want["counts"], f"rank {pid} counts")
    all_want = oracle_dispatch(x, idx, w, E, "ragged", cap)
    expect = oracle_combine(
        [o["x"] for o in all_want], all_want, idx, E, "ragged", jnp.bfloat16, R // nodes
    )
    assert_equal(local[1], expect[pid], f"rank {pid} combine step {step}")


def ll_per_rank(x, idx, w):
    out = jax_ep.low_latency_dispatch(x[0], idx[0], group=group, fp8=False)
    y = jax_ep.low_latency_combine(out.x, idx[0], w[0], out.handle, group=group)
    return jax.tree.map(lambda a: a[None], (out.x, out.counts, y))


g = jax.jit(jax.shard_map(ll_per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
for step in range(3):
    lx, lcounts, ly = jax.tree.map(
        lambda a: np.asarray(a.addressable_shards[0].data)[0], g(put(x), put(idx), put(w))
    )
    want, _ = oracle_low_latency(x, idx, E, T)
    assert_equal(lcounts, want[pid]["counts"], f"rank {pid} ll counts step {step}")
    for e, n in enumerate(want[pid]["counts"]):
        assert_equal(lx[e, :n], want[pid]["x"][e], f"rank {pid} ll e{e} x step {step}")
    # every rank's dispatched rows, to build the combine oracle (rows are the oracle's)
    rows = [[o["x"][e] for e in range(E // R)] for o in want]
    ys = []
    for r in range(R):
        buf = np.zeros((E // R, R * T, H), np.float32)
        for e, block in enumerate(rows[r]):
            buf[e, : len(block)] = np.asarray(block, np.float32)
        ys.append(buf.astype(jnp.bfloat16))
    expect = oracle_low_latency_combine(ys, idx, w, E, T, jnp.bfloat16)
    assert_equal(ly, expect[pid], f"rank {pid} ll combine step {step}")
group.check()
kind = jax.local_devices()[0].device_kind
print(f"rank {pid}/{count} ({transport}, {nodes} node(s)) OK on {kind}")
