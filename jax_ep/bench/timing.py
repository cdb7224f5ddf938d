"""Timing and environment facts for the benchmark JSON."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable

import jax
import numpy as np


def measure(run: Callable[[], object], *, calls: int, repeats: int, warmup: int = 3) -> dict:
    """Per-call device time of ``run`` (one jitted, asynchronously dispatched call).

    Each repeat enqueues ``calls`` calls back to back and waits for the last one, so
    host dispatch overlaps device work and the time per call is the device's time
    per call (launch gaps included) whenever the op takes longer than its dispatch.
    Returns median/p10/p90 over repeats, in microseconds.
    """
    for _ in range(warmup):
        jax.block_until_ready(run())
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = run()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    s = np.asarray(samples)
    return dict(
        median_us=float(np.median(s)),
        p10_us=float(np.percentile(s, 10)),
        p90_us=float(np.percentile(s, 90)),
        calls=calls,
        repeats=repeats,
    )


def copy_roofline(device, nbytes: int, *, calls: int = 20, repeats: int = 5) -> dict:
    """The copy roofline: what a kernel that reads and writes every byte once can reach.

    A plain elementwise pass (``v + 1``) over a ``nbytes`` array on ``device`` (large enough
    that caches do not hold it: ~1 GiB on a GPU), timed like every case (median of
    ``repeats`` runs of ``calls`` back-to-back calls); ``GBps`` counts read + write bytes
    (``2 * nbytes`` per call), as the cases' ``hbm_GBps`` do.
    """
    a = jax.device_put(np.zeros(nbytes // 2, np.uint16), device)
    f = jax.jit(lambda v: v + np.uint16(1))
    t = measure(lambda: f(a), calls=calls, repeats=repeats)
    return dict(
        GBps=2 * nbytes / (t["median_us"] * 1e-6) / 1e9,
        bytes=nbytes,
        bytes_moved_per_call=2 * nbytes,
        median_us=t["median_us"],
        calls=calls,
        repeats=repeats,
        how="jit(v + 1) over a uint16 array; read + write bytes; median of repeats",
    )


def _git_commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it (the code that ran
    is then not that commit); ``JAX_EP_COMMIT`` when the tree was copied without .git."""
    if os.environ.get("JAX_EP_COMMIT"):
        return os.environ["JAX_EP_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.check_output(["git", *args], text=True, stderr=subprocess.DEVNULL).strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    import jaxlib

    import jax_ep

    devs = jax.devices()
    return dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        device=devs[0].device_kind,
        num_devices=len(devs),
        platform=devs[0].platform,
        host=platform.node(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        jax_ep=jax_ep.__version__,
        commit=_git_commit(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
