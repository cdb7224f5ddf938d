"""Several processes of one jax.distributed job (started by jax_ep.launch).

CPU: the key-value exchange that carries CUDA IPC handles and the NVSHMEM unique
id, and a clear TimeoutError when a process never publishes. GPU, NVSHMEM: two PEs
on one GPU run the same ops over the symmetric heap (needs nvshmem4py). GPU: one process per EP
rank, all on one GPU (CUDA IPC between the processes; run under CUDA MPS so
their kernels overlap), dispatch + combine checked against the oracle.
"""

from __future__ import annotations

import os
import sys

import pytest
from conftest import requires_kernels

from jax_ep.backends.cuda import extension
from jax_ep.launch import launch
from jax_ep.transports import nvshmem_bootstrap

WORKERS = os.path.join(os.path.dirname(__file__), "workers")


def run(n, script, *args, share_gpu=False, env=None, timeout=240):
    return launch(
        n,
        [sys.executable, os.path.join(WORKERS, script), *args],
        share_gpu=share_gpu,
        timeout_s=timeout,
        extra_env=env,
    )


CPU_ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


@pytest.mark.parametrize("n", [2, 3])
def test_key_value_exchange(n):
    assert run(n, "kv_exchange.py", "exchange", env=CPU_ENV) == 0


def test_peer_that_never_arrives_times_out():
    assert run(2, "kv_exchange.py", "missing", env=CPU_ENV) == 0


@pytest.mark.parametrize("n", [2, 3])
def test_nvshmem_unique_id_reaches_every_process(n):
    assert run(n, "kv_exchange.py", "uid", env=CPU_ENV) == 0


def test_nvshmem_unique_id_that_never_comes_times_out():
    assert run(2, "kv_exchange.py", "uid-missing", env=CPU_ENV) == 0


GPU_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.1", "XLA_FLAGS": ""}


def run_on_one_gpu(n, *args):
    """``n`` processes of the dispatch/combine worker, all on the first GPU (CUDA MPS)."""
    return run(n, "ht_dispatch.py", *args, share_gpu=True, env=GPU_ENV, timeout=400)


@requires_kernels
def test_two_processes_share_one_gpu():
    assert run_on_one_gpu(2, "ipc") == 0


requires_nvshmem = pytest.mark.skipif(
    bool(nvshmem_bootstrap.missing_reason()), reason=nvshmem_bootstrap.missing_reason() or "present"
)


@requires_kernels
@requires_nvshmem
def test_two_nvshmem_pes_share_one_gpu():
    """Two NVSHMEM PEs on one GPU map each other's symmetric buffers (nvshmem_ptr)."""
    assert run_on_one_gpu(2, "nvshmem") == 0


requires_nvshmem_kernels = pytest.mark.skipif(
    bool(extension.nvshmem_missing_reason()), reason=extension.nvshmem_missing_reason() or "present"
)


@requires_kernels
@requires_nvshmem_kernels
@pytest.mark.parametrize("procs,node_size", [(2, 1), (4, 2), (4, 1)])
def test_internode_on_virtual_nodes(procs, node_size):
    """One GPU split into virtual nodes: tokens between nodes go through NVSHMEM puts to
    the relay rank, then NVLink forwarding (HT); LL sends put to other nodes' ranks."""
    assert run_on_one_gpu(procs, "nvshmem", str(node_size)) == 0


@requires_kernels
@requires_nvshmem_kernels
def test_internode_peer_that_never_sends_times_out():
    assert run_on_one_gpu(2, "nvshmem", "1", "fault") == 0


def test_launcher_runs_a_module():
    """``python -m jax_ep.launch -n 2 -m MODULE`` (the bench's multi-process form)."""
    from jax_ep.launch import main

    assert main(["-n", "2", "-m", "platform"]) == 0


def test_ranks_of_other_processes_on_this_gpu_keep_the_low_latency_ops_in_two_launches(
    monkeypatch,
):
    """A one-launch low-latency op waits inside its kernel for every rank's send phase:
    with another process's rank on the same GPU (MPS) the two kernels could each hold
    part of the SMs and wait for each other, so the group gets two launches there."""
    from jax_ep.transports import cuda_ipc, kv_store

    store = {}
    monkeypatch.setattr(kv_store, "publish", lambda key, value: store.__setitem__(key, value))
    monkeypatch.setattr(kv_store, "fetch", lambda key, timeout_s, what="": store[key])

    class Ext:
        def __init__(self, uuids):
            self.uuids = uuids

        def device_uuid(self, ordinal):
            return self.uuids[ordinal]

    # every rank in this process (one per GPU): nothing to exchange
    assert cuda_ipc.gpus_unshared(Ext(["a", "b"]), "k0", [0, 1])
    assert not store
    # rank 1 in another process, which published its GPU's UUID
    store["k1/gpu1"] = b"b"
    assert cuda_ipc.gpus_unshared(Ext(["a"]), "k1", [0, None])
    assert store["k1/gpu0"] == b"a"
    store["k2/gpu1"] = b"a"  # the same GPU as rank 0: shared
    assert not cuda_ipc.gpus_unshared(Ext(["a"]), "k2", [0, None])
