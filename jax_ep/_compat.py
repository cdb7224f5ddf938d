"""Small shims over JAX APIs that moved between the versions we support (0.10, 0.11).

Kept in one place so the rest of the package reads as plain JAX.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax


def varying_axes(x: jax.Array) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax 0.10: ManualAxisType
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # jax 0.11


def _pvary(x: jax.Array, axes: tuple) -> jax.Array:
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)


def match_varying(*arrays: jax.Array | None) -> list[jax.Array | None]:
    """Make every array vary over the union of the arrays' varying mesh axes.

    ``jax.ffi.ffi_call`` refuses operands whose varying axes differ; a router
    output replicated over the EP axis next to a sharded token block is normal
    user code, so we widen instead of failing.
    """
    union: frozenset = frozenset()
    for a in arrays:
        if a is not None:
            union |= varying_axes(a)
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        missing = tuple(sorted(union - varying_axes(a), key=str))
        out.append(_pvary(a, missing) if missing else a)
    return out


def cotangent_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """``ct`` with the varying mesh axes of ``primal`` (a ``custom_vjp`` backward must return
    them): summed over axes only ``ct`` varies over (the gradient of a value replicated over
    an axis collects every rank's part), widened to axes only ``primal`` varies over."""
    extra = tuple(sorted(varying_axes(ct) - varying_axes(primal), key=str))
    if extra:
        ct = jax.lax.psum(ct, extra)
    missing = tuple(sorted(varying_axes(primal) - varying_axes(ct), key=str))
    return _pvary(ct, missing) if missing else ct


def result_like(x: jax.Array, shape: Sequence[int], dtype) -> jax.ShapeDtypeStruct:
    """An FFI result type with ``x``'s sharding/varying-axes metadata."""
    return jax.typeof(x).update(shape=tuple(shape), dtype=dtype)


def axis_size(axis_name) -> int:
    return jax.lax.axis_size(axis_name)


def min_dim(a, b):
    """``min`` of two dimensions, either of which may be symbolic (``jax.export``)."""
    from jax._src import core  # no public spelling of the symbolic min in jax 0.10/0.11

    return core.min_dim(a, b)
