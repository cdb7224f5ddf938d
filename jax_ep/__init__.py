"""jax_ep: expert-parallel dispatch/combine for JAX.

Fast CUDA kernels behind XLA FFI custom calls on NVIDIA GPUs, and a pure-JAX
reference backend (:mod:`jax_ep.reference`) everywhere else. See README.md.
"""

from jax_ep import experts, fp8, reference
from jax_ep.backends import default_backend
from jax_ep.capacity import DEFAULT_CAPACITY_FACTOR
from jax_ep.config import Config
from jax_ep.fp8 import dequantize as dequantize_fp8
from jax_ep.fp8 import quantize as quantize_fp8
from jax_ep.group import Group
from jax_ep.handles import (
    DispatchLayout,
    DispatchOut,
    Handle,
    LowLatencyHandle,
    LowLatencyOut,
)
from jax_ep.high_throughput import combine, dispatch, get_dispatch_layout
from jax_ep.low_latency import (
    LowLatencyTicket,
    low_latency_combine,
    low_latency_combine_recv,
    low_latency_combine_send,
    low_latency_dispatch,
    low_latency_dispatch_recv,
    low_latency_dispatch_send,
)
from jax_ep.memory import MemoryReport

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CAPACITY_FACTOR",
    "Config",
    "DispatchLayout",
    "DispatchOut",
    "Group",
    "Handle",
    "LowLatencyHandle",
    "LowLatencyOut",
    "LowLatencyTicket",
    "MemoryReport",
    "combine",
    "default_backend",
    "dequantize_fp8",
    "dispatch",
    "experts",
    "fp8",
    "get_dispatch_layout",
    "low_latency_combine",
    "low_latency_combine_recv",
    "low_latency_combine_send",
    "low_latency_dispatch",
    "low_latency_dispatch_recv",
    "low_latency_dispatch_send",
    "quantize_fp8",
    "reference",
]
