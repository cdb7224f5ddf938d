"""Kernel breakdown of a jitted call from the JAX profiler (device timeline).

Timing a chain end to end says how long a decode step takes, not where the time
goes; this reads the GPU streams of a profiler trace: each kernel's median duration,
how often it runs per call, and the idle time between kernels (launch gaps).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from collections.abc import Callable

import jax
import numpy as np


def _short(name: str) -> str:
    """``void jax_ep::(anonymous namespace)::ll_dispatch_send(...)`` -> ``ll_dispatch_send``."""
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"<.*", "", name)
    return name.split("::")[-1].split(" ")[-1]


def kernel_breakdown(run: Callable[[], object], *, calls: int = 5) -> dict:
    """Profiles ``calls`` calls of ``run`` (after a warm-up call) and summarises its kernels.

    Returns ``kernels``: per kernel name, ``per_call`` launches and ``median_us``;
    ``busy_us_per_call`` (sum of kernel time) and ``span_us_per_call`` (first kernel
    start to last kernel end, divided by ``calls``): their difference is idle time
    between kernels. Empty when the trace has no GPU kernels (CPU).
    """
    jax.block_until_ready(run())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            out = None
            for _ in range(calls):
                out = run()
            jax.block_until_ready(out)
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return {}
        data = jax.profiler.ProfileData.from_file(paths[0])
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):
                events += [(e.start_ns, e.duration_ns, _short(e.name)) for e in line.events]
    if not events:
        return {}
    events.sort()
    per_name = collections.defaultdict(list)
    for _, dur, name in events:
        per_name[name].append(dur / 1e3)
    start = events[0][0]
    end = max(s + d for s, d, _ in events)
    return dict(
        calls=calls,
        kernels={
            n: dict(per_call=len(d) / calls, median_us=float(np.median(d)))
            for n, d in sorted(per_name.items(), key=lambda kv: -sum(kv[1]))
        },
        busy_us_per_call=sum(d for _, d, _ in events) / 1e3 / calls,
        span_us_per_call=(end - start) / 1e3 / calls,
    )
