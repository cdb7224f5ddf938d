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

import dataclasses
import threading
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import memory, mesh_axes, validation
from jax_ep.backends import backend_for, default_backend
from jax_ep.backends.spec import OpSpec
from jax_ep.config import Config
from jax_ep.ordering import OrderChain

_lock = threading.Lock()
_live: dict[str, weakref.ref] = {}  # key -> the live Group with that key, in this process
BACKENDS = ("auto", "cuda", "reference")
DEFAULT_NAME = "jax_ep"


def _claim_key(base: str, explicit: bool, group: Group) -> str:
    """A key no live group of this process holds: ``base``, or for an unnamed group
    ``base#2``, ``base#3``, ... in creation order (the same in every process of an SPMD
    program, which creates its groups in the same order)."""
    with _lock:
        key, n = base, 1
        while key in _live and _live[key]() is not None:
            if explicit:
                raise ValueError(
                    f"jax_ep: a live Group already has the key {key!r}; close it first or pass "
                    "another name="
                )
            n += 1
            key = f"{base}#{n}"
        _live[key] = weakref.ref(group)
        return key


def _release_key(key: str) -> None:
    with _lock:
        _live.pop(key, None)


def live_group(key: str) -> Group:
    """The live group with this key, or a clear error."""
    group = _live.get(key, lambda: None)()
    if group is None:
        raise ValueError(
            f"jax_ep: no live Group with key {key!r} in this process (closed, or never created)"
        )
    return group


def order_chain(spec: OpSpec) -> OrderChain | None:
    """The ordering-token chain of the group an op runs on (None: no device state)."""
    return live_group(spec.group_key).order if spec.backend == "cuda" else None


# Default low-latency token bound: decode batches are at most a few hundred tokens per rank.
DEFAULT_LOW_LATENCY_TOKENS = 256


