"""``python -m jax_ep`` says what this install runs on and why (the first command after install)."""

from __future__ import annotations

import os
import subprocess
import sys

from jax_ep.__main__ import report


def test_report_names_the_backend_and_why():
    r = report()
    assert r["backend"] in ("cuda", "reference")
    assert r["why"]  # never a backend without its reason
    assert r["jax"] and r["jaxlib"] and r["devices"]


def test_python_m_jax_ep_runs():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-m", "jax_ep"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("jax_ep ")
    assert "backend here:      reference" in out  # a CPU: the reference backend, with why
    assert "CUDA extension:" in out and "NVSHMEM module:" in out
    assert out.strip().splitlines()[-1] == "Next: python examples/demo.py"
