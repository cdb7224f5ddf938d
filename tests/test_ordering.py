"""No state XLA cannot see: the ordering token, group keys and lifetimes.

CPU (needs only the compiled extension, no GPU): the CUDA backend's calls lowered
inside shard_map form one chain through their ordering tokens (each op takes the token
the previous op of the group returned, also inside jax.grad and its backward pass),
receives are never dead code, and every call names its group by key.

GPU (one process per case, tests/workers/lifetime.py): results under CONCURRENT
command-buffer scheduling equal the reference's; a closed group's programs are refused
(with and without CUDA graphs) and a new group works; an exported program runs in
another process that made the same group and is refused by one with other sizes;
1000 create/use/close cycles release everything; a SIGKILLed peer makes the survivor
fail within its timeout, naming rank, peer and phase.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cpu_devices, requires_kernels
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep.backends.cuda import extension
from jax_ep.ordering import OrderChain

requires_extension = pytest.mark.skipif(
    extension.extension() is None, reason=extension.missing_reason() or "built"
)

# ---------------------------------------------------------------------------
# CPU: the token chain in the lowered program
# ---------------------------------------------------------------------------

CALL = re.compile(r"(%[\w#]+)(?::\d+)? = stablehlo\.custom_call @(jax_ep_\w+)\(([^)]*)\)(.*)")


def _lowering_only_cuda_group(mesh):
    """A group whose ops lower as the CUDA backend's calls (nothing runs, so no GPU)."""
    group = jax_ep.Group(
        mesh,
        "ep",
        num_experts=8,
        num_topk=2,
        hidden=128,
        num_max_tokens_per_rank=4,
        backend="reference",
        low_latency=True,
    )
    group.backend, group.order = "cuda", OrderChain()
    return group


def _calls(text):
    """(result name, target, operand names, attributes) of every jax_ep custom call."""
    out = []
    for line in text.splitlines():
        m = CALL.search(line)
        if m:
            out.append((m.group(1), m.group(2), [a.strip() for a in m.group(3).split(",")], m[4]))
    return out


@requires_extension
def test_ops_of_a_group_form_one_token_chain():
    mesh = Mesh(np.array(cpu_devices()[:2]), ("ep",))
    group = _lowering_only_cuda_group(mesh)

    def step(x, idx, w):
        x, idx, w = x[0], idx[0], w[0]
        a = jax_ep.low_latency_dispatch_send(x, idx, group=group)  # two independent sends
        b = jax_ep.low_latency_dispatch_send(x * 2, idx, group=group)
        counts = jax_ep.low_latency_dispatch_recv(a).counts
        counts = counts + jax_ep.low_latency_dispatch_recv(b).counts

        def loss(x, w):
            out = jax_ep.dispatch(x, idx, w, group=group, layout="ragged")
            y = jax_ep.combine(out.x, out.handle, group=group)
            return jnp.sum(y.astype(jnp.float32))

        dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
        return counts[None], dx[None], dw[None]

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    args = (
        jnp.ones((2, 4, 128), jnp.bfloat16),
        jnp.zeros((2, 4, 2), jnp.int32),
        jnp.ones((2, 4, 2), jnp.float32),
    )
    calls = _calls(f.lower(*args).as_text())
    assert calls, "no jax_ep custom calls in the lowered program"
    targets = [t for _, t, _, _ in calls]
    assert targets == [
        "jax_ep_low_latency_dispatch_send",
        "jax_ep_low_latency_dispatch_send",
        "jax_ep_low_latency_dispatch_recv",
        "jax_ep_low_latency_dispatch_recv",
        "jax_ep_high_throughput_dispatch",
        "jax_ep_high_throughput_combine",
        "jax_ep_high_throughput_cached_dispatch",  # combine's backward
        "jax_ep_high_throughput_combine",  # dispatch's backward: dx and the weights' cotangents
    ], targets
    # every op's last operand is its ordering token: the token the op before it returned
    # (directly, or through a max with its forward op's token in the backward pass)
    text = f.lower(*args).as_text()
    merged = {
        m[0]: {m[1], m[2]}
        for m in re.findall(r"(%[\w#]+) = stablehlo\.maximum (%[\w#]+), (%[\w#]+)", text)
    }
    token_index = {"send": 0, "recv": 6, "dispatch": 11, "combine": 2}
    token_of = [
        f"{r}#{1 if 'cached' in t else token_index[t.split('_')[-1]]}" for r, t, _, _ in calls
    ]
    for i in range(1, len(calls)):
        token_in = calls[i][2][-1]
        assert token_of[i - 1] in merged.get(token_in, {token_in}), (i, calls[i], token_of[i - 1])
    for _, _, _, attrs in calls:
        assert f'group = "{group.key}"' in attrs, attrs
    # a receive takes its own send's ticket first
    assert calls[2][2][0] == token_of[0] and calls[3][2][0] == token_of[1]
    # receives are never dead code
    assert all(("has_side_effect = true" in a) == ("recv" in t) for _, t, _, a in calls)


