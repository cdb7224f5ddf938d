"""The reference backend: :mod:`jax_ep.reference` behind the :class:`~jax_ep.backends.Backend`
interface. It keeps no device state (XLA orders its collectives itself), so the
ordering token passes through unchanged (it is ``None``).

Expert ids outside ``[-1, num_experts)`` are an error here as on the CUDA backend
(which finds them on the device): :func:`jax_ep.checks.expert_id_guard` fails the step
that routed them, naming the first one."""

from __future__ import annotations

import jax

from jax_ep import checks, reference
from jax_ep.backends.spec import OpSpec
from jax_ep.handles import Handle, LowLatencyHandle


class ReferenceBackend:
    name = "reference"

    def create_runtime(self, group):
        return None

    def layout(self, topk_idx: jax.Array, num_experts: int, num_ranks: int):
        # bad ids: jax_ep.get_dispatch_layout guards them (it knows the group's axis)
        return reference.get_dispatch_layout(topk_idx, num_experts, num_ranks)

    def dispatch(self, x, topk_idx, topk_weights, token, spec: OpSpec):
        out = reference.dispatch(
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
        return _checked(out, 4, topk_idx, spec, "dispatch"), token

    def combine(self, y, handle: Handle, weights, token, spec: OpSpec, extra=None):
        out = reference.combine(y, handle, weights, axis_name=spec.axis_name, extra=extra)
        return (out if extra is not None else (out, None)), token

    def token_dispatch(self, x, handle: Handle, token, spec: OpSpec):
        return reference.token_dispatch(x, handle, axis_name=spec.axis_name), token

    def token_combine(self, rows, handle: Handle, token, spec: OpSpec, extra=None):
        out = reference.token_combine(rows, handle, axis_name=spec.axis_name, extra=extra)
        return (out if extra is not None else (out, None)), token

    # The reference does all the communication in the send half; receive halves only
    # unpack, so the split forms have exactly the fused forms' results.

    def ll_dispatch_send(self, x, topk_idx, active_ranks, token, spec: OpSpec):
        out = reference.low_latency_dispatch(
            x,
            topk_idx,
            axis_name=spec.axis_name,
            num_experts=spec.num_experts,
            max_tokens_per_rank=spec.max_tokens_per_rank,
            active_ranks=active_ranks,
            fp8=spec.fp8,
            round_scale=spec.round_scale,
        )
        return _checked(out, 2, topk_idx, spec, "low_latency_dispatch"), token

    def ll_dispatch_recv(self, ticket, token, spec: OpSpec):
        return ticket, token

    def ll_combine_send(self, y, handle: LowLatencyHandle, topk_idx, topk_weights, token, spec):
        out = reference.low_latency_combine(
            y, topk_idx, topk_weights, handle, axis_name=spec.axis_name
        )
        return out, token

    def ll_combine_recv(self, ticket, handle: LowLatencyHandle, idx, weights, token, spec):
        return ticket, token

    ll_dispatch = ll_dispatch_send  # the send half already does it all
    ll_combine = ll_combine_send


BACKEND = ReferenceBackend()


def _checked(out: tuple, at: int, topk_idx, spec: OpSpec, what: str) -> tuple:
    """``out`` with its counts (``out[at]``) computed only after the expert-id check of
    :mod:`jax_ep.checks` (when ``Config.host_checks`` asks for it)."""
    if not checks.wanted(spec.host_checks, topk_idx):
        return out
    counts = checks.expert_id_guard(out[at], topk_idx, spec.num_experts, what, spec.axis_name)
    return (*out[:at], counts, *out[at + 1 :])
