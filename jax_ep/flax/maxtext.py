"""MaxText checkpoints into :class:`jax_ep.flax.MoE`: weights by name, placed on the mesh.

MaxText's ``RoutedMoE`` (``src/maxtext/layers/moe.py``) and ``jax_ep.flax.MoE`` share parameter
names and layouts: ``gate/kernel`` ``[D, E]``, ``gate/bias`` ``[E]``, ``wi_0``/``wi_1``
``[E, D, F]``, ``wo`` ``[E, F, D]``, ``wi_0_bias``/``wi_1_bias`` ``[E, F]``, ``wo_bias``
``[E, D]``. A ``RoutedAndSharedMoE`` nests the routed block as ``MoeBlock_0`` and its shared
expert as an ``MlpBlock`` (``shared_experts/wi_0/kernel`` ...), which map to
``shared_experts/wi_0`` ... here. Which ``MoE`` options reproduce each model family's routing
and activation is tabulated in the README ("Flax" section).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ep.flax.moe import ExpertLoad, MoE

# MaxText path (after dropping a leading "MoeBlock_0/") -> attribute path in MoE
_SHARED = {
    "shared_experts/wi_0/kernel": "shared_experts/wi_0",
    "shared_experts/wi_1/kernel": "shared_experts/wi_1",
    "shared_experts/wo/kernel": "shared_experts/wo",
}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (a Linen ``params`` dict, ``nnx.State``) → ``{"a/b": leaf}``."""
    if isinstance(tree, nnx.State):
        tree = tree.to_pure_dict()
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}/"))
        return out
    return {prefix[:-1]: tree}


def _array(leaf: Any) -> Any:
    """The array inside a leaf: an ``nnx.Variable``, a Linen ``Partitioned`` box, or an array."""
    if isinstance(leaf, nnx.Variable):
        return leaf[...]
    unbox = getattr(leaf, "unbox", None)
    return unbox() if callable(unbox) else leaf


def _targets(moe: MoE) -> dict[str, nnx.Variable]:
    """The MoE's weights a MaxText checkpoint can fill, by MaxText-style path (the load
    statistics and sown values are no weights)."""
    found = {}
    for path, var in nnx.iter_graph(moe):
        if isinstance(var, nnx.Variable) and not isinstance(var, (ExpertLoad, nnx.Intermediate)):
            found["/".join(map(str, path))] = var
    return found


def _sharding(moe: MoE, var: nnx.Variable):
    """Where ``var`` lives: its annotation on the group's mesh (None for a loopback group)."""
    mesh = moe.group.mesh if moe.group.loopback is None else None
    if mesh is None:
        return None
    spec = var.get_metadata().get("out_sharding") or ()
    return NamedSharding(mesh, P(*spec))


def load_maxtext_weights(moe: MoE, params: Any, *, strict: bool = True) -> list[str]:
    """Copy MaxText ``RoutedMoE`` / ``RoutedAndSharedMoE`` weights into ``moe`` by name.

    Each array is cast to the parameter's dtype and put on the group's mesh with the
    parameter's sharding (experts over the EP axis), whatever Flax's
    ``flax_always_shard_variable`` is set to, so the module runs right after.

    Args:
      moe: the layer, created with the options that match the checkpoint's model family
        (``routing_bias`` or ``gate_bias`` for a ``gate/bias``, ``mlp_bias`` for expert
        biases, ``shared_intermediate`` for shared experts).
      params: nested mappings or an ``nnx.State`` of arrays (or ``nnx.Variable``s / Linen
        boxes) under MaxText's names, optionally under ``MoeBlock_0``.
      strict: fail on a checkpoint weight the layer has no place for, or a layer weight the
        checkpoint lacks (else those are skipped and left as they are).
    Returns:
      The layer paths that were loaded.
    """
    flat = {}
    for path, leaf in _flatten(params).items():
        path = path.removeprefix("MoeBlock_0/")
        flat[_SHARED.get(path, path)] = _array(leaf)
    targets = _targets(moe)
    unknown = sorted(set(flat) - set(targets))
    missing = sorted(set(targets) - set(flat))
    if strict and (unknown or missing):
        raise ValueError(
            "load_maxtext_weights: "
            + "; ".join(
                part
                for part in (
                    f"the layer has no {unknown} (create it with the options of the "
                    "checkpoint's model family: routing_bias/gate_bias, mlp_bias, "
                    "shared_intermediate)"
                    if unknown
                    else "",
                    f"the checkpoint lacks {missing}" if missing else "",
                )
                if part
            )
        )
    loaded = []
    for path, var in targets.items():
        if path not in flat:
            continue
        value = flat[path]
        have = var[...]
        if tuple(np.shape(value)) != tuple(have.shape):
            raise ValueError(
                f"load_maxtext_weights: {path} has shape {tuple(np.shape(value))} in the "
                f"checkpoint but {tuple(have.shape)} in the layer"
            )
        value = jnp.asarray(value, have.dtype)
        sharding = _sharding(moe, var)
        var[...] = value if sharding is None else jax.device_put(value, sharding)
        loaded.append(path)
    return loaded
