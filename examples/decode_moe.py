"""Greedy decoding with a KV cache, the MoE layers on jax_ep's low-latency dispatch/combine.

The model is the one of ``train_moe.py`` (attention + MoE blocks, experts sharded over the
"ep" mesh axis, the batch of sequences over the same devices; ``--mesh data=2,ep=4`` and
``--ep-axes`` lay them out as there). The prompt is prefilled with the
high-throughput ops; every decode step then sends one token per sequence through
``jax_ep.low_latency_dispatch``/``low_latency_combine`` (expert-major fixed buffers, one jitted
step). ``--backend ragged_all_to_all`` / ``all_to_all`` decode with those baselines instead.

    python examples/decode_moe.py                    # trains briefly, then decodes
    python examples/decode_moe.py --train-steps 0    # random weights: latency only
    python examples/decode_moe.py --fp8
    python examples/decode_moe.py --mesh data=2,ep=4

Reports the per-step latency (p50/p90 after the compiling step), how far the low-latency
step's logits are from the high-throughput path's on the same cache, and the share of
generated transitions that the training grammar allows (about 1.0 once trained, about
2/vocab untrained).
"""

from __future__ import annotations

import os

# 8 virtual CPU devices when running on CPU (only affects the host platform); before jax.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from train_moe import (  # noqa: E402  (the script's own folder is on sys.path)
    Grammar,
    Layout,
    MoELM,
    add_model_args,
    impl_for,
    make_group,
    make_layout,
    make_train_step,
    model_config,
)

LOW_LATENCY_BACKENDS = ("jax_ep", "reference")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=64, help="sequences decoded together")
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument(
        "--train-steps",
        type=int,
        default=150,
        help="train on the grammar first (0: random weights)",
    )
    ap.add_argument("--fp8", action="store_true", help="FP8 low-latency dispatch")
    args = ap.parse_args(argv)
    layout = make_layout(args)
    with jax.set_mesh(layout.mesh):  # explicit-sharding context for the model's own ops
        return run(args, layout)


def run(args: argparse.Namespace, layout: Layout) -> dict:
    mesh, per_rank = layout.mesh, layout.per_shard(args.batch)
    use_ll = args.backend in LOW_LATENCY_BACKENDS
    if args.fp8 and not use_ll:
        raise SystemExit("--fp8 needs a jax_ep backend (the baselines have no FP8 wire)")
    max_len = args.prompt + args.new_tokens
    # decoding must not drop a token (the low-latency path never does), and a decode batch is
    # small enough that the high-throughput path's never-drop capacity costs nothing
    cfg = model_config(args, max_len=max_len, capacity_factor=None)
    group = make_group(layout, cfg, per_rank * max_len, args.backend)
    # the decode group's receive buffers hold [E_loc, R * per_rank, H]: one token per sequence
    ll_group = make_group(layout, cfg, per_rank, args.backend, low_latency=True) if use_ll else None
    model = MoELM(
        cfg, group, impl=impl_for(args.backend), rngs=nnx.Rngs(0), low_latency_group=ll_group
    )
    grammar = Grammar(cfg.vocab)
    sharding = layout.batch_sharding()
    print(
        f"devices: {mesh.size} x {jax.devices()[0].platform} | {layout.describe()} | "
        f"backend {args.backend} | "
        f"decode path: {'low-latency' if use_ll else 'high-throughput baseline'}"
        f"{' (fp8)' if args.fp8 else ''} | {args.batch} sequences, {per_rank} per batch shard"
    )

    if args.train_steps:
        optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
        step = make_train_step()
        t0 = time.perf_counter()
        for _ in range(args.train_steps):
            loss = step(model, optimizer, jax.device_put(grammar.sample(32, max_len + 1), sharding))
        print(
            f"trained {args.train_steps} steps in {time.perf_counter() - t0:.0f} s, "
            f"last loss {float(loss):.3f} (floor 0.693)"
        )

    heads, dh = cfg.heads, cfg.hidden // cfg.heads
    caches = [
        tuple(
            jax.device_put(jnp.zeros((args.batch, max_len, heads, dh)), sharding) for _ in range(2)
        )
        for _ in range(cfg.layers)
    ]
    prompt = jax.device_put(grammar.sample(args.batch, args.prompt), sharding)

    @nnx.jit
    def prefill(model, tokens, caches):
        logits, _, caches = model(tokens, caches, pos=0)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), caches

    @nnx.jit(static_argnames="low_latency")
    def decode_step(model, token, caches, pos, low_latency):
        logits, _, caches = model(token[:, None], caches, pos=pos, low_latency=low_latency)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), logits[:, -1], caches

    token, caches = prefill(model, prompt, caches)
    if use_ll:  # one step both ways on the same cache: the paths must agree
        pos = jnp.int32(args.prompt)
        _, ll_logits, _ = decode_step(model, token, caches, pos, True)
        _, ht_logits, _ = decode_step(model, token, caches, pos, False)
        diff = float(jnp.max(jnp.abs(ll_logits - ht_logits)))
        print(f"first step logits, low-latency vs high-throughput path: max |diff| {diff:.2e}")

    # compile the timed step outside the loop (its result is thrown away: caches are values)
    jax.block_until_ready(decode_step(model, token, caches, jnp.int32(args.prompt), use_ll))
    generated = [np.asarray(prompt), np.asarray(token)[:, None]]
    times = []
    for i in range(args.new_tokens - 1):
        pos = jnp.int32(args.prompt + i)
        t0 = time.perf_counter()
        token, _, caches = decode_step(model, token, caches, pos, use_ll)
        token.block_until_ready()
        times.append(time.perf_counter() - t0)
        generated.append(np.asarray(token)[:, None])
    seq = np.concatenate(generated, axis=1)
    steady = np.array(times) * 1e3
    valid = grammar.valid_fraction(seq[:, args.prompt - 1 :])
    print(
        f"decode step latency (jitted step, host wait included): p50 "
        f"{np.percentile(steady, 50):.2f} ms, p90 {np.percentile(steady, 90):.2f} ms over "
        f"{len(steady)} steps; {args.batch / np.median(steady) * 1e3:,.0f} tokens/s"
    )
    print(f"generated transitions allowed by the grammar: {100 * valid:.1f}%")
    print("sample:", " ".join(map(str, seq[0])))
    return {
        "p50_ms": float(np.percentile(steady, 50)),
        "p90_ms": float(np.percentile(steady, 90)),
        "valid_fraction": valid,
    }


if __name__ == "__main__":
    main()
