"""Backends: who computes an op once the public API has checked it.

The ops layer (:mod:`jax_ep.high_throughput`, :mod:`jax_ep.low_latency`) validates the
call, picks the backend named by the group and writes the gradients once, in terms of
the forward pieces every backend provides (:class:`Backend`). Two implementations:

* :mod:`jax_ep.backends.reference`: plain JAX over ``all_to_all`` (the specification,
  :mod:`jax_ep.reference`); no device state.
* :mod:`jax_ep.backends.cuda`: the CUDA kernels as XLA FFI custom calls, with the
  communication buffers a :class:`jax_ep.Group` owns (:class:`Runtime`).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

from jax_ep.backends.spec import OpSpec
from jax_ep.handles import DispatchLayout, Handle, LowLatencyHandle

NAMES = ("cuda", "reference")


class Runtime(Protocol):
    """Device state a backend keeps for one group (the CUDA buffers)."""

    bytes_per_rank: int

    def check(self) -> None: ...
    def call_stats(self) -> list[dict]: ...
    def close(self) -> None: ...


class Backend(Protocol):
    """The forward pieces of every op, per EP rank (inside ``shard_map``/``vmap``).

    Every op that touches a group's device state takes the group's ordering token and
    returns ``(result, new_token)`` (:mod:`jax_ep.ordering`; ``None`` passes through a
    backend without device state). Send halves of the low-latency ops return an opaque
    *ticket* pytree as their result, which the matching receive half consumes.
    """

    name: str

    def create_runtime(self, group: Any) -> Runtime | None:
        """Device state for ``group`` (``None`` when the backend needs none)."""
        ...

    def layout(self, topk_idx: jax.Array, num_experts: int, num_ranks: int) -> DispatchLayout: ...

    def dispatch(self, x, topk_idx, topk_weights, token, spec: OpSpec) -> tuple[tuple, Any]:
        """``(x, scales, topk_idx, topk_weights, counts, num_dropped, handle)``, token."""
        ...

    def combine(self, y, handle: Handle, weights, token, spec: OpSpec, extra=None) -> tuple:
        """``((out [T, H], summed extra [T, X] | None), token)``: ``extra`` (``[R*T, X]``
        float32 per received token) travels home in the same exchange as the rows."""
        ...

    def token_dispatch(self, x, handle: Handle, token, spec: OpSpec) -> tuple[jax.Array, Any]:
        """Home rows ``[T, C]`` → the received-token list ``[R*T, C]`` (a cached dispatch)."""
        ...

    def token_combine(self, rows, handle: Handle, token, spec: OpSpec, extra=None) -> tuple:
        """Inverse of :meth:`token_dispatch`: summed over ranks in float32; ``extra`` as in
        :meth:`combine`."""
        ...

    def ll_dispatch_send(self, x, topk_idx, active_ranks, token, spec: OpSpec) -> tuple: ...
    def ll_dispatch_recv(self, ticket, token, spec: OpSpec) -> tuple: ...
    def ll_combine_send(self, y, handle: LowLatencyHandle, idx, weights, token, spec): ...
    def ll_combine_recv(self, ticket, handle: LowLatencyHandle, idx, weights, token, spec): ...
    def ll_dispatch(self, x, topk_idx, active_ranks, token, spec: OpSpec) -> tuple:
        """Both halves of a low-latency dispatch: ``(recv outputs, token)``, as the
        receive gives them."""
        ...

    def ll_combine(self, y, handle: LowLatencyHandle, idx, weights, token, spec) -> tuple:
        """Both halves of a low-latency combine: ``(out, token)``."""
        ...


def backend_for(name: str | OpSpec) -> Backend:
    """The backend called ``name`` (or running ``spec``); ``"cuda"`` is imported lazily."""
    name = name.backend if isinstance(name, OpSpec) else name
    if name == "cuda":
        from jax_ep.backends.cuda import BACKEND
    elif name == "reference":
        from jax_ep.backends.reference import BACKEND
    else:
        raise ValueError(f"unknown backend {name!r}; expected one of {NAMES}")
    return BACKEND


def default_backend(devices=None) -> str:
    """``"cuda"`` with the extension loaded and NVIDIA GPUs as devices, else ``"reference"``."""
    from jax_ep.backends.cuda import extension

    devices = devices if devices is not None else jax.devices()
    on_gpu = all(d.platform == "gpu" for d in devices)
    return "cuda" if on_gpu and extension.extension() is not None else "reference"
