"""Flax (nnx) layers on jax_ep: :class:`MoE`, its router and its token exchanges."""

from jax_ep.flax.exchange import (
    AllToAllExchange,
    Exchange,
    ExpertRows,
    JaxEpExchange,
    RaggedAllToAllExchange,
)
from jax_ep.flax.moe import (
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
    "route",
    "routing_bias_update",
]
