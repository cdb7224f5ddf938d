"""The low-latency ops inside XLA command buffers (CUDA graphs).

A decode-like jitted step (tests/workers/ll_command_buffer.py) runs in two fresh
processes, since XLA reads its flags once: command buffers forced on for fusions and
custom calls, and off. Evidence of capture comes from the handlers themselves: each
counts its calls made while XLA was capturing the stream into a graph, and the device
counts the ops its kernels executed. With command buffers on, the handlers are called
while XLA records the graph (and once more in its direct warm-up run), and the kernels
run more often than the handlers are called (graph replays);
with them off, every op is a direct call. Both runs must give the same bits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import requires_kernels

WORKER = os.path.join(os.path.dirname(__file__), "workers", "ll_command_buffer.py")
# handler calls per dispatch + combine pair: the one-call forms, one custom call each
CALLS_PER_PAIR = 2
FLAGS = {
    "on": "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL",
    "off": "--xla_gpu_enable_command_buffer=",
}


def run_worker(setting, tmp_path):
    path = tmp_path / f"{setting}.npz"
    env = dict(os.environ, XLA_FLAGS=FLAGS[setting], XLA_PYTHON_CLIENT_MEM_FRACTION="0.2")
    proc = subprocess.run(
        [sys.executable, WORKER, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"worker ({setting}) failed:\n{proc.stdout}\n{proc.stderr}"
    data = np.load(path)
    return data["x"], json.loads(str(data["stats"])), int(data["pairs"]), int(data["steps"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmdbuf")
    return {s: run_worker(s, tmp) for s in FLAGS}


@requires_kernels
def test_same_results_with_and_without_command_buffers(runs):
    np.testing.assert_array_equal(runs["on"][0], runs["off"][0])


@requires_kernels
@pytest.mark.parametrize("setting", ["on", "off"])
def test_every_op_executed(runs, setting):
    _, stats, pairs, steps = runs[setting]
    for rank_ops in stats["ops_per_local_rank"]:
        assert rank_ops["low_latency_dispatch"] == pairs * steps, stats
        assert rank_ops["low_latency_combine"] == pairs * steps, stats


@requires_kernels
def test_ops_are_captured_and_replayed_with_command_buffers(runs):
    _, stats, pairs, steps = runs["on"]
    calls_per_step = CALLS_PER_PAIR * pairs
    # XLA runs a command buffer's commands once directly (a warm-up) before recording
    assert stats["handler_calls_direct"] <= calls_per_step, stats
    assert stats["handler_calls_captured"] >= calls_per_step, stats
    # replays ran the kernels without calling the handlers again
    assert stats["handler_calls_captured"] < calls_per_step * steps, stats


@requires_kernels
def test_ops_run_directly_without_command_buffers(runs):
    _, stats, pairs, steps = runs["off"]
    assert stats["handler_calls_captured"] == 0, stats
    assert stats["handler_calls_direct"] == CALLS_PER_PAIR * pairs * steps, stats
