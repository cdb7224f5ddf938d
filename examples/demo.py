"""jax_ep in one screen: dispatch tokens to experts, run the experts, combine, check, time.

Runs on whatever JAX sees: every local GPU as one EP group (CUDA kernels), or 8
virtual CPU devices (reference backend) when there is no GPU. With one GPU it
also runs 4 virtual EP ranks on it (loopback), the way the tests exercise the
kernels' cross-rank protocol on a single device.

    python examples/demo.py [--tokens 512] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import os
import time

if "--cpu" in os.sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402


def moe_layer(x, topk_idx, topk_weights, w_up, *, group):
    """One MoE layer on one EP rank: experts are per-expert linear maps ``[E_loc, H, H]``."""
    out = jax_ep.dispatch(x, topk_idx, topk_weights, group=group, layout="ragged")
    y = jax.lax.ragged_dot(out.x, w_up, out.counts)  # rows grouped by local expert
    return jax_ep.combine(y.astype(x.dtype), out.handle, group=group)


def run(mesh, loopback, args):
    R = loopback or mesh.shape["ep"]
    E, K, T, H = args.experts, args.topk, args.tokens, args.hidden
    group = jax_ep.Group(
        mesh,
        "ep",
        num_experts=E,
        num_topk=K,
        hidden=H,
        num_max_tokens_per_rank=T,
        loopback=loopback,
    )
    ref = jax_ep.Group(
        mesh,
        "ep",
        num_experts=E,
        num_topk=K,
        hidden=H,
        num_max_tokens_per_rank=T,
        loopback=loopback,
        backend="reference",
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    scores = rng.random((R, T, E))
    idx = np.argsort(-scores, axis=-1)[..., :K].astype(np.int32)
    w = rng.random((R, T, K)).astype(np.float32)
    w_up = (rng.standard_normal((R, E // R, H, H)) / np.sqrt(H)).astype(jnp.bfloat16)

    def build(g):
        f = lambda x, i, w, u: moe_layer(x, i, w, u, group=g)  # noqa: E731
        if loopback:
            return jax.jit(jax.vmap(f, axis_name="ep"))
        sharded = jax.shard_map(
            lambda *a: f(*[v[0] for v in a])[None], mesh=mesh, in_specs=P("ep"), out_specs=P("ep")
        )
        return jax.jit(sharded)

    if loopback:
        args_dev = [jax.device_put(a, mesh.devices.flat[0]) for a in (x, idx, w, w_up)]
    else:
        args_dev = [jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in (x, idx, w, w_up)]
    fast, slow = build(group), build(ref)
    got, want = np.asarray(fast(*args_dev), np.float32), np.asarray(slow(*args_dev), np.float32)
    err = np.abs(got - want).max() / np.abs(want).max()
    times = {}
    for name, f in (("jax_ep", fast), ("reference", slow)):
        jax.block_until_ready(f(*args_dev))
        t0 = time.perf_counter()
        for _ in range(10):
            out = f(*args_dev)
        jax.block_until_ready(out)
        times[name] = (time.perf_counter() - t0) / 10 * 1e3
    where = (
        f"{R} virtual ranks on one {jax.devices()[0].device_kind}"
        if loopback
        else f"{R} x {mesh.devices.flat[0].device_kind}"
    )
    print(f"{where}: backend={group.backend}, {T} tokens/rank, hidden {H}, top-{K} of {E} experts")
    print(
        f"  MoE layer (dispatch + ragged_dot + combine): jax_ep {times['jax_ep']:.2f} ms, "
        f"reference {times['reference']:.2f} ms per step; max relative difference {err:.2e}"
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--cpu", action="store_true", help="force the CPU (reference backend)")
    args = p.parse_args()
    devices = jax.devices()
    n = len(devices) if devices[0].platform == "gpu" else 8
    run(Mesh(np.array(devices[:n]), ("ep",)), None, args)
    if devices[0].platform == "gpu" and len(devices) == 1:
        run(Mesh(np.array(devices[:1]), ("ep",)), 4, args)


if __name__ == "__main__":
    main()
