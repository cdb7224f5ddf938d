"""Adapts :mod:`jax_ep.reference` to the backend interface the ops layer calls.

A backend implements: ``layout``, ``dispatch``, ``combine``, ``token_dispatch``,
``token_combine``, ``ll_dispatch_send``/``ll_dispatch_recv`` and
``ll_combine_send``/``ll_combine_recv``. Send halves return a *ticket*: an
opaque pytree that the matching receive half consumes.
"""

from __future__ import annotations

import jax

from jax_ep import reference
from jax_ep._spec import OpSpec
from jax_ep.types import Handle, LowLatencyHandle


def layout(topk_idx: jax.Array, num_experts: int, num_ranks: int):
    return reference.get_dispatch_layout(topk_idx, num_experts, num_ranks)


def dispatch(x, topk_idx, topk_weights, spec: OpSpec):
    return reference.dispatch(
        x,
        topk_idx,
        topk_weights,
        axis_name=spec.axis_name,
        num_experts=spec.num_experts,
        layout=spec.layout,
        capacity=spec.capacity,
        fp8=spec.fp8,
        round_scale=spec.round_scale,
    )


def combine(y, handle: Handle, weights, spec: OpSpec):
    return reference.combine(y, handle, weights, axis_name=spec.axis_name)


def token_dispatch(x, handle: Handle, spec: OpSpec):
    return reference.token_dispatch(x, handle, axis_name=spec.axis_name)


def token_combine(rows, handle: Handle, spec: OpSpec):
    return reference.token_combine(rows, handle, axis_name=spec.axis_name)


# The reference does all the communication in the send half; receive halves only
# unpack, so the split forms have exactly the fused forms' results.


def ll_dispatch_send(x, topk_idx, active_ranks, spec: OpSpec):
    return reference.low_latency_dispatch(
        x,
        topk_idx,
        axis_name=spec.axis_name,
        num_experts=spec.num_experts,
        max_tokens_per_rank=spec.max_tokens_per_rank,
        active_ranks=active_ranks,
        fp8=spec.fp8,
        round_scale=spec.round_scale,
    )


def ll_dispatch_recv(ticket, spec: OpSpec):
    return ticket


def ll_combine_send(y, handle: LowLatencyHandle, topk_idx, topk_weights, spec: OpSpec):
    return reference.low_latency_combine(
        y, topk_idx, topk_weights, handle, axis_name=spec.axis_name
    )


def ll_combine_recv(ticket, handle: LowLatencyHandle, topk_idx, topk_weights, spec: OpSpec):
    return ticket
