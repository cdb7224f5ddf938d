"""Tuning and safety knobs of a :class:`jax_ep.Group`, in one frozen dataclass."""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_ep import _env

# The two figures the default SM count is derived from. Both are inputs, not measured
# by this package: the one-way NVLink 4 bandwidth of SM stores on an H100/H200
# (about 370 GB/s per direction), and what one SM is taken to sustain in 16-byte
# stores to a peer (50 GB/s).
_NVLINK_GBPS = 370.0
_GBPS_PER_SM = 50.0


def default_num_sms(num_ranks: int) -> int:
    """Thread blocks per rank of the high-throughput dispatch's send phase (``Config.num_sms = 0``).

    What it computes: ``_NVLINK_GBPS / _GBPS_PER_SM`` (7.4) SMs would keep one NVLink
    direction busy with stores; the default takes 2.5 times that (a margin for the
    latency of peer stores and of the routing rows every peer receives: a tuning
    choice, not derived), rounded up to an even count and kept in ``[8, 24]`` (24 so
    that the compute kernels keep most of the GPU). That is 20 for every group of two
    or more ranks: the count does not depend on how many ranks there are, nor on the
    token bytes. A group of one rank gets the cap, 24 (its send moves no rows; it only
    checks the routing).

    The count is the same for every rank of a group (the receive waits for
    ``num_sms`` arrivals per peer), so it depends on nothing device-specific.
    """
    if num_ranks <= 1:
        return 24
    need = _NVLINK_GBPS / _GBPS_PER_SM * 2.5
    even = int(-(-need // 2) * 2)
    return max(8, min(24, even))


TRANSPORTS = ("ipc", "nvshmem")


@dataclasses.dataclass(frozen=True)
class Config:
    """Per-group settings. Every field has a safe default.

    num_sms: thread blocks per rank of the high-throughput dispatch's send phase, the
      kernel that pushes token rows to peers (and, across nodes, of its two hops);
      0 = :func:`default_num_sms`. The combine's send reduces expert rows from local
      memory and runs with ``num_copy_sms`` blocks.
    num_copy_sms: thread blocks per rank of the local copy-out/reduce kernels, which
      are HBM-bound and short, and of every low-latency kernel (a decode step has no
      compute to leave SMs to); 0 = every SM of the device. The low-latency kernels
      use fewer when the rows they can move need fewer (the call's tokens for the
      one-call ops, the buffer's capacity for a split receive), and in loopback
      the virtual ranks of a launch share them (one wave). Lower it when several
      processes share one GPU (CUDA MPS), so spinning receivers leave SMs to senders.
    low_latency_one_launch: ``low_latency_dispatch`` / ``low_latency_combine`` run their
      send and receive phases in one kernel launch (a launch and its fixed start fewer
      per op) where that is safe: one node, and no other process running a rank of the
      group on the same GPU. With peers on other GPUs the launch takes at most half the
      SMs, so that a collective XLA runs alongside it still finds SMs. False = always
      the split forms' two launches.
    timeout_s: budget of every wait on a peer inside a kernel (default 100 s, or
      ``JAX_EP_TIMEOUT_S``); on expiry the
      kernel records (rank, peer, phase, counters) and the op fails with that text.
    sync_errors: debugging aid: the handler waits for its kernels and reports a
      device-side error at the call that hit it. Costs a host sync per op and keeps
      the ops out of CUDA graphs. Off: errors surface at the next jax_ep call on that
      device, or at :meth:`jax_ep.Group.check`.
    fault_inject_rank: testing aid: this rank skips its sends (a peer that never
      arrives), so the others must time out with a clear error. -1 = off.
    host_checks: the reference backend checks every step's expert ids on the host
      (``io_callback``, :mod:`jax_ep.checks`): ids outside ``[-1, num_experts)`` fail the
      step, as the CUDA backend reports them from the device. Turn it off to
      ``jax.export`` a reference-backend program with concrete shapes (JAX cannot
      serialise host callbacks); with a symbolic token count (the only place one
      appears is ``jax.export``) the check is left out by itself.
    transport: how ranks in other processes reach each other's buffers. ``"ipc"``:
      ``cudaMalloc`` buffers shared with CUDA IPC handles (peer access within a
      process). ``"nvshmem"``: buffers on the NVSHMEM symmetric heap (one process per
      GPU; needs nvshmem4py), see :mod:`jax_ep.transports.nvshmem_bootstrap`.
    node_size: ranks per node of the two-level internode path (``transport="nvshmem"``):
      ranks ``[n * node_size, (n + 1) * node_size)`` form node ``n``; tokens cross
      between nodes once per node through NVSHMEM and are forwarded inside a node over
      NVLink. 0 = with a tuple EP axis (``Group(mesh, ("node", "gpu"))``), the size of its
      innermost axis: ranks that share the outer indices form a node, so a ``(node, gpu)``
      mesh needs no arithmetic (checked against the hosts: a node must not span two); with
      one EP axis, the ranks of each host (found from the processes' host names). A
      smaller value splits one host into virtual nodes, so the internode path runs (and
      is tested) on one machine, even on one GPU.
    ib_service_level: InfiniBand service level of the NVSHMEM traffic
      (``NVSHMEM_IB_SL``, 0-15): puts EP traffic on its own virtual lane. Adaptive
      routing is a property the fabric's switches give a service level, so a level
      configured for adaptive routing turns it on for this traffic. None = NVSHMEM's default.
    ib_traffic_class: InfiniBand traffic class (``NVSHMEM_IB_TRAFFIC_CLASS``, 0-255),
      the QoS/DSCP class on RoCE. None = NVSHMEM's default.
    ibgda: GPU-initiated RDMA (``NVSHMEM_IB_ENABLE_IBGDA``): the kernels post RDMA
      work themselves instead of through NVSHMEM's CPU proxy (needs GPUDirect RDMA and
      a Mellanox NIC). None = NVSHMEM's default.
    nvshmem_env: NVSHMEM settings exported before NVSHMEM starts, as (name, value)
      pairs or a dict, e.g. the InfiniBand service level and traffic class
      (``NVSHMEM_IB_SL``, ``NVSHMEM_IB_TRAFFIC_CLASS``) that put EP traffic on its own
      virtual lane; NVSHMEM's documentation lists them.
    """

    num_sms: int = 0
    num_copy_sms: int = 0
    low_latency_one_launch: bool = True
    timeout_s: float = dataclasses.field(default_factory=_env.default_timeout_s)
    sync_errors: bool = False
    fault_inject_rank: int = -1
    host_checks: bool = True
    transport: str = "ipc"
    node_size: int = 0
    ib_service_level: int | None = None
    ib_traffic_class: int | None = None
    ibgda: bool | None = None
    nvshmem_env: tuple[tuple[str, str], ...] = ()

    def nvshmem_environment(self) -> dict[str, str]:
        """What NVSHMEM must see in its environment before it starts (the fields above)."""
        env = {}
        if self.ib_service_level is not None:
            env["NVSHMEM_IB_SL"] = str(self.ib_service_level)
        if self.ib_traffic_class is not None:
            env["NVSHMEM_IB_TRAFFIC_CLASS"] = str(self.ib_traffic_class)
        if self.ibgda is not None:
            env["NVSHMEM_IB_ENABLE_IBGDA"] = "1" if self.ibgda else "0"
        env.update(self.nvshmem_env)
        return env

    def resolved_num_sms(self, num_ranks: int) -> int:
        return self.num_sms if self.num_sms > 0 else default_num_sms(num_ranks)

    def __post_init__(self):
        # types first, so that no comparison below meets a str or a float count
        for name in ("num_sms", "num_copy_sms", "fault_inject_rank", "node_size"):
            _check_int(name, getattr(self, name))
        for name in ("num_sms", "num_copy_sms"):
            if getattr(self, name) < 0:
                raise ValueError(f"Config.{name} must be >= 0, got {getattr(self, name)}")
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(
            timeout, (int, float, np.integer, np.floating)
        ):
            raise TypeError(
                f"Config.timeout_s must be a number of seconds (int or float), got {timeout!r}"
            )
        if not timeout > 0:
            raise ValueError(f"Config.timeout_s must be > 0, got {timeout}")
        if self.transport not in TRANSPORTS:
            raise ValueError(
                f"Config.transport must be one of {TRANSPORTS}, got {self.transport!r}"
            )
        pairs = self.nvshmem_env.items() if isinstance(self.nvshmem_env, dict) else self.nvshmem_env
        pairs = tuple((str(k), str(v)) for k, v in pairs)
        bad = [k for k, _ in pairs if not k.startswith("NVSHMEM_")]
        if bad:
            raise ValueError(f"Config.nvshmem_env takes NVSHMEM_* variables, got {bad}")
        object.__setattr__(self, "nvshmem_env", pairs)
        for name, top in (("ib_service_level", 15), ("ib_traffic_class", 255)):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= top:
                raise ValueError(f"Config.{name} must be in [0, {top}], got {value}")
        if self.node_size < 0:
            raise ValueError(f"Config.node_size must be >= 0, got {self.node_size}")
        if self.node_size and self.transport != "nvshmem":
            raise ValueError(
                "Config.node_size splits ranks into nodes for the NVSHMEM transport: "
                "use it with transport='nvshmem'"
            )


def _check_int(name: str, value) -> None:
    # numpy ints are fine; floats (2.5) and bools are not: these count blocks, ranks, ...
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Config.{name} must be an int, got {value!r}")
