"""Flax (nnx) layers on jax_ep: :class:`MoE`, its router and its token exchanges."""

from jax_ep.flax.exchange import (
    AllToAllExchange,
    Exchange,
    ExpertRows,
    JaxEpExchange,
    RaggedAllToAllExchange,
)
from jax_ep.flax.maxtext import load_maxtext_weights
from jax_ep.flax.moe import (
    ACTIVATIONS,
    IMPLS,
    ExpertLoad,
    GateLogit,
    MoE,
    MoEAux,
    RoutingBias,
    SharedExpert,
)
from jax_ep.flax.routing import (
    Routing,
    balance_loss,
    balance_statistics,
    route,
    routing_bias_update,
)

__all__ = [
    "ACTIVATIONS",
    "IMPLS",
    "AllToAllExchange",
    "Exchange",
    "ExpertLoad",
    "ExpertRows",
    "GateLogit",
    "JaxEpExchange",
    "MoE",
    "MoEAux",
    "RaggedAllToAllExchange",
    "Routing",
    "RoutingBias",
    "SharedExpert",
    "balance_loss",
    "balance_statistics",
    "load_maxtext_weights",
    "route",
    "routing_bias_update",
]
