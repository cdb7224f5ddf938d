"""``python -m jax_ep``: what this install runs on, and why (the first thing to run after install).

pip hides the build's output unless ``-v``, so this is where a user learns whether the CUDA
kernels were built and will run: versions, devices, the backend a ``Group(backend="auto")``
picks here, and the reason when it is not the CUDA one.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import platform
import sys


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def report() -> dict:
    """The facts ``main`` prints, as a dict (``backend``, ``why``, versions, devices...)."""
    import jax
    import jaxlib

    import jax_ep
    from jax_ep.backends import default_backend
    from jax_ep.backends.cuda import extension

    devices = jax.devices()
    plugins = {
        d.metadata["Name"]: d.version
        for d in importlib.metadata.distributions()
        if d.metadata["Name"] and d.metadata["Name"].lower().startswith("jax-cuda")
    }
    ext = extension.extension()
    backend = default_backend(devices)
    on_gpu = all(d.platform == "gpu" for d in devices)
    if backend == "cuda":
        why = "NVIDIA GPUs visible to JAX and the CUDA extension loads"
    elif ext is None:
        why = extension.missing_reason()
    else:
        why = (
            f"JAX sees no NVIDIA GPU (devices are {devices[0].platform}); the CUDA extension "
            "is built and would run on one"
        )
    if not on_gpu and ext is None:
        why += f"; also, JAX sees no NVIDIA GPU (devices are {devices[0].platform})"
    # the NVSHMEM module sits beside the extension when the build found NVSHMEM's device library
    nvshmem_built = ext is not None and any(
        pathlib.Path(ext.__file__).parent.glob("_jax_ep_nvshmem*")
    )
    nvshmem_why = extension.nvshmem_missing_reason() if nvshmem_built else "not built"
    return dict(
        jax_ep=jax_ep.__version__,
        python=platform.python_version(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        cuda_plugins=plugins,
        devices=f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})",
        cuda_extension=ext is not None,
        nvshmem_module=nvshmem_built,
        nvshmem_why=nvshmem_why,
        backend=backend,
        why=why,
    )


def main() -> int:
    r = report()
    plugins = ", ".join(f"{k} {v}" for k, v in r["cuda_plugins"].items()) or "none"
    print(f"jax_ep {r['jax_ep']}  (python {r['python']}, jax {r['jax']}, jaxlib {r['jaxlib']})")
    print(f"  JAX CUDA plugin:   {plugins}")
    print(f"  devices:           {r['devices']}")
    print(f"  CUDA extension:    {'built' if r['cuda_extension'] else 'not built'}")
    nv = "built" if r["nvshmem_module"] else "not built"
    if r["nvshmem_module"] and r["nvshmem_why"]:
        nv += f", cannot run: {r['nvshmem_why']}"
    print(f"  NVSHMEM module:    {nv}  (groups spanning nodes)")
    print(f"  backend here:      {r['backend']}  ({r['why']})")
    if r["backend"] == "reference":
        print("  The reference backend is pure JAX (all_to_all): correct everywhere, not fast.")
        if not r["cuda_extension"]:
            print(
                "  On a GPU machine, reinstall with nvcc on PATH: pip install -v -e . "
                "(-v shows the build)"
            )
    print("Next: python examples/demo.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
