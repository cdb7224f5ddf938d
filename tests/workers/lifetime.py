"""Worker of test_ordering_and_lifetime: one GPU, run in a fresh process per case, since
XLA reads its flags once (the test sets XLA_FLAGS) and some cases end a peer or a group.

argv[1] is the case; argv[2] a scratch file. Exits 0 when the case holds; otherwise
raises (the test shows the output).

* ``concurrent``: under CONCURRENT command-buffer scheduling, one jitted step with two
  independent low-latency sends (and their receives) and a high-throughput
  dispatch/combine pair; every result equals the reference backend's.
* ``closed``: a jitted step that ran, run again after ``group.close()``: a clear error,
  never a result (with command buffers on, the replayed CUDA graph would otherwise
  reach freed memory).
* ``export`` / ``load`` / ``load-other``: export a program in one process; load and run
  it in another that made the same group (same results) or a group with other sizes
  (a clear error naming the key).
* ``cycles``: 1000 create/use/close cycles of a small group leave device memory where
  it started.
* ``kill``: two processes (one per rank, sharing the GPU); rank 1 is SIGKILLed before a
  dispatch, rank 0 must fail within its timeout with an error naming rank, peer and
  phase (it writes the message to the scratch file).
"""

from __future__ import annotations

import gc
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASE, SCRATCH = sys.argv[1], sys.argv[2]
if CASE == "kill":
    from jax_ep.launch import initialize

    initialize(timeout_s=120)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from harness import assert_equal, make_routing, make_tokens  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep.backends.cuda import extension  # noqa: E402
from jax_ep.transports import kv_store  # noqa: E402

R, E, K, T, H = 2, 16, 4, 32, 256
DEV = jax.devices()[0]


def loopback_group(backend="cuda", **kw):
    kw = dict(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T) | kw
    cfg = jax_ep.Config(num_sms=2, num_copy_sms=8, timeout_s=20)
    return jax_ep.Group(None, "ep", backend=backend, loopback=R, config=cfg, **kw)


def inputs(seed=0):
    idx, w = make_routing("random", R, T, K, E, seed=seed)
    x = make_tokens(R, T, H, seed=seed + 1)
    return [jax.device_put(jnp.asarray(a), DEV) for a in (x, idx, w)]


def step_fn(group):
    """Two independent low-latency dispatches and a high-throughput pair: nothing but the
    ordering token orders them."""

    def step(x, idx, w):
        a = jax_ep.low_latency_dispatch_send(x, idx, group=group, fp8=False)
        b = jax_ep.low_latency_dispatch_send(x * 2, idx, group=group, fp8=False)
        out_a = jax_ep.low_latency_dispatch_recv(a)
        out_b = jax_ep.low_latency_dispatch_recv(b)
        d = jax_ep.dispatch(x, idx, w, group=group, layout="ragged")
        y = jax_ep.combine(d.x, d.handle, group=group)
        return out_a.counts, out_a.x, out_b.counts, out_b.x, d.counts, d.x, y

    return jax.jit(jax.vmap(step, axis_name="ep"))


