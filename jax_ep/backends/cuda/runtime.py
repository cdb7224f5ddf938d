"""Communication buffers of a CUDA group: allocation, peer wiring, teardown.

One buffer per EP rank (a cudaMalloc on the rank's GPU, zeroed), sized by the
extension from the group's limits. Every device then gets a table with every
rank's buffer address as that device sees it (:mod:`jax_ep.transports`):

* same process: the raw pointer (peer access between local GPUs; in loopback all
  virtual ranks' buffers sit on the one device);
* other process: a CUDA IPC handle, published in the ``jax.distributed`` key-value
  store and opened here (:mod:`jax_ep.transports.cuda_ipc`);
* ``Config(transport="nvshmem")``: the buffers live on the NVSHMEM symmetric heap and
  each peer of this rank's node is NVSHMEM's mapping of it; ranks of other nodes have
  no address here (0): the kernels reach them with NVSHMEM puts
  (:mod:`jax_ep.transports.nvshmem_bootstrap`).
"""

from __future__ import annotations

import weakref

import jax
import numpy as np

from jax_ep import mesh_axes
from jax_ep.backends.cuda import extension
from jax_ep.backends.cuda.ffi import register_targets
from jax_ep.transports import cuda_ipc, kv_store, nvshmem_bootstrap


def ep_groups(mesh: jax.sharding.Mesh, axis_name) -> list[list[jax.Device]]:
    """Devices of each EP group (fixed coordinates on the other mesh axes), in rank order.

    ``axis_name`` is one mesh axis or a tuple of them; a tuple's rank is its linearised index
    in ``jax.lax.axis_index`` order (the first axis outermost), so the EP axes move to the
    end in the tuple's order and flatten row-major.
    """
    names = mesh_axes.names(axis_name)
    axes = [mesh.axis_names.index(n) for n in names]
    devs = np.moveaxis(mesh.devices, axes, list(range(-len(names), 0)))
    return [list(row) for row in devs.reshape(-1, mesh_axes.size(mesh, axis_name))]


