"""The README's API example runs as written (pasted into a fresh Python on 8 CPU devices)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def api_block() -> str:
    """The first ```python block after the "## API" heading, unchanged."""
    text = README.read_text()
    section = text[text.index("\n## API\n") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's API section has no python block"
    return match.group(1)


def test_api_example_runs_as_written(tmp_path):
    script = tmp_path / "api_example.py"
    script.write_text(api_block())
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the last line: the layer's output shape and the gradients' shapes (x, weights, experts)
    assert done.stdout.strip().splitlines()[-1] == (
        "(256, 128) [(256, 128), (256, 2), (16, 128, 64), (16, 128, 64), (16, 64, 128)]"
    )


def test_api_example_keeps_deepseek_sizes_visible():
    assert "DeepSeek-V3 sizes: E, K, H, F, T = 256, 8, 7168, 2048, 4096" in api_block()