class Group:
    """Expert-parallel group over one mesh axis.

    Args:
      mesh: the device mesh (``None`` with ``loopback``: the first device).
      axis_name: the EP mesh axis, or a tuple of mesh axes (``("node", "gpu")``) whose
        ranks are linearised in ``jax.lax.axis_index`` order (the first axis outermost);
        the other mesh axes form independent EP groups.
      num_experts: total experts ``E`` (divisible by the EP size).
      num_topk: top-k ``K`` the ops will be called with (at most).
      hidden: hidden size ``H`` (at most).
      num_max_tokens_per_rank: tokens per rank per high-throughput call (at most): sizes the
        dispatch/combine buffers.
      dtype: widest payload dtype the buffers must hold (bf16 by default).
      backend: ``"auto"``, ``"cuda"`` or ``"reference"``.
      loopback: run ``loopback`` virtual EP ranks on one device: call the ops under
        ``jax.vmap(..., axis_name=axis_name)`` over a leading rank axis. For testing the
        whole protocol on one GPU (and for the reference backend on one CPU device).
      low_latency: also allocate the low-latency buffers.
      num_max_low_latency_tokens_per_rank: tokens per rank per low-latency call (at most;
        DeepEP's ``num_max_dispatch_tokens_per_rank``): ``T_max`` of the ``[E_loc, R*T_max, H]``
        receive layout, and what sizes the low-latency buffers (they grow with
        ``E_loc * R * T_max * H``). Default: ``num_max_tokens_per_rank``, at most
        :data:`DEFAULT_LOW_LATENCY_TOKENS` (decode batches are small).
      config: :class:`Config`.
      name: what compiled programs know the group by. Its :attr:`key` (the name, the
        mesh axis and the sizes) is written into every program that uses the group, and
        binds the program to the live group with that key in whichever process compiles
        or loads it (an exported program too). Unnamed groups with equal sizes get
        ``name#2``, ``name#3``, ... in creation order; two live groups never share a key.
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
        num_max_low_latency_tokens_per_rank: int | None = None,
        config: Config | None = None,
        name: str | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        axis_name = mesh_axes.normalize(axis_name, "Group axis_name")
        if loopback is not None:
            if not isinstance(axis_name, str):
                raise ValueError(
                    f"loopback runs its virtual ranks under one jax.vmap axis: give one axis "
                    f"name, got {axis_name!r}"
                )
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
            mesh_axes.check_in_mesh(mesh, axis_name, "Group axis_name")
            devices = list(mesh.devices.flat)
            num_ranks = mesh_axes.size(mesh, axis_name)
        try:
            validation.check_num_experts(num_experts, num_ranks)
        except ValueError as e:
            where = (
                f"loopback={loopback}"
                if loopback is not None
                else f"axis {axis_name!r} of the mesh {mesh_axes.describe(mesh)}"
            )
            raise ValueError(f"{e}: the EP ranks of {where}") from None
        if num_max_low_latency_tokens_per_rank is None:
            num_max_low_latency_tokens_per_rank = min(
                num_max_tokens_per_rank, DEFAULT_LOW_LATENCY_TOKENS
            )
        for arg, value in (
            ("num_topk", num_topk),
            ("hidden", hidden),
            ("num_max_tokens_per_rank", num_max_tokens_per_rank),
            ("num_max_low_latency_tokens_per_rank", num_max_low_latency_tokens_per_rank),
        ):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        self.mesh = mesh
        self.axis_name = axis_name
        self.num_ranks = int(num_ranks)
        self.num_experts = int(num_experts)
        self.num_topk = int(num_topk)
        self.hidden = int(hidden)
        self.num_max_tokens_per_rank = int(num_max_tokens_per_rank)
        self.num_max_low_latency_tokens_per_rank = int(num_max_low_latency_tokens_per_rank)
        self.dtype = np.dtype(dtype)
        self.loopback = loopback
        self.low_latency = low_latency
        self.config = _with_node_size(config or Config(), mesh, axis_name)
        if self.config.transport == "nvshmem" and loopback:
            raise ValueError(
                "jax_ep: loopback runs every rank in one process, while the NVSHMEM transport "
                "runs one process per GPU: use Config(transport='ipc') with loopback"
            )
        self.devices = devices
        if name is not None and (not isinstance(name, str) or not name or "|" in name):
            raise ValueError(f"name must be a non-empty str without '|', got {name!r}")
        if backend == "auto":
            backend = default_backend(devices)
        self.backend = backend
        base = "|".join(
            [
                name or DEFAULT_NAME,
                f"axis={axis_name}",
                f"ranks={self.num_ranks}",
                f"experts={self.num_experts}",
                f"topk={self.num_topk}",
                f"hidden={self.hidden}x{self.dtype.name}",
                f"tokens={self.num_max_tokens_per_rank}",
                f"low_latency={int(bool(low_latency))}",
                f"low_latency_tokens={self.num_max_low_latency_tokens_per_rank}",
            ]
        )
        self.key = _claim_key(base, name is not None, self)
        self._closed = False
        # the ordering token threaded through this group's ops (CUDA: device state)
        self.order = OrderChain() if backend == "cuda" else None
        try:
            self._runtime = backend_for(backend).create_runtime(self)
        except BaseException:
            _release_key(self.key)
            raise

    # ------------------------------------------------------------------ queries

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def spans_nodes(self) -> bool:
        """Whether the ranks are split into several nodes (the two-level internode path)."""
        return getattr(self._runtime, "node_size", self.num_ranks) < self.num_ranks

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    def spec(self, **fields) -> OpSpec:
        """The static description of one op call on this group."""
        if self.closed:
            raise ValueError(f"jax_ep: the Group {self.key!r} is closed; create a new Group")
        return OpSpec(
            backend=self.backend,
            group_key=self.key,
            axis_name=self.axis_name,
            num_ranks=self.num_ranks,
            num_experts=self.num_experts,
            sync_errors=self.config.sync_errors,
            spans_nodes=self.spans_nodes,
            fault_inject_rank=self.config.fault_inject_rank,
            host_checks=self.config.host_checks,
            **fields,
        )

    def check_fits(
        self, hidden: int, dtype, num_tokens: int, num_topk: int, op: str, low_latency: bool = False
    ) -> None:
        """Raise a clear error when a call exceeds what the group's buffers were sized for.

        Every backend enforces these limits before any backend code (the reference backend
        has no buffers, but a program that runs on it must also run on the CUDA backend),
        except the row width in bytes, which only buffers constrain.
        """
        problems = []
        bound, bound_name = (
            (self.num_max_low_latency_tokens_per_rank, "num_max_low_latency_tokens_per_rank")
            if low_latency
            else (self.num_max_tokens_per_rank, "num_max_tokens_per_rank")
        )
        # a symbolic token count (jax.export) is checked by the handler at run time
        if not jax.export.is_symbolic_dim(num_tokens) and num_tokens > bound:
            problems.append(f"{num_tokens} tokens > {bound_name}={bound}")
        if num_topk > self.num_topk:
            problems.append(f"top-k {num_topk} > num_topk={self.num_topk}")
        if hidden > self.hidden:
            problems.append(f"hidden {hidden} > hidden={self.hidden}")
        # the byte width of a row (a wider dtype than the group's) only matters where
        # buffers exist; the reference backend carries any payload dtype
        elif (
            self.backend == "cuda"
            and hidden * np.dtype(dtype).itemsize > self.hidden * self.dtype.itemsize
        ):
            problems.append(
                f"rows of {hidden} x {np.dtype(dtype).name} exceed the "
                f"{self.hidden} x {self.dtype.name} the buffers hold"
            )
        if low_latency and not self.low_latency:
            problems.append("the group was created without low_latency=True")
        if problems:
            raise ValueError(
                f"jax_ep.{op}: " + "; ".join(problems) + " (create the Group to fit the call)"
            )

    def take_token(self, like: jax.Array):
        """The ordering token the next op of this group takes (None: no device state)."""
        return None if self.order is None else self.order.take(like)

    def put_token(self, token) -> None:
        """Records the ordering token an op of this group returned."""
        if self.order is not None:
            self.order.put(token)

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

    def buffer_sizes(self, num_nodes: int | None = None) -> dict[str, Any]:
        """The sizes the communication buffers are laid out for (the CUDA extension's
        ``buffer_bytes``/``register_state`` arguments; :func:`jax_ep.memory.buffer_regions`).

        ``num_nodes``: nodes the ranks span (internode); default: the runtime's, else
        ``Config.node_size``'s split, else 1.
        """
        if num_nodes is None:
            node_size = getattr(self._runtime, "node_size", None) or self.config.node_size
            num_nodes = self.num_ranks // node_size if node_size else 1
        return dict(
            num_ranks=self.num_ranks,
            max_tokens=self.num_max_tokens_per_rank,
            hidden=self.hidden,
            elem_bytes=self.dtype.itemsize,
            num_topk=self.num_topk,
            num_local_experts=self.num_local_experts,
            low_latency=int(self.low_latency),
            ll_max_tokens=self.num_max_low_latency_tokens_per_rank,
            num_nodes=num_nodes,
        )

    # bytes per rank this group and one call of each op use (jax_ep.memory.report's docstring)
    memory_report = memory.report

    def close(self) -> None:
        """Free the buffers (also done at interpreter exit).

        Programs compiled for this group fail with a clear error from now on (also when
        replayed from a CUDA graph); a new group, even with the same key, needs a newly
        traced program.
        """
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        self._closed = True
        _release_key(self.key)

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


def _with_node_size(config: Config, mesh, axis_name) -> Config:
    """``config`` with the NVSHMEM node size a tuple EP axis implies: with ``(..., node, gpu)``
    the innermost axis spans a node (ranks of one node share the outer indices), so
    ``Config.node_size=0`` means the size of that axis. One axis keeps 0 (the ranks of each
    host, found at wiring time)."""
    if config.transport != "nvshmem" or config.node_size or isinstance(axis_name, str):
        return config
    return dataclasses.replace(config, node_size=mesh.shape[axis_name[-1]])