class GroupRuntime:
    """Buffers and device states of one :class:`jax_ep.Group` on the CUDA backend."""

    def __init__(self, group):
        ext = extension.require()
        register_targets()
        self._ext = ext
        self.key = group.key
        cfg = group.config
        self._nvshmem = cfg.transport == "nvshmem"
        # ranks per node and nodes: the two-level (internode) kernels run when > 1 node
        self.node_size = self._node_size(group) if self._nvshmem else group.num_ranks
        # the group's sizes, by the names the extension's BufferSizes uses (size_fields())
        self._sizes = group.buffer_sizes(num_nodes=group.num_ranks // self.node_size)
        self.bytes_per_rank = ext.buffer_bytes(self._sizes)
        self._owned: list[tuple[int, int]] = []  # (device, ptr) we allocated
        self._opened: list[tuple[int, int]] = []  # (device, ptr) opened from IPC handles
        self._devices: list[int] = []
        self._symmetric: list[int] = []  # buffers on the NVSHMEM heap
        net_ops = 0
        if self._nvshmem:
            nvshmem_bootstrap.initialize(self.bytes_per_rank, cfg.nvshmem_environment())
            if self._sizes["num_nodes"] > 1:
                net_ops = extension.nvshmem_launchers()
        send_blocks = cfg.resolved_num_sms(group.num_ranks)
        common = dict(
            sizes=self._sizes,
            timeout_s=cfg.timeout_s,
            fault_inject_rank=cfg.fault_inject_rank,
            send_blocks=send_blocks,
            net_ops=net_ops,
        )
        instance = ext.create_group(self.key)
        # runs on close(), on garbage collection, or at interpreter exit
        self._finalizer = weakref.finalize(
            self, _release, ext, self.key, instance, self._opened, self._owned, self._symmetric
        )
        if group.loopback:
            dev = group.devices[0]
            ordinal = dev.local_hardware_id
            bases = [self._alloc(ordinal) for _ in range(group.num_ranks)]
            self._register(ordinal, 0, group.num_ranks, bases, common, cfg, one_launch=True)
        else:
            for members in ep_groups(group.mesh, group.axis_name):
                self._wire_ep_group(members, common, cfg)

    @staticmethod
    def _node_size(group) -> int:
        """Ranks per node of this process's EP group (Config.node_size, or per host)."""
        me = jax.process_index()
        members = next(
            m
            for m in ep_groups(group.mesh, group.axis_name)
            if any(d.process_index == me for d in m)
        )
        hosts = nvshmem_bootstrap.host_names([d.process_index for d in members])
        return nvshmem_bootstrap.node_size(hosts, group.config.node_size)

    def _alloc(self, ordinal: int) -> int:
        ptr = self._ext.alloc_buffer(ordinal, self.bytes_per_rank)
        self._owned.append((ordinal, ptr))
        return ptr

    def _register(self, ordinal, first_rank, num_local, bases, common, cfg, one_launch=False):
        copy_blocks = cfg.num_copy_sms or self._ext.num_sms(ordinal)
        self._ext.register_state(
            key=self.key,
            device=ordinal,
            first_rank=first_rank,
            num_local_ranks=num_local,
            copy_blocks=copy_blocks,
            peer_bases=bases,
            ll_one_launch=one_launch and cfg.low_latency_one_launch,
            **common,
        )
        self._devices.append(ordinal)

    def _wire_ep_group(self, members, common, cfg):
        me = jax.process_index()
        ordinals = [d.local_hardware_id if d.process_index == me else None for d in members]
        if all(o is None for o in ordinals):
            return
        if self._nvshmem:
            self._wire_nvshmem(members, common, cfg)
            return
        own = {r: self._alloc(o) for r, o in enumerate(ordinals) if o is not None}
        key = f"{self.key}/ep{members[0].id}"
        tables = cuda_ipc.peer_tables(self._ext, key, ordinals, own, self._opened)
        one_launch = cuda_ipc.gpus_unshared(self._ext, key, ordinals)
        for rank, bases in tables.items():
            self._register(ordinals[rank], rank, 1, bases, common, cfg, one_launch)
        cuda_ipc.wait_until_mapped(key, spans_processes=None in ordinals)

    def _wire_nvshmem(self, members, common, cfg):
        """One rank per process (NVSHMEM PE = process index): a symmetric buffer, zeroed,
        and every rank's buffer as NVSHMEM maps it on this GPU."""
        me = jax.process_index()
        ((rank, device),) = [(r, d) for r, d in enumerate(members) if d.process_index == me]
        ordinal = device.local_hardware_id
        node = [r // self.node_size for r in range(len(members))]
        own, bases = nvshmem_bootstrap.allocate(
            self.bytes_per_rank,
            [d.process_index for d in members],
            [n == node[rank] for n in node],
        )
        self._symmetric.append(own)
        self._ext.zero_buffer(ordinal, own, self.bytes_per_rank)
        self._register(ordinal, rank, 1, bases, common, cfg)
        # nobody may write into a peer's buffer before every peer has zeroed its own
        kv_store.barrier(f"{self.key}/ep{members[0].id}/nvshmem-wired", cuda_ipc.KV_TIMEOUT_S)

    def check(self) -> None:
        for ordinal in self._devices:
            msg = self._ext.pending_error(self.key, ordinal)
            if msg:
                raise RuntimeError(msg)

    def call_stats(self) -> list[dict]:
        return [
            dict(device=ordinal, **self._ext.call_stats(self.key, ordinal))
            for ordinal in self._devices
        ]

    def close(self) -> None:
        self._finalizer()
        # Programs compiled for this group are refused from now on; JAX's caches would
        # keep offering them (a jitted function, an eager op) to a new group with the
        # same key, so drop them: the next call traces and compiles for the new group.
        jax.clear_caches()


def _release(ext, key, instance, opened, owned, symmetric):
    """Closes the group (its programs fail cleanly from now on, its devices drain), then
    releases its buffers."""
    ext.close_group(key, instance)
    for ptr in symmetric:  # collective: every process closes its groups in the same order
        nvshmem_bootstrap.release(ptr)
    cuda_ipc.release(ext, opened, owned)
