"""jax_ep in one screen: dispatch tokens to experts, run the experts, combine, check, time.

One MoE layer per EP rank (``dispatch`` → ``jax.lax.ragged_dot`` over the local experts →
``combine``), checked against the same layer written with plain JAX collectives
(:mod:`jax_ep.baselines`, the path a user would otherwise write), then timed.

* NVIDIA GPUs with the CUDA extension: every local GPU is one EP rank; columns: jax_ep's
  CUDA kernels, jax_ep's pure-JAX reference backend, the plain-JAX baseline
  (``ragged_all_to_all``). With one GPU it also runs 4 virtual EP ranks on it (loopback),
  the way the tests exercise the kernels' cross-rank protocol on one device.
* CPU (no GPU): 8 virtual CPU devices; jax_ep runs its reference backend (the CUDA kernels
  would replace it on a GPU); columns: that reference backend and the baseline. Small shapes
  and a few steps, so it finishes in seconds.

    python examples/demo.py [--tokens N] [--hidden H] [--steps S] [--cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--cpu" in sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"
# 8 virtual CPU devices when running on CPU (only affects the host platform); before jax starts
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep import baselines  # noqa: E402

# (tokens per rank, hidden, experts, top-k, timed steps): GPU sizes show the kernels' speed;
# CPU sizes only show that everything runs and agrees (the reference is not fast on CPU)
GPU_DEFAULTS = dict(tokens=512, hidden=1024, experts=32, topk=4, steps=20)
CPU_DEFAULTS = dict(tokens=32, hidden=128, experts=16, topk=2, steps=3)


def jax_ep_layer(x, topk_idx, topk_weights, w_up, *, group):
    """One MoE layer on one EP rank: experts are per-expert linear maps ``[E_loc, H, H]``."""
    out = jax_ep.dispatch(x, topk_idx, topk_weights, group=group, layout="ragged")
    y = jax.lax.ragged_dot(out.x, w_up, out.counts)  # rows grouped by local expert
    return jax_ep.combine(y.astype(x.dtype), out.handle, group=group)


def baseline_layer(x, topk_idx, topk_weights, w_up, *, num_experts, emulate):
    """The same layer with plain JAX collectives (MaxText's sparse EP path)."""
    d = baselines.ragged_all_to_all_dispatch(
        x, topk_idx, axis_name="ep", num_experts=num_experts, emulate=emulate
    )
    y = jax.lax.ragged_dot(d.x, w_up, d.group_sizes).astype(x.dtype)
    return baselines.ragged_all_to_all_combine(
        y, topk_weights, d.state, axis_name="ep", emulate=emulate
    )


def _time_ms(f, args, steps: int, repeats: int = 5) -> float:
    """ms per step: the median over ``repeats`` runs of ``steps`` back-to-back steps."""
    jax.block_until_ready(f(*args))  # compiled and warm
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = f(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / steps * 1e3)
    return float(np.median(samples))


def run(mesh, loopback, args, on_gpu: bool):
    R = loopback or mesh.shape["ep"]
    E, K, T, H = args.experts, args.topk, args.tokens, args.hidden
    sizes = dict(num_experts=E, num_topk=K, hidden=H, num_max_tokens_per_rank=T)
    group = jax_ep.Group(mesh, "ep", loopback=loopback, **sizes)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    idx = np.argsort(-rng.random((R, T, E)), axis=-1)[..., :K].astype(np.int32)
    w = rng.random((R, T, K)).astype(np.float32)
    w_up = (rng.standard_normal((R, E // R, H, H)) / np.sqrt(H)).astype(jnp.bfloat16)

    def build(f):
        if loopback:
            return jax.jit(jax.vmap(f, axis_name="ep"))
        sharded = jax.shard_map(
            lambda *a: f(*[v[0] for v in a])[None], mesh=mesh, in_specs=P("ep"), out_specs=P("ep")
        )
        return jax.jit(sharded)

    if loopback:
        inputs = [jax.device_put(a, mesh.devices.flat[0]) for a in (x, idx, w, w_up)]
    else:
        inputs = [jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in (x, idx, w, w_up)]

    # what is compared: column name -> per-rank layer
    layers = {}
    if group.backend == "cuda":
        layers["jax_ep CUDA kernels"] = lambda *a: jax_ep_layer(*a, group=group)
        # the reference timed as plain JAX, without its host-side expert-id check (a host
        # callback per step; the kernels check ids on the device)
        ref = jax_ep.Group(
            mesh,
            "ep",
            loopback=loopback,
            backend="reference",
            config=jax_ep.Config(host_checks=False),
            **sizes,
        )
        layers["jax_ep reference backend"] = lambda *a: jax_ep_layer(*a, group=ref)
    else:
        layers["jax_ep (reference backend)"] = lambda *a: jax_ep_layer(*a, group=group)
    if not loopback:  # the baseline's collectives need a real mesh axis
        name = "plain JAX ragged_all_to_all" + ("" if on_gpu else " (emulated: XLA:CPU lacks it)")
        layers[name] = lambda *a: baseline_layer(*a, num_experts=E, emulate=not on_gpu)
    fns = {name: build(f) for name, f in layers.items()}

    outs = {name: np.asarray(f(*inputs), np.float32) for name, f in fns.items()}
    first = next(iter(outs.values()))
    err = max(np.abs(o - first).max() for o in outs.values()) / np.abs(first).max()
    times = {name: _time_ms(f, inputs, args.steps) for name, f in fns.items()}

    kind = mesh.devices.flat[0].device_kind
    where = f"{R} virtual EP ranks on one {kind}" if loopback else f"{R} EP ranks ({R} x {kind})"
    print(f"{where}; jax_ep backend: {group.backend}")
    print(f"  MoE layer: {T} tokens/rank, hidden {H}, top-{K} of {E} experts ({E // R} per rank)")
    print(f"  dispatch + ragged_dot + combine, ms per step (median of 5 runs of {args.steps}):")
    for name, ms in times.items():
        print(f"    {name:<58} {ms:9.2f}")
    print(f"  max relative difference between them (bf16 outputs): {err:.1e}")
    if not on_gpu:
        print("  (CPU: jax_ep runs its pure-JAX reference here; on an NVIDIA GPU with the CUDA")
        print("   extension built, its kernels replace the reference, and this compares them.)")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per column")
    p.add_argument("--cpu", action="store_true", help="force the CPU (reference backend)")
    args = p.parse_args(argv)
    devices = jax.devices()
    on_gpu = devices[0].platform == "gpu"
    for k, v in (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    n = len(devices) if on_gpu else min(8, len(devices))
    run(Mesh(np.array(devices[:n]), ("ep",)), None, args, on_gpu)
    if on_gpu and len(devices) == 1:
        run(Mesh(np.array(devices[:1]), ("ep",)), 4, args, on_gpu)
    print(
        "Next: python -m jax_ep (what this install runs on), then "
        'pip install -e ".[examples]" && python examples/train_moe.py --steps 50'
    )


if __name__ == "__main__":
    main()
