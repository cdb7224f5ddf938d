"""The CUDA backend: jax_ep's kernels as XLA FFI custom calls.

* :mod:`~jax_ep.backends.cuda.extension`: loads the compiled modules;
* :mod:`~jax_ep.backends.cuda.ffi`: registers the handlers and issues the calls;
* :mod:`~jax_ep.backends.cuda.high_throughput`, :mod:`~jax_ep.backends.cuda.low_latency`:
  the ops;
* :mod:`~jax_ep.backends.cuda.runtime`: a group's buffers and their wiring.
"""

from __future__ import annotations

from jax_ep.backends.cuda import high_throughput, low_latency


class CudaBackend:
    name = "cuda"

    def create_runtime(self, group):
        from jax_ep.backends.cuda import extension
        from jax_ep.backends.cuda.runtime import GroupRuntime

        extension.require()
        if any(d.platform != "gpu" for d in group.devices):
            raise ValueError("backend='cuda' needs GPU devices in the mesh")
        return GroupRuntime(group)

    layout = staticmethod(high_throughput.layout)
    dispatch = staticmethod(high_throughput.dispatch)
    combine = staticmethod(high_throughput.combine)
    token_dispatch = staticmethod(high_throughput.token_dispatch)
    token_combine = staticmethod(high_throughput.token_combine)
    ll_dispatch_send = staticmethod(low_latency.ll_dispatch_send)
    ll_dispatch_recv = staticmethod(low_latency.ll_dispatch_recv)
    ll_combine_send = staticmethod(low_latency.ll_combine_send)
    ll_combine_recv = staticmethod(low_latency.ll_combine_recv)
    ll_dispatch = staticmethod(low_latency.ll_dispatch)
    ll_combine = staticmethod(low_latency.ll_combine)


BACKEND = CudaBackend()
