"""Byte exchange between the processes of a ``jax.distributed`` job.

Groups spanning processes trade CUDA IPC handles (and, for NVSHMEM, the unique
id) through JAX's coordination-service key-value store, which every
``jax.distributed.initialize`` job already runs. Every wait is bounded and
fails with a message naming the process and key that never arrived.
"""

from __future__ import annotations

import jax

# Keys of this library live under one prefix (XLA itself uses e.g. "nvshmem_global_init").
KEY_PREFIX = "jax_ep"


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(
            "jax_ep: this group spans several processes but jax.distributed is not initialised; "
            "call jax.distributed.initialize() before creating the jax_ep.Group"
        )
    return client


def publish(key: str, value: bytes) -> None:
    """Make ``value`` visible to every process under ``jax_ep/<key>``."""
    _client().key_value_set_bytes(f"{KEY_PREFIX}/{key}", value)


def fetch(key: str, timeout_s: float, *, what: str = "") -> bytes:
    """Wait (at most ``timeout_s``) for another process to :func:`publish` ``key``."""
    try:
        return _client().blocking_key_value_get_bytes(f"{KEY_PREFIX}/{key}", int(timeout_s * 1000))
    except Exception as e:  # the client raises a generic XlaRuntimeError on deadline
        raise TimeoutError(
            f"jax_ep: process {jax.process_index()} waited {timeout_s:.1f} s for "
            f"'{KEY_PREFIX}/{key}'"
            f"{' (' + what + ')' if what else ''} and it never arrived: is every process creating "
            f"the same jax_ep.Group in the same order? ({e})"
        ) from e


def barrier(name: str, timeout_s: float) -> None:
    """All processes reach ``name`` or a clear TimeoutError is raised."""
    try:
        _client().wait_at_barrier(f"{KEY_PREFIX}/{name}", int(timeout_s * 1000))
    except Exception as e:
        raise TimeoutError(
            f"jax_ep: process {jax.process_index()}: barrier '{name}' not reached by "
            f"every process within {timeout_s:.1f} s ({e})"
        ) from e
