"""Worker of test_multiprocess: key-value exchange between processes, and bounded waits
(also of the NVSHMEM unique id, which travels the same way)."""

import sys

from jax_ep.launch import initialize
from jax_ep.transports import kv_store, nvshmem_bootstrap

pid, count = initialize(timeout_s=60)
mode = sys.argv[1]
if mode == "exchange":
    kv_store.publish(f"test/blob{pid}", bytes([pid]) * 64)
    for other in range(count):
        got = kv_store.fetch(f"test/blob{other}", 60)
        assert got == bytes([other]) * 64, (other, got[:8])
    kv_store.barrier("test/done", 60)
    print(f"exchange OK {pid}/{count}")
elif mode == "missing":
    if pid == 0:
        try:
            kv_store.fetch("test/never-published", 2, what="a peer that never arrives")
        except TimeoutError as e:
            assert "never arrived" in str(e) and "process 0" in str(e), e
            print(f"timeout OK: {e}")
        else:
            raise SystemExit("fetch of a key nobody publishes returned")
elif mode == "uid":
    # process 0 makes the id (here: stand-in bytes), every process gets the same bytes
    uid = nvshmem_bootstrap.share_unique_id(lambda: bytes(range(128)), timeout_s=60)
    assert uid == bytes(range(128)), uid[:8]
    kv_store.barrier("test/uid-done", 60)
    print(f"uid OK {pid}/{count}")
elif mode == "uid-missing":
    if pid == 1:  # process 0 never creates the id: a clear, bounded error
        try:
            nvshmem_bootstrap.share_unique_id(lambda: b"", timeout_s=2)
        except TimeoutError as e:
            assert "NVSHMEM unique id" in str(e) and "process 1" in str(e), e
            print(f"uid timeout OK: {e}")
        else:
            raise SystemExit("fetch of an id nobody publishes returned")
    kv_store.barrier("test/uid-missing-done", 60)  # process 0 (the coordinator) stays up
