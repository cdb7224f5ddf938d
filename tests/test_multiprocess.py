"""Several processes of one jax.distributed job (started by jax_ep.launch).

CPU: the key-value exchange that carries CUDA IPC handles (and NVSHMEM ids), and
a clear TimeoutError when a process never publishes. GPU: one process per EP
rank, all on one GPU (CUDA IPC between the processes; run under CUDA MPS so
their kernels overlap), dispatch + combine checked against the oracle.
"""

from __future__ import annotations

import os
import sys

import pytest
from conftest import requires_kernels

from jax_ep.launch import launch

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


@requires_kernels
def test_two_processes_share_one_gpu():
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.1", "XLA_FLAGS": ""}
    assert run(2, "ht_dispatch.py", share_gpu=True, env=env, timeout=400) == 0