def valid_rows(counts, rows):
    """Rows [0, counts[e]) of each expert: the defined part of a low-latency output."""
    return [np.asarray(rows[r, e, : counts[r, e]]) for r in range(R) for e in range(E // R)]


def case_concurrent():
    cuda, ref = loopback_group(low_latency=True), loopback_group("reference", low_latency=True)
    args = inputs()
    f_cuda, f_ref = step_fn(cuda), step_fn(ref)
    for _ in range(3):  # replays too
        got = jax.tree.map(np.asarray, f_cuda(*args))
    want = jax.tree.map(np.asarray, f_ref(*args))
    for i in (0, 2):  # low-latency counts and rows
        assert_equal(got[i], want[i], f"low-latency counts {i}")
        for g, w in zip(
            valid_rows(got[i], got[i + 1]), valid_rows(want[i], want[i + 1]), strict=True
        ):
            assert_equal(g, w, f"low-latency rows {i}")
    assert_equal(got[4], want[4], "dispatch counts")
    total = got[4].sum(axis=1)
    for r in range(R):
        assert_equal(got[5][r, : total[r]], want[5][r, : total[r]], "dispatch rows")
    assert_equal(got[6], want[6], "combine")
    cuda.check()


def case_closed():
    group = loopback_group(low_latency=True)
    f = step_fn(group)
    args = inputs()
    compiled = f.lower(*args).compile()  # a program the user holds outlives JAX's caches
    for _ in range(3):
        jax.block_until_ready(f(*args))
        jax.block_until_ready(compiled(*args))
    group.close()
    try:
        jax.block_until_ready(compiled(*args))
    except Exception as e:  # XLA raises JaxRuntimeError
        assert "has been closed" in str(e), f"unexpected error: {e}"
        print("compiled program refused after close:", str(e).splitlines()[0])
    else:
        raise AssertionError("a compiled program of a closed group ran")
    try:
        jax.block_until_ready(f(*args))  # retraced: refused at trace time
    except ValueError as e:
        assert "is closed" in str(e), f"unexpected error: {e}"
        print("jitted function refused after close:", e)
    else:
        raise AssertionError("a jitted function of a closed group ran")
    # a new group on the same device, same key: works, with a newly traced program
    again = loopback_group(low_latency=True)
    assert again.key == group.key
    jax.block_until_ready(step_fn(again)(*args))
    again.check()


def exported_step(group):
    def per_rank(x, idx, w):
        d = jax_ep.dispatch(x, idx, w, group=group, layout="expert_major")
        return jax_ep.combine(d.x, d.handle, group=group)

    return jax.jit(jax.vmap(per_rank, axis_name="ep"))


def case_export():
    group = loopback_group()
    args = inputs()
    want = np.asarray(exported_step(group)(*args))
    exp = jax.export.export(
        exported_step(group), disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ALL")]
    )(*args)
    with open(SCRATCH, "wb") as f:
        f.write(exp.serialize())
    np.save(SCRATCH + ".npy", want.view(np.uint16))


def case_load(other_sizes: bool):
    group = loopback_group(hidden=2 * H) if other_sizes else loopback_group()
    with open(SCRATCH, "rb") as f:
        exp = jax.export.deserialize(bytearray(f.read()))
    try:
        got = np.asarray(exp.call(*inputs()))
    except Exception as e:
        assert other_sizes, f"loading with the same group failed: {e}"
        assert "no live group with that key" in str(e), f"unexpected error: {e}"
        print("refused:", str(e).splitlines()[0])
        return
    assert not other_sizes, "a program bound to a group of other sizes"
    assert_equal(got.view(np.uint16), np.load(SCRATCH + ".npy"), "exported program")
    group.close()


def report(line: str) -> None:
    """Prints a result line, and appends it to $JAX_EP_TEST_REPORT (the GPU session's log)."""
    print(line)
    if os.environ.get("JAX_EP_TEST_REPORT"):
        with open(os.environ["JAX_EP_TEST_REPORT"], "a") as f:
            f.write(line + "\n")


def case_cycles():
    n = int(os.environ.get("JAX_EP_TEST_CYCLES", "1000"))
    ext = extension.require()
    args = inputs()
    group = loopback_group(num_max_tokens_per_rank=8)
    buffer_bytes = group.buffer_bytes()
    f = exported_step(group)
    x8 = [a[:, :8] for a in args]
    jax.block_until_ready(f(*x8))  # warm: kernels, XLA's own allocations
    group.close()
    del f
    gc.collect()
    start = ext.device_memory(DEV.local_hardware_id)[0]
    states = ext.live_device_states()
    for i in range(n):
        group = loopback_group(num_max_tokens_per_rank=8)
        jax.block_until_ready(exported_step(group)(*x8))
        group.close()
        if i % 100 == 99:
            gc.collect()
    gc.collect()
    end = ext.device_memory(DEV.local_hardware_id)[0]
    leaked = start - end
    report(
        f"{n} create/use/close cycles: free device memory {start} -> {end} bytes ({leaked} "
        f"fewer); group states alive {states} -> {ext.live_device_states()}; one group's "
        f"buffers: {buffer_bytes} bytes"
    )
    with open(SCRATCH, "w") as f:
        f.write(str(leaked))
    assert ext.live_device_states() == states, "closed groups' states were not released"
    # below one group's buffers: the driver's allocation granularity, not a leak per cycle
    assert leaked < buffer_bytes, f"{leaked} bytes not returned after {n} cycles"


def case_kill():
    pid = jax.process_index()
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    cfg = jax_ep.Config(num_sms=2, num_copy_sms=8, timeout_s=3)
    group = jax_ep.Group(
        mesh, "ep", num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T, config=cfg
    )
    idx, w = make_routing("random", R, T, K, E)
    x = make_tokens(R, T, H)
    sharding = NamedSharding(mesh, P("ep"))
    # each process supplies its rank's rows of the global inputs
    args = [
        jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i]) for a in (x, idx, w)
    ]

    def per_rank(x, idx, w):
        d = jax_ep.dispatch(x[0], idx[0], w[0], group=group, layout="ragged")
        return jax_ep.combine(d.x, d.handle, group=group)[None]

    f = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    jax.block_until_ready(f(*args))  # both ranks alive: fine
    kv_store.barrier("test/before-the-kill", 60)
    if pid == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        jax.block_until_ready(f(*args))
        group.check()
        jax.block_until_ready(f(*args))  # a recorded timeout is reported by the next call
        message = "no error"
    except Exception as e:
        message = str(e)
    with open(SCRATCH, "w") as fh:
        fh.write(message)
    report(f"killed peer: rank 0 got: {message.splitlines()[0] if message else ''}")
    os._exit(0)  # the coordinator would wait for the dead peer at shutdown


if __name__ == "__main__":
    {
        "concurrent": case_concurrent,
        "closed": case_closed,
        "export": case_export,
        "load": lambda: case_load(False),
        "load-other": lambda: case_load(True),
        "cycles": case_cycles,
        "kill": case_kill,
    }[CASE]()
