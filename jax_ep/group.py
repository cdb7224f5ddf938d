"""The EP group: created once, outside ``jit``; owns the communication buffers.

A group fixes what every op call of a model shares: the mesh axis, the expert
count, the largest token count per rank and hidden size (which size the
buffers), the backend and the :class:`Config`. On the CUDA backend it
allocates, per local device, the buffers that peers write into and wires up the
peer pointers (peer access in one process; CUDA IPC handles exchanged through
the JAX distributed key-value store across processes). The reference backend
needs no buffers and accepts the same arguments.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import validation
from jax_ep.backends import backend_for, default_backend
from jax_ep.backends.spec import OpSpec
from jax_ep.config import Config

_ids = itertools.count(1)
_lock = threading.Lock()
BACKENDS = ("auto", "cuda", "reference")


class Group:
    """Expert-parallel group over one mesh axis.

    Args:
      mesh: the device mesh (``None`` with ``loopback``: the first device).
      axis_name: the EP mesh axis; other mesh axes form independent EP groups.
      num_experts: total experts ``E`` (divisible by the EP size).
      num_topk: top-k ``K`` the ops will be called with (at most).
      hidden: hidden size ``H`` (at most).
      num_max_tokens_per_rank: tokens per rank per call (at most); for the low-latency
        ops it is ``T_max`` of the ``[E_loc, R*T_max, H]`` receive layout.
      dtype: widest payload dtype the buffers must hold (bf16 by default).
      backend: ``"auto"``, ``"cuda"`` or ``"reference"``.
      loopback: run ``loopback`` virtual EP ranks on one device: call the ops under
        ``jax.vmap(..., axis_name=axis_name)`` over a leading rank axis. For testing the
        whole protocol on one GPU (and for the reference backend on one CPU device).
      low_latency: also allocate the low-latency buffers.
      config: :class:`Config`.
    """

    def __init__(
        self,
        mesh: jax.sharding.Mesh | None = None,
        axis_name: Any = "ep",
        *,
        num_experts: int,
        num_topk: int,
        hidden: int,
        num_max_tokens_per_rank: int,
        dtype: Any = jnp.bfloat16,
        backend: str = "auto",
        loopback: int | None = None,
        low_latency: bool = False,
        config: Config | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if loopback is not None:
            if not isinstance(loopback, int) or loopback < 1:
                raise ValueError(
                    f"loopback must be a positive int (virtual ranks), got {loopback!r}"
                )
            devices = [mesh.devices.flat[0]] if mesh is not None else [jax.devices()[0]]
            num_ranks = loopback
        else:
            if mesh is None:
                raise ValueError(
                    "Group needs a mesh (or loopback=N for virtual ranks on one device)"
                )
            if axis_name not in mesh.axis_names:
                raise ValueError(
                    f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}"
                )
            devices = list(mesh.devices.flat)
            num_ranks = mesh.shape[axis_name]
        validation.check_num_experts(num_experts, num_ranks)
        for name, value in (
            ("num_topk", num_topk),
            ("hidden", hidden),
            ("num_max_tokens_per_rank", num_max_tokens_per_rank),
        ):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.mesh = mesh
        self.axis_name = axis_name
        self.num_ranks = int(num_ranks)
        self.num_experts = int(num_experts)
        self.num_topk = int(num_topk)
        self.hidden = int(hidden)
        self.num_max_tokens_per_rank = int(num_max_tokens_per_rank)
        self.dtype = np.dtype(dtype)
        self.loopback = loopback
        self.low_latency = low_latency
        self.config = config or Config()
        if self.config.transport == "nvshmem" and loopback:
            raise ValueError(
                "jax_ep: loopback runs every rank in one process, while the NVSHMEM transport "
                "runs one process per GPU: use Config(transport='ipc') with loopback"
            )
        self.devices = devices
        with _lock:
            self.id = next(_ids)
        if backend == "auto":
            backend = default_backend(devices)
        self.backend = backend
        self._runtime = backend_for(backend).create_runtime(self)

    # ------------------------------------------------------------------ queries

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    def spec(self, **fields) -> OpSpec:
        """The static description of one op call on this group."""
        return OpSpec(
            backend=self.backend,
            group_id=self.id,
            axis_name=self.axis_name,
            num_ranks=self.num_ranks,
            num_experts=self.num_experts,
            sync_errors=self.config.sync_errors,
            fault_inject_rank=self.config.fault_inject_rank,
            **fields,
        )

    def check_fits(
        self, hidden: int, dtype, num_tokens: int, num_topk: int, op: str, low_latency: bool = False
    ) -> None:
        """Raise a clear error when a call exceeds what the group's buffers were sized for."""
        if self.backend != "cuda":
            return
        problems = []
        # a symbolic token count (jax.export) is checked by the handler at run time
        if not jax.export.is_symbolic_dim(num_tokens) and num_tokens > self.num_max_tokens_per_rank:
            problems.append(
                f"{num_tokens} tokens > num_max_tokens_per_rank={self.num_max_tokens_per_rank}"
            )
        if num_topk > self.num_topk:
            problems.append(f"top-k {num_topk} > num_topk={self.num_topk}")
        if hidden * np.dtype(dtype).itemsize > self.hidden * self.dtype.itemsize:
            problems.append(
                f"rows of {hidden} x {np.dtype(dtype).name} exceed the "
                f"{self.hidden} x {self.dtype.name} the buffers hold"
            )
        if low_latency and not self.low_latency:
            problems.append("the group was created without low_latency=True")
        if problems:
            raise ValueError(f"jax_ep.{op}: " + "; ".join(problems) + " (create the Group larger)")

    def check(self) -> None:
        """Raise the first device-side error (timeout, bad expert id) recorded on this group."""
        if self._runtime is not None:
            self._runtime.check()

    def call_stats(self) -> list[dict]:
        """Diagnostics per local device of a CUDA group (``[]`` for the reference backend).

        Each entry: ``device``, ``handler_calls_captured`` / ``handler_calls_direct``
        (FFI handler calls made while XLA was capturing a command buffer, i.e. a CUDA
        graph, or not) and ``ops_per_local_rank`` (ops each local rank has executed, by
        kind, read from the device). Inside a replayed graph the kernels run without a
        handler call, so ops well above handler calls show that a decode step is
        replayed from a graph. Synchronises the device: call it outside jit.
        """
        return [] if self._runtime is None else self._runtime.call_stats()

    def buffer_bytes(self) -> int:
        """Bytes of communication buffer per rank (0 on the reference backend)."""
        return 0 if self._runtime is None else self._runtime.bytes_per_rank

    def close(self) -> None:
        """Free the buffers (also done at interpreter exit)."""
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = f"loopback={self.loopback}" if self.loopback else f"axis={self.axis_name!r}"
        return (
            f"Group({mode}, ranks={self.num_ranks}, experts={self.num_experts}, "
            f"backend={self.backend!r})"
        )
