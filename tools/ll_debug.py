"""Bring-up aid: runs the low-latency halves one by one with synchronising handlers and
prints after each, so a hang or device error points at its kernel."""

import sys
import time

import jax
import numpy as np

sys.path.insert(0, "tests")
from harness import Runner, make_routing, make_tokens  # noqa: E402

import jax_ep  # noqa: E402

E, K, H, T_MAX = 16, 4, 256, 8
for routing, T in (("masked", 5), ("random", 5), ("masked", 8)):
    runner = Runner("cuda", 1, "shard_map", "gpu")
    g = runner.group(
        num_experts=E,
        num_topk=K,
        hidden=H,
        num_max_tokens_per_rank=T_MAX,
        low_latency=True,
        config=jax_ep.Config(sync_errors=True, timeout_s=5),
    )
    idx, w = make_routing(routing, 1, T, K, E, seed=1 + T)
    x = make_tokens(1, T, H)
    steps = [
        (
            "dispatch_send",
            lambda x, i, w: jax_ep.low_latency_dispatch_send(x, i, group=g, fp8=False),
        ),
        ("dispatch", lambda x, i, w: jax_ep.low_latency_dispatch(x, i, group=g, fp8=False).counts),
    ]
    for name, fn in steps:
        t0 = time.time()
        try:
            out = runner.run(fn, x, idx, w)
            print(
                f"{routing}-{T} {name}: ok {time.time() - t0:.1f}s",
                jax.tree.leaves(out)[0].ravel()[:8],
                flush=True,
            )
        except Exception as e:
            print(f"{routing}-{T} {name}: {type(e).__name__}: {str(e)[:400]}", flush=True)

    def both(x, i, w):
        out = jax_ep.low_latency_dispatch(x, i, group=g, fp8=False)
        return jax_ep.low_latency_combine(out.x, i, w, out.handle, group=g)

    t0 = time.time()
    try:
        out = runner.run(both, x, idx, w)
        print(
            f"{routing}-{T} both: ok {time.time() - t0:.1f}s",
            np.asarray(out).ravel()[:4],
            flush=True,
        )
    except Exception as e:
        print(f"{routing}-{T} both: {type(e).__name__}: {str(e)[:400]}", flush=True)
