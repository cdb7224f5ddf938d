"""Start N local processes of one ``jax.distributed`` job, like ``torchrun`` on one host.

    python -m jax_ep.launch -n 2 train.py --steps 100
    python -m jax_ep.launch -n 2 --share-gpu test_script.py   # both processes on GPU 0
    python -m jax_ep.launch -n 8 -m jax_ep.bench --transport nvshmem   # a module, like python -m

Each process gets ``JAX_EP_COORDINATOR``, ``JAX_EP_NUM_PROCESSES`` and
``JAX_EP_PROCESS_ID`` and (unless ``--share-gpu``) its own GPU through
``CUDA_VISIBLE_DEVICES``; the script calls :func:`initialize`. NVLink multicast
stays off (``NCCL_NVLS_ENABLE=0``, ``NVSHMEM_DISABLE_NVLS=1``). When one process
fails the others are stopped; the exit code is the first failure's. On a real
cluster, use your scheduler instead (SLURM sets what ``jax.distributed.initialize()``
needs) and call ``jax.distributed.initialize()`` directly.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

ENV_COORDINATOR = "JAX_EP_COORDINATOR"
ENV_NUM_PROCESSES = "JAX_EP_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_EP_PROCESS_ID"
_NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}


def initialize(timeout_s: int = 300) -> tuple[int, int]:
    """``jax.distributed.initialize`` from the launcher's environment; returns (process id, count).

    Outside the launcher (no ``JAX_EP_*`` variables) it calls ``jax.distributed.initialize()``
    with no arguments, which reads SLURM/Open MPI environments.
    """
    import jax

    if ENV_COORDINATOR not in os.environ:
        jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(
            coordinator_address=os.environ[ENV_COORDINATOR],
            num_processes=int(os.environ[ENV_NUM_PROCESSES]),
            process_id=int(os.environ[ENV_PROCESS_ID]),
            initialization_timeout=timeout_s,
        )
    return jax.process_index(), jax.process_count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g for g in env.split(",") if g]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]
    except (OSError, subprocess.TimeoutExpired):
        return []


def _pump(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def launch(
    num_processes: int,
    command: list[str],
    *,
    share_gpu: bool = False,
    timeout_s: float | None = None,
    extra_env: dict | None = None,
) -> int:
    """Runs ``command`` in ``num_processes`` processes; returns the job's exit code."""
    port = _free_port()
    gpus = _visible_gpus()
    procs = []
    for i in range(num_processes):
        env = dict(os.environ, **_NO_MULTICAST, **(extra_env or {}))
        env.update(
            {
                ENV_COORDINATOR: f"127.0.0.1:{port}",
                ENV_NUM_PROCESSES: str(num_processes),
                ENV_PROCESS_ID: str(i),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[0] if share_gpu else gpus[i % len(gpus)]
        procs.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    pumps = [
        threading.Thread(target=_pump, args=(p, f"[{i}] "), daemon=True)
        for i, p in enumerate(procs)
    ]
    for t in pumps:
        t.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    code = 0
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.poll() not in (None, 0)]
        if failed or (deadline is not None and time.monotonic() > deadline):
            code = failed[0] if failed else 124
            if not failed:
                print(f"jax_ep.launch: job exceeded {timeout_s} s; stopping it", flush=True)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            break
        time.sleep(0.1)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for t in pumps:
        t.join(timeout=5)
    return code or next((p.returncode for p in procs if p.returncode), 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jax_ep.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-n", "--num-processes", type=int, required=True)
    p.add_argument("--share-gpu", action="store_true", help="all processes on the first GPU")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the job is stopped")
    p.add_argument("-m", dest="module", action="store_true", help="run `script` as a module")
    p.add_argument("script", help="the script (or, with -m, the module) every process runs")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    return launch(
        a.num_processes,
        [sys.executable, *(["-m"] if a.module else []), a.script, *a.args],
        share_gpu=a.share_gpu,
        timeout_s=a.timeout,
    )


if __name__ == "__main__":
    raise SystemExit(main())
