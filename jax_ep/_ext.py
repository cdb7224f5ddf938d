"""Loads the compiled CUDA extension if the build produced one.

The package works without it (reference backend). ``missing_reason()`` tells
users why the kernels are not there instead of a bare ImportError.
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        from jax_ep import _jax_ep_cuda  # type: ignore[attr-defined]
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
