"""NVSHMEM transport: bootstrap, symmetric heap and peer mappings (one process per GPU).

``Config(transport="nvshmem")`` puts a group's communication buffers on the NVSHMEM
symmetric heap instead of ``cudaMalloc`` + CUDA IPC:

* bootstrap: under ``jax.distributed`` (one process per GPU, e.g. started by
  ``python -m jax_ep.launch``), process 0 creates NVSHMEM's unique id, which
  travels to the others through JAX's key-value store; every process then
  initialises NVSHMEM on its GPU with nvshmem4py (UID method). Bounded waits: a
  process that never arrives gives a clear ``TimeoutError``.
* heap: sized from the group's buffer (``NVSHMEM_SYMMETRIC_SIZE`` is set before
  init; a later group that does not fit is a clear error, since the heap cannot grow).
* nodes: ranks are split into nodes (``Config.node_size``; by default the ranks of
  each host, found from the processes' host names). Ranks of one node reach each
  other's buffers as this GPU maps them (``nvshmem_ptr``), over NVLink as with CUDA
  IPC; ranks of other nodes are reached with NVSHMEM puts by the kernels of the
  ``_jax_ep_nvshmem`` module (IBGDA or the proxy over RDMA, peer-to-peer between
  virtual nodes of one host; :func:`jax_ep.backends.cuda.extension.nvshmem_launchers`).
* traffic options: ``Config.nvshmem_environment()`` (the InfiniBand service level,
  traffic class, IBGDA, and any ``Config.nvshmem_env``) is exported before init.
* finalisation at interpreter exit, after the buffers are freed.

nvshmem4py is an optional dependency: ``pip install nvshmem4py-cu13`` (or ``-cu12``).
"""

from __future__ import annotations

import atexit
import os
import socket
from collections.abc import Callable

import jax
import numpy as np

from jax_ep.transports import kv_store

_UID_KEY = "nvshmem/uid"
_UID_TIMEOUT_S = 300.0
# NVSHMEM keeps its own bookkeeping in the heap: room on top of the buffers.
_HEAP_MARGIN_BYTES = 64 << 20

_state: dict = {}  # NVSHMEM runs in this process when not empty
_HOST_TIMEOUT_S = 300.0
_host_published = False


def missing_reason() -> str:
    """Why the NVSHMEM transport cannot be used here ('' when it can)."""
    try:
        import nvshmem.core  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (missing CUDA Python deps)
        return (
            f"nvshmem4py is not installed ({e}); install it with "
            "'pip install nvshmem4py-cu13' (CUDA 13) or 'nvshmem4py-cu12' (CUDA 12)"
        )
    return ""


def share_unique_id(make_uid: Callable[[], bytes], timeout_s: float = _UID_TIMEOUT_S) -> bytes:
    """Process 0 calls ``make_uid``; every process returns its bytes (key-value store)."""
    if jax.process_index() == 0:
        uid = make_uid()
        kv_store.publish(_UID_KEY, uid)
        return uid
    return kv_store.fetch(_UID_KEY, timeout_s, what="NVSHMEM unique id from process 0")


def host_names(processes: list[int], timeout_s: float = _HOST_TIMEOUT_S) -> list[str]:
    """Host name of each process in ``processes`` (key-value store; this process publishes once)."""
    global _host_published
    me = jax.process_index()
    if not _host_published and any(p != me for p in processes):
        kv_store.publish(f"host/{me}", socket.gethostname().encode())
        _host_published = True
    return [
        socket.gethostname()
        if p == me
        else kv_store.fetch(f"host/{p}", timeout_s, what=f"host name of process {p}").decode()
        for p in processes
    ]


def node_size(hosts: list[str], requested: int) -> int:
    """Ranks per node for ranks on ``hosts`` (rank order): ``requested``, or (0) the
    ranks of one host, which must be contiguous runs of one size."""
    R = len(hosts)
    if requested:
        if R % requested:
            raise ValueError(
                f"jax_ep: Config.node_size={requested} does not divide the {R} ranks of the group"
            )
        for n in range(0, R, requested):
            if len(set(hosts[n : n + requested])) != 1:
                raise ValueError(
                    f"jax_ep: Config.node_size={requested} puts ranks {n}..{n + requested - 1} of "
                    f"hosts {sorted(set(hosts[n : n + requested]))} in one node; a node's ranks "
                    "must share a host (they write each other's memory over NVLink)"
                )
        return requested
    runs = [1]
    for a, b in zip(hosts, hosts[1:], strict=False):
        if a == b:
            runs[-1] += 1
        else:
            runs.append(1)
    if len(set(runs)) != 1 or len(runs) != len(set(hosts)):
        raise ValueError(
            f"jax_ep: the group's ranks sit on hosts {hosts}: every host must hold one "
            "contiguous run of ranks of the same length (order the mesh by host), or set "
            "Config.node_size"
        )
    return runs[0]


