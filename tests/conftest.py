"""Test setup shared by every test file; all skip decisions live here, each with its reason.

* CPU: 8 virtual devices (``--xla_force_host_platform_device_count=8``), so the
  reference backend runs under ``shard_map`` with EP sizes 1/2/4/8.
* GPU: the CUDA backend, on one GPU through loopback (virtual ranks under
  ``jax.vmap``) and under ``shard_map`` over however many GPUs there are.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Tests share the GPU with communication buffers and sometimes other processes.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
for var, value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
):
    os.environ.setdefault(var, value)  # never NVLink multicast on shared hosts

import jax  # noqa: E402
import pytest  # noqa: E402

from jax_ep.backends.cuda import extension  # noqa: E402


def gpu_count() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


HAS_GPU = gpu_count() > 0
HAS_KERNELS = HAS_GPU and extension.extension() is not None
if not HAS_GPU:
    KERNEL_SKIP_REASON = (
        "no GPU: the CUDA kernels cannot run here (the reference backend is tested)"
    )
elif extension.extension() is None:
    KERNEL_SKIP_REASON = extension.missing_reason()
else:
    KERNEL_SKIP_REASON = ""


def _hopper_skip_reason() -> str:
    """Why the Hopper-only (sm_90 wgmma) kernels cannot run here ('' when they can)."""
    if not HAS_GPU:
        return "no GPU: the Mosaic GPU kernels need an sm_90 GPU"
    capability = str(getattr(jax.devices("gpu")[0], "compute_capability", ""))
    return (
        ""
        if capability.startswith("9")
        else f"the Mosaic GPU kernels need sm_90, not sm_{capability}"
    )


HOPPER_SKIP_REASON = _hopper_skip_reason()


def _tokamax_skip_reason() -> str:
    """Why the optional tokamax expert path cannot be tested here ('' when it can)."""
    from jax_ep.experts import tokamax_path

    if not HAS_GPU:
        return "no GPU: tokamax's kernels are Pallas Mosaic-GPU/Triton kernels"
    return tokamax_path.unsupported()


TOKAMAX_SKIP_REASON = _tokamax_skip_reason()

requires_kernels = pytest.mark.skipif(
    not HAS_KERNELS, reason=KERNEL_SKIP_REASON or "kernels present"
)
requires_gpus = pytest.mark.skipif(gpu_count() < 2, reason="needs at least 2 GPUs")
# multi-axis meshes of the default backend (on CPU: the 8 virtual devices above)
requires_8_devices = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices of the default backend for its meshes"
)


def cpu_devices():
    return jax.devices("cpu")
