"""Loads the compiled CUDA extension modules if the build produced them.

The package works without them (reference backend). ``missing_reason()`` tells
users why the kernels are not there instead of a bare ImportError.

* ``_jax_ep_cuda``: the FFI handlers, kernels and buffer management (built whenever
  nvcc is present at install time);
* ``_jax_ep_nvshmem``: the kernels that reach other nodes with NVSHMEM (built when
  NVSHMEM's device library is found at install time).
"""

from __future__ import annotations

import functools
from types import ModuleType

from jax_ep.transports import nvshmem_bootstrap


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        from jax_ep.backends.cuda import _jax_ep_cuda  # type: ignore[attr-defined]
    except ImportError as e:
        return None, (
            "the jax_ep CUDA extension is not built or failed to load "
            f"({e}); reinstall with a CUDA compiler on PATH (nvcc) to get the kernels"
        )
    return _jax_ep_cuda, ""


def extension() -> ModuleType | None:
    return _load()[0]


def missing_reason() -> str:
    return _load()[1]


def require() -> ModuleType:
    ext, why = _load()
    if ext is None:
        raise RuntimeError(f"jax_ep: {why}")
    return ext


@functools.cache
def layout_id(layout: str) -> int:
    """The id the FFI handlers take for a dispatch layout (defined once, in C++)."""
    return require().layout_kinds()[layout]


@functools.cache
def _load_nvshmem() -> tuple[ModuleType | None, str]:
    # nvshmem4py loads the wheel's libnvshmem_host.so.3 first: the module's own
    # reference to it then resolves to that same library (one NVSHMEM per process)
    reason = nvshmem_bootstrap.missing_reason()
    if reason:
        return None, reason
    try:
        from jax_ep.backends.cuda import _jax_ep_nvshmem  # type: ignore[attr-defined]
    except ImportError as e:
        return None, (
            "the jax_ep NVSHMEM module is not built or failed to load "
            f"({e}); reinstall with nvidia-nvshmem-cu13 present at build time (a build "
            "requirement on Linux x86-64) or NVSHMEM_HOME set"
        )
    return _jax_ep_nvshmem, ""


def nvshmem_missing_reason() -> str:
    """Why groups spanning nodes cannot run here ('' when they can)."""
    return _load_nvshmem()[1]


def require_nvshmem() -> ModuleType:
    """The NVSHMEM kernels' module (groups spanning nodes), or a clear error."""
    mod, why = _load_nvshmem()
    if mod is None:
        raise RuntimeError(f"jax_ep: a group spanning nodes needs the NVSHMEM kernels: {why}")
    return mod


@functools.cache
def nvshmem_launchers() -> int:
    """Address of the NVSHMEM kernels' launcher table, set up once NVSHMEM runs in this
    process (groups spanning nodes hand it to the main module)."""
    mod = require_nvshmem()
    mod.init()
    return mod.net_ops()