def heap_env(heap_bytes: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment NVSHMEM must see before init: heap size, no NVLink multicast, options."""
    env = {
        "NVSHMEM_SYMMETRIC_SIZE": str(int(heap_bytes) + _HEAP_MARGIN_BYTES),
        # multicast objects can take a shared host's GPUs down; our kernels do not use them
        "NVSHMEM_DISABLE_NVLS": "1",
    }
    env.update(extra or {})
    return env


def initialize(heap_bytes: int, extra_env: dict[str, str] | None = None) -> None:
    """Initialises NVSHMEM in this process (once) with a heap for ``heap_bytes`` of buffers."""
    if _state:
        if heap_bytes > _state["heap_bytes"]:
            raise ValueError(
                f"jax_ep: the NVSHMEM heap was sized for {_state['heap_bytes']} bytes of buffers "
                f"when NVSHMEM started, and this group needs {heap_bytes}; the heap cannot grow, "
                "so create the largest group first (or close groups to reuse their space)"
            )
        return
    reason = missing_reason()
    if reason:
        raise RuntimeError(f"jax_ep: Config(transport='nvshmem') needs NVSHMEM: {reason}")
    import nvshmem.core as nvshmem
    from cuda.core import Device

    gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    if len(gpus) != 1:
        raise ValueError(
            f"jax_ep: the NVSHMEM transport runs one process per GPU, but this process has "
            f"{len(gpus)} local GPUs (start one process per GPU, e.g. python -m jax_ep.launch)"
        )
    for key, value in heap_env(heap_bytes, extra_env).items():
        os.environ[key] = value
    device = Device(gpus[0].local_hardware_id)
    device.set_current()

    def make_uid() -> bytes:
        return _uid_bytes(nvshmem.get_unique_id())

    raw = share_unique_id(make_uid)
    uid = nvshmem.get_unique_id(empty=True)
    _uid_view(uid)[:] = np.frombuffer(raw, np.uint8)
    nvshmem.init(
        device=device,
        uid=uid,
        rank=jax.process_index(),
        nranks=jax.process_count(),
        initializer_method="uid",
    )
    _state.update(heap_bytes=heap_bytes, nvshmem=nvshmem, device=device, buffers=[])
    atexit.register(finalize)


def _uid_view(uid) -> np.ndarray:
    return uid._data.view(np.uint8)


def _uid_bytes(uid) -> bytes:
    return _uid_view(uid).tobytes()


def allocate(nbytes: int, peer_pes: list[int], near: list[bool]) -> tuple[int, list[int]]:
    """Collective: a symmetric buffer of ``nbytes``; returns (own pointer, pointer of
    each PE in ``peer_pes`` as this GPU maps it, 0 where ``near`` is False: ranks of
    other nodes are reached with NVSHMEM puts, never through a pointer)."""
    nvshmem = _state["nvshmem"]
    buf = nvshmem.buffer(nbytes)
    _state["buffers"].append(buf)
    ptrs = []
    for pe, is_near in zip(peer_pes, near, strict=True):
        if not is_near:
            ptrs.append(0)
            continue
        try:
            peer = nvshmem.get_peer_buffer(buf, pe)
        except Exception as e:  # nvshmem4py raises its own error types
            raise RuntimeError(_unmapped_message(pe, e)) from e
        if peer is None or not int(peer.handle):
            raise RuntimeError(_unmapped_message(pe, "no peer mapping"))
        ptrs.append(int(peer.handle))
    return int(buf.handle), ptrs


def _unmapped_message(pe: int, why) -> str:
    return (
        f"jax_ep: NVSHMEM PE {pe} is in the node of process {jax.process_index()} but its "
        f"memory cannot be mapped here ({why}): the ranks of a node must share a host with "
        "NVLink (or PCIe) peer access"
    )


def release(ptr: int) -> None:
    """Collective: frees a buffer from :func:`allocate`."""
    for buf in list(_state.get("buffers", [])):
        if int(buf.handle) == ptr:
            _state["buffers"].remove(buf)
            _state["nvshmem"].free(buf)
            return


def finalize() -> None:
    """Frees what is left and finalises NVSHMEM (also registered to run at exit)."""
    if not _state:
        return
    nvshmem = _state["nvshmem"]
    for buf in _state["buffers"]:
        nvshmem.free(buf)
    nvshmem.finalize()
    _state.clear()