# ---------------------------------------------------------------------------
# CPU: group keys
# ---------------------------------------------------------------------------


def _group(name=None, hidden=128):
    mesh = Mesh(np.array(cpu_devices()[:2]), ("ep",))
    return jax_ep.Group(
        mesh,
        "ep",
        num_experts=8,
        num_topk=2,
        hidden=hidden,
        num_max_tokens_per_rank=4,
        backend="reference",
        name=name,
    )


def test_group_key_names_sizes_and_is_unique_among_live_groups():
    # sizes no other test uses: a group another test left alive (not yet garbage-collected)
    # would hold the plain key and shift the numbering
    a, b = _group(hidden=136), _group(hidden=136)
    try:
        assert "axis=ep" in a.key and "experts=8" in a.key and "hidden=136" in a.key
        assert "#" not in a.key
        assert b.key == a.key + "#2"  # unnamed twins: numbered in creation order
        named = _group(name="moe", hidden=136)
        with pytest.raises(ValueError, match="already has the key"):
            _group(name="moe", hidden=136)  # an explicit name is never renumbered
        named.close()
    finally:
        a.close()
        b.close()
    c = _group(hidden=136)  # a closed group's key is free again
    assert c.key == a.key
    c.close()


def test_closed_group_refuses_new_ops():
    group = _group()
    group.close()
    x = jnp.ones((4, 128), jnp.bfloat16)
    idx = jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="is closed"):
        jax.vmap(
            lambda x, i: jax_ep.dispatch(x, i, i.astype(jnp.float32), group=group).x,
            axis_name="ep",
        )(jnp.stack([x, x]), jnp.stack([idx, idx]))


# ---------------------------------------------------------------------------
# GPU: one process per case
# ---------------------------------------------------------------------------

WORKER = os.path.join(os.path.dirname(__file__), "workers", "lifetime.py")
CONCURRENT = (
    "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT "
    "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
)
GRAPHS = {
    "on": "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1",
    "off": "--xla_gpu_enable_command_buffer=",
}


def run_case(case, scratch, flags="", timeout=300):
    env = dict(os.environ, XLA_FLAGS=flags, XLA_PYTHON_CLIENT_MEM_FRACTION="0.2")
    proc = subprocess.run(
        [sys.executable, WORKER, case, str(scratch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"case {case} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc.stdout


@requires_kernels
@pytest.mark.timeout(300)
def test_concurrent_command_buffers_give_the_reference_results(tmp_path):
    run_case("concurrent", tmp_path / "x", CONCURRENT)


@requires_kernels
@pytest.mark.timeout(300)
@pytest.mark.parametrize("graphs", ["on", "off"])
def test_programs_of_a_closed_group_are_refused(tmp_path, graphs):
    out = run_case("closed", tmp_path / "x", GRAPHS[graphs])
    assert "has been closed" in out and "is closed" in out


@requires_kernels
@pytest.mark.timeout(300)
def test_exported_program_binds_by_key_in_another_process(tmp_path):
    path = tmp_path / "program.bin"
    run_case("export", path)
    run_case("load", path)
    assert "no live group with that key" in run_case("load-other", path)


@requires_kernels
@pytest.mark.timeout(900)
def test_create_use_close_cycles_release_device_memory(tmp_path):
    """1000 cycles by default (JAX_EP_TEST_CYCLES: fewer for a quick run); each compiles."""
    out = run_case("cycles", tmp_path / "leak", timeout=900)
    print(out)


@requires_kernels
@pytest.mark.timeout(300)
def test_killed_peer_makes_the_survivor_fail_with_rank_peer_and_phase(tmp_path):
    from jax_ep.launch import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

    scratch = tmp_path / "message"
    port = 20000 + os.getpid() % 20000
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="",
            XLA_PYTHON_CLIENT_MEM_FRACTION="0.1",
            **{
                ENV_COORDINATOR: f"127.0.0.1:{port}",
                ENV_NUM_PROCESSES: "2",
                ENV_PROCESS_ID: str(pid),
            },
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, "kill", str(scratch)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        out0, _ = procs[0].communicate(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out1, _ = procs[1].communicate()
    assert procs[1].returncode == -9, f"rank 1 should have been killed:\n{out1}\n{out0}"
    assert procs[0].returncode == 0, out0
    message = scratch.read_text()
    assert "rank 0 timed out" in message and "waiting for rank 1" in message, message
    assert "phase" in message, message
