"""Peer buffers on one host: peer access inside a process, CUDA IPC handles across processes.

Every rank owns one ``cudaMalloc`` buffer. A rank in this process reaches the buffer of
a rank in this process through its raw pointer (peer access is enabled between local
GPUs; in loopback all virtual ranks' buffers sit on one device), and the buffer of a
rank in another process through a CUDA IPC handle that the owner published in the
``jax.distributed`` key-value store (:mod:`jax_ep.transports.kv_store`).
"""

from __future__ import annotations

from jax_ep.transports import kv_store

KV_TIMEOUT_S = 300.0


def peer_tables(
    ext,
    key: str,
    member_ordinals: list[int | None],
    own: dict[int, int],
    opened: list[tuple[int, int]],
) -> dict[int, list[int]]:
    """Every local rank's table of all members' buffer bases, as its GPU sees them.

    Args:
      ext: the extension module (peer access, IPC calls).
      key: key-value store prefix unique to this EP group.
      member_ordinals: per rank, the local GPU ordinal of a rank in this process, None
        for a rank in another process.
      own: buffer of each local rank (rank → pointer).
      opened: receives (ordinal, pointer) of each IPC mapping opened (closed by the caller).
    """
    local = {r: o for r, o in enumerate(member_ordinals) if o is not None}
    for a in local.values():
        for b in local.values():
            ext.enable_peer_access(a, b)
    remote = [r for r, o in enumerate(member_ordinals) if o is None]
    handles = {}
    if remote:
        for rank, ptr in own.items():
            kv_store.publish(f"{key}/ipc{rank}", ext.ipc_handle(local[rank], ptr))
        for rank in remote:
            handles[rank] = kv_store.fetch(
                f"{key}/ipc{rank}", KV_TIMEOUT_S, what=f"buffer handle of EP rank {rank}"
            )
    tables = {}
    for rank, ordinal in local.items():
        bases = []
        for peer in range(len(member_ordinals)):
            if peer in own:
                bases.append(own[peer])
            else:
                ptr = ext.ipc_open(ordinal, handles[peer])
                opened.append((ordinal, ptr))
                bases.append(ptr)
        tables[rank] = bases
    return tables


def wait_until_mapped(key: str, spans_processes: bool) -> None:
    """Nobody may write into a peer's buffer before every peer has mapped all of them."""
    if spans_processes:
        kv_store.barrier(f"{key}/wired", KV_TIMEOUT_S)


def release(ext, opened: list[tuple[int, int]], owned: list[tuple[int, int]]) -> None:
    """Unmaps peers' buffers, then frees ours (importers must close before exporters free)."""
    for ordinal, ptr in opened:
        try:
            ext.ipc_close(ordinal, ptr)
        except RuntimeError:
            pass  # the process is going down with a broken context: nothing left to release
    for ordinal, ptr in owned:
        try:
            ext.free_buffer(ordinal, ptr)
        except RuntimeError:
            pass


def gpus_unshared(ext, key: str, member_ordinals: list[int | None]) -> bool:
    """True when no two ranks of the EP group run on one GPU (the low-latency ops may then
    run send and receive in one launch; see ``DeviceStateConfig.ll_one_launch``).

    Ranks of this process are on distinct GPUs (only loopback puts several on one, and
    it does not come here); ranks of other processes publish their GPU's UUID, which
    the processes compare.
    """
    uuids = {r: ext.device_uuid(o) for r, o in enumerate(member_ordinals) if o is not None}
    if len(uuids) == len(member_ordinals):
        return True
    for rank, uuid in uuids.items():
        kv_store.publish(f"{key}/gpu{rank}", uuid.encode())
    for rank, o in enumerate(member_ordinals):
        if o is None:
            uuids[rank] = kv_store.fetch(
                f"{key}/gpu{rank}", KV_TIMEOUT_S, what=f"GPU of EP rank {rank}"
            ).decode()
    return len(set(uuids.values())) == len(uuids)
