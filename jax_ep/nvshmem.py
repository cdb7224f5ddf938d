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
* peers: each rank's buffer as this GPU maps it (``nvshmem_ptr``), so the kernels
  reach peers on the same host over NVLink as with CUDA IPC. Peers on other hosts
  need the RDMA (IBGDA) kernels, which are not built yet: such a group is refused
  with a message saying so.
* traffic options: ``Config.nvshmem_env`` (e.g. ``NVSHMEM_IB_SL``,
  ``NVSHMEM_IB_TRAFFIC_CLASS``) is exported before init.
* finalisation at interpreter exit, after the buffers are freed.

nvshmem4py is an optional dependency: ``pip install nvshmem4py-cu13`` (or ``-cu12``).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable

import jax
import numpy as np

from jax_ep import distributed

_UID_KEY = "nvshmem/uid"
_UID_TIMEOUT_S = 300.0
# NVSHMEM keeps its own bookkeeping in the heap: room on top of the buffers.
_HEAP_MARGIN_BYTES = 64 << 20

_state: dict = {}


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
        distributed.publish(_UID_KEY, uid)
        return uid
    return distributed.fetch(_UID_KEY, timeout_s, what="NVSHMEM unique id from process 0")


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


def allocate(nbytes: int, peer_pes: list[int]) -> tuple[int, list[int]]:
    """Collective: a symmetric buffer of ``nbytes``; returns (own pointer, pointer of
    each PE in ``peer_pes`` as this GPU maps it)."""
    nvshmem = _state["nvshmem"]
    buf = nvshmem.buffer(nbytes)
    _state["buffers"].append(buf)
    ptrs = []
    for pe in peer_pes:
        try:
            peer = nvshmem.get_peer_buffer(buf, pe)
        except Exception as e:  # nvshmem4py raises its own error types
            raise NotImplementedError(_remote_message(pe, e)) from e
        if peer is None or not int(peer.handle):
            raise NotImplementedError(_remote_message(pe, "no peer mapping"))
        ptrs.append(int(peer.handle))
    return int(buf.handle), ptrs


def _remote_message(pe: int, why) -> str:
    return (
        f"jax_ep: NVSHMEM PE {pe} is not reachable with loads/stores from process "
        f"{jax.process_index()} ({why}): it is on another host, and the RDMA (IBGDA) kernels "
        "for ranks on other hosts are not built yet"
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
