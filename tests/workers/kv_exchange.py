"""Worker of test_multiprocess: key-value exchange between processes, and a bounded wait."""

import sys

from jax_ep import distributed
from jax_ep.launch import initialize

pid, count = initialize(timeout_s=60)
mode = sys.argv[1]
if mode == "exchange":
    distributed.publish(f"test/blob{pid}", bytes([pid]) * 64)
    for other in range(count):
        got = distributed.fetch(f"test/blob{other}", 60)
        assert got == bytes([other]) * 64, (other, got[:8])
    distributed.barrier("test/done", 60)
    print(f"exchange OK {pid}/{count}")
elif mode == "missing":
    if pid == 0:
        try:
            distributed.fetch("test/never-published", 2, what="a peer that never arrives")
        except TimeoutError as e:
            assert "never arrived" in str(e) and "process 0" in str(e), e
            print(f"timeout OK: {e}")
        else:
            raise SystemExit("fetch of a key nobody publishes returned")
