"""The EP axis: one mesh axis or a tuple of them, checked against meshes and bound axes.

An EP group may span several mesh axes, as ``jax.lax`` collectives accept
(``axis_name=("node", "gpu")``). Its rank is then the linearised index of the tuple in
``jax.lax.axis_index`` order: the first axis outermost, ``rank = node * size(gpu) + gpu``.
Everything in jax_ep that orders ranks (the reference backend's ``all_to_all``, the CUDA
runtime's device order, the NVSHMEM node split) follows that order.
"""

from __future__ import annotations

import math

import jax

AxisName = str | tuple[str, ...]


def normalize(axis_name, what: str = "axis_name") -> AxisName:
    """A mesh axis name, or a tuple of distinct names (a 1-tuple becomes its name)."""
    if isinstance(axis_name, str):
        return axis_name
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else ()
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be a mesh axis name or a tuple of names, got {axis_name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} {axis_name!r} names an axis twice")
    return names[0] if len(names) == 1 else names


def names(axis_name: AxisName) -> tuple[str, ...]:
    """The axis names of ``axis_name`` as a tuple."""
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def describe(mesh) -> str:
    """``mesh`` as its axes and sizes, for error messages: ``Mesh('data': 2, 'ep': 4)``."""
    return "Mesh(" + ", ".join(f"{n!r}: {s}" for n, s in mesh.shape.items()) + ")"


def check_in_mesh(mesh, axis_name: AxisName, what: str = "axis_name") -> None:
    """Every name of ``axis_name`` is an axis of ``mesh``, else a ValueError naming both."""
    missing = [n for n in names(axis_name) if n not in mesh.axis_names]
    if missing:
        which = repr(missing[0]) if len(missing) == 1 else repr(tuple(missing))
        raise ValueError(
            f"{what} {axis_name!r}: {which} is not an axis of the mesh {describe(mesh)}"
        )


def size(mesh, axis_name: AxisName) -> int:
    """Ranks of ``axis_name`` on ``mesh``: the product of its axes' sizes."""
    return math.prod(mesh.shape[n] for n in names(axis_name))


def bound(axis_name: AxisName) -> tuple[str, ...]:
    """The names of ``axis_name`` bound here (by ``shard_map`` or ``vmap``)."""
    out = []
    for n in names(axis_name):
        try:
            jax.lax.axis_size(n)
        except NameError:
            continue
        out.append(n)
    return tuple(out)
