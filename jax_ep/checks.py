"""Run-time checks: values only the running step sees (rows dropped, expert ids out of range).

Trace-time checks (:mod:`jax_ep.validation`) cannot see values. These run on the host
through ``io_callback`` and fail the step that hit them, inside and outside ``jit``:
the error is a ``jax.errors.JaxRuntimeError`` whose text ends with the one-sentence
message (XLA puts its own ``INTERNAL: CpuCallback error`` line and the callback's
traceback before it; :func:`message` recovers the sentence). The sentence is also
logged (logger ``jax_ep``, ERROR) as the callback fails, so it is the first line on
stderr, before JAX's own report of the failed callback.

Every rank of the EP axis decides together (the probe is reduced over the axis first):
in SPMD all ranks run the same schedule, so they all stop at the same callback, and no
rank is left waiting in a later collective for a rank that stopped (that would hang).

Each guard is its own ``custom_vjp`` that differentiates as the identity, so the
check runs in the forward pass of ``jax.grad`` too (``io_callback`` itself has no JVP).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jax_ep import mesh_axes

log = logging.getLogger("jax_ep")


def _fail(text: str):
    log.error(text)
    raise ValueError(text)


def message(error: BaseException) -> str:
    """The one-sentence jax_ep message of an error raised by a guard (its last line)."""
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    return last.split(": ", 1)[1] if last.startswith("ValueError: ") else last


def _raise_if_dropped(num_dropped, what: str):
    n = int(np.asarray(num_dropped))
    if n > 0:
        _fail(
            f"jax_ep.{what}: {n} rows did not fit and were dropped (summed over the EP "
            f"ranks; on_overflow='error'); "
            f"raise capacity/capacity_factor, or pass capacity_factor=None for the worst "
            f"case (never drops)"
        )
    return np.int32(0)


def _raise_if_bad_expert(bad, what: str, num_experts: int):
    """``bad``: ``[5]`` int32 (found, token, k, expert id, rank or -1) of the first bad entry."""
    found, t, k, e, rank = (int(v) for v in np.asarray(bad))
    if found:
        # the CUDA backend's device-side report says the same (csrc/runtime/runtime.cc)
        where = f" on rank {rank}" if rank >= 0 else ""
        _fail(
            f"jax_ep.{what}: topk_idx[{t}, {k}] = {e}{where} is out of range "
            f"[-1, {num_experts}) (expert ids are 0..{num_experts - 1}, -1 = masked)"
        )
    return np.int32(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _guarded(check, value, probe):
    return _apply(check, value, probe)


def _apply(check, value, probe):
    # an integer value: adding the zero is exact, and ties the value to the check
    return value + io_callback(check, jax.ShapeDtypeStruct((), jnp.int32), probe)


def _guarded_fwd(check, value, probe):
    return _apply(check, value, probe), None


def _guarded_bwd(check, res, ct):
    return ct, None


_guarded.defvjp(_guarded_fwd, _guarded_bwd)


def _bound(axis_name) -> bool:
    return axis_name is not None and all(
        n in mesh_axes.bound(n) for n in mesh_axes.names(axis_name)
    )


def overflow_guard(counts: jax.Array, num_dropped: jax.Array, what: str, axis_name) -> jax.Array:
    """``counts`` unchanged, computed only after checking that no rank of ``axis_name``
    dropped a row."""
    total = jax.lax.psum(num_dropped, axis_name) if _bound(axis_name) else num_dropped
    return _guarded(functools.partial(_raise_if_dropped, what=what), counts, total)


def first_bad_expert(topk_idx: jax.Array, num_experts: int, rank=-1) -> jax.Array:
    """``[5]`` int32: (1 if any, token, k, id, rank) of the first id outside
    ``[-1, num_experts)``."""
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    flat = jnp.argmax(bad.reshape(-1))
    t, k = flat // topk_idx.shape[1], flat % topk_idx.shape[1]
    found = jnp.any(bad).astype(jnp.int32)
    rank = jnp.asarray(rank, jnp.int32)
    return jnp.stack(
        [found, t.astype(jnp.int32), k.astype(jnp.int32), topk_idx.reshape(-1)[flat], rank]
    )


def wanted(host_checks: bool, topk_idx: jax.Array) -> bool:
    """Whether to check ``topk_idx`` on the host: asked for, and not under ``jax.export``
    with a symbolic token count (JAX cannot serialise host callbacks)."""
    return host_checks and not jax.export.is_symbolic_dim(topk_idx.shape[0])


def expert_id_guard(
    value: jax.Array, topk_idx: jax.Array, num_experts: int, what: str, axis_name=None
) -> jax.Array:
    """``value`` (int32 counts) unchanged, computed only after checking every id of
    ``topk_idx`` on every rank of ``axis_name`` (when bound here) is in ``[-1, num_experts)``.
    The message names the first bad id of the lowest rank that has one."""
    check = functools.partial(_raise_if_bad_expert, what=what, num_experts=num_experts)
    if not _bound(axis_name):
        return _guarded(check, value, first_bad_expert(topk_idx, num_experts))
    rank = jax.lax.axis_index(axis_name)
    probe = first_bad_expert(topk_idx, num_experts, rank)
    # the lowest rank with a bad id: every rank gets its probe (max of found * (R - rank))
    num_ranks = jax.lax.axis_size(axis_name)
    score = probe[0] * (num_ranks - rank)
    best = jax.lax.pmax(score, axis_name)
    mine = (score == best) & (best > 0)
    return _guarded(check, value, jax.lax.psum(jnp.where(mine, probe, 0), axis_name))
