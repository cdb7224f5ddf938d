"""How the CUDA backend calls its kernels: XLA FFI custom calls into the extension.

Every handler is registered with JAX once per process. Under ``jax.vmap`` (loopback
groups) the calls use ``vmap_method="expand_dims"``: the handler sees the
virtual-rank axis in front and runs all ranks in one launch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_ep import _compat
from jax_ep.backends.cuda import extension
from jax_ep.backends.spec import OpSpec


@functools.cache
def register_targets() -> None:
    """Registers every FFI handler of the extension with JAX (once per process): first
    the type of the group ops' per-executable state, then the handlers (a dict of
    instantiate/initialize/execute stages for group ops)."""
    ext = extension.require()
    jax.ffi.register_ffi_type("jax_ep_exec_state", ext.exec_state_type(), platform="CUDA")
    for name, handler in ext.registrations().items():
        jax.ffi.register_ffi_target(name, handler, platform="CUDA")


def target(name: str, spec: OpSpec | None) -> str:
    """FFI target name; ``Config.sync_errors`` selects the synchronising twin."""
    return f"jax_ep_{name}{'_sync' if spec is not None and spec.sync_errors else ''}"


def call(name: str, spec: OpSpec | None, results, *operands, has_side_effect=False, **attrs):
    """``ffi_call`` with operands made to vary alike (arrays built inside shard_map do not)."""
    operands = _compat.match_varying(*operands)
    results = [_compat.result_like(operands[0], shape, dtype) for shape, dtype in results]
    return jax.ffi.ffi_call(
        target(name, spec), results, vmap_method="expand_dims", has_side_effect=has_side_effect
    )(*operands, **attrs)


@functools.cache
def init_local_devices() -> None:
    """Loads kernels and error records on every local GPU (the group-less ops use them)."""
    register_targets()
    for d in jax.local_devices():
        if d.platform == "gpu":
            extension.require().init_device(d.local_hardware_id)


# Constant operands are derived from a per-rank operand (not built with jnp.ones):
# under jax.vmap (loopback) a constant would be unbatched, and every operand of a
# loopback call must carry the virtual-rank axis.


def batched_like(a: jax.Array, ref: jax.Array) -> jax.Array:
    """``a`` unchanged, but carrying ``ref``'s virtual-rank axis under ``jax.vmap``."""
    zero = jnp.sum(ref.reshape(-1)[:1].astype(jnp.int32)) * 0
    return a + zero.astype(a.dtype)
