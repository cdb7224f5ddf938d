"""Environment variables jax_ep reads at run time (debugging aids only; listed in README).

JAX_EP_TIMEOUT_S: default ``Config.timeout_s`` (seconds a kernel waits for a peer).
JAX_EP_COMMIT: commit recorded in benchmark JSON when the tree has no .git (read by
``jax_ep.bench.timing``).
"""

from __future__ import annotations

import os


def default_timeout_s() -> float:
    return float(os.environ.get("JAX_EP_TIMEOUT_S", "100"))
