"""The examples run on multi-axis meshes as the README shows (``--mesh data=2,ep=4``), on a
small model for a few steps: training lowers the loss from the uniform guess, decoding's
low-latency and high-throughput paths agree."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import requires_8_devices

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import decode_moe  # noqa: E402
import train_moe  # noqa: E402

pytestmark = requires_8_devices

SMALL = ["--hidden", "32", "--layers", "1", "--expert-hidden", "32", "--vocab", "16"]


@pytest.mark.parametrize(
    "mesh",
    [
        ["--mesh", "data=2,ep=4"],
        ["--mesh", "fsdp=2,ep=2,tensor=2"],
        ["--mesh", "pod=2,ep=4", "--ep-axes", "pod,ep"],
    ],
    ids=["data2xep4", "fsdp2xep2xtensor2", "pod2xep4-tuple"],
)
def test_train_example_on_a_mesh(mesh, capsys):
    out = train_moe.main(
        SMALL + mesh + ["--steps", "12", "--batch", "16", "--seq", "8", "--timing-steps", "0"]
    )
    assert out["loss_last"] < out["loss_first"]
    assert out["loss_first"] == pytest.approx(math.log(16), rel=0.3)
    assert "mesh " in capsys.readouterr().out


def test_decode_example_on_a_mesh(capsys):
    out = decode_moe.main(
        SMALL
        + ["--mesh", "data=2,ep=4", "--train-steps", "0", "--batch", "16", "--prompt", "4"]
        + ["--new-tokens", "4"]
    )
    assert out["p50_ms"] > 0
    text = capsys.readouterr().out
    diff = float(text.split("max |diff| ")[1].split()[0])
    assert diff < 1e-4  # the low-latency and high-throughput paths give the same logits


def test_mesh_option_errors():
    with pytest.raises(SystemExit, match="name=size"):
        train_moe.parse_mesh("data:2,ep=4")
    with pytest.raises(SystemExit, match="twice"):
        train_moe.parse_mesh("ep=2,ep=4")
    with pytest.raises(ValueError, match=r"'gpu' is not an axis of the mesh"):
        train_moe.main(SMALL + ["--mesh", "data=2,ep=4", "--ep-axes", "gpu", "--steps", "1"])


def test_demo_runs_quickly_on_cpu():
    """The first thing a newcomer runs: CPU defaults finish in seconds and say what ran."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "jax_ep backend: reference" in done.stdout
    assert "its kernels replace the reference" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("Next: python -m jax_ep")
