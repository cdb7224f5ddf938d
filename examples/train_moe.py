"""Train a small MoE transformer language model with expert parallelism (jax_ep.flax.MoE).

The data is a synthetic grammar: a random Markov chain over ``--vocab`` tokens in which every
token has exactly two equally likely successors. A model that learns it reaches the entropy
floor ln 2 = 0.693 nats/token; a model that knows nothing stays at ln(vocab).

By default every device holds 1/R of the experts (the EP mesh axis "ep" spans all devices)
and 1/R of the batch. ``--mesh data=2,ep=4`` lays the devices out on several axes: the experts
are split over ``--ep-axes`` (default ``ep``; ``--ep-axes pod,ep`` spans two axes) and
replicated over the others, the batch is split over every axis but ``tensor`` (the model has no
tensor-parallel layers: a ``tensor`` axis holds replicas, as the activations entering a MoE
layer are under tensor parallelism). Runs on CPU with 8 virtual devices when there is no
accelerator, on the local GPUs when there are (then jax_ep's CUDA backend is used where it is
built).

    python examples/train_moe.py                          # jax_ep (reference backend on CPU)
    python examples/train_moe.py --mesh data=2,ep=4       # data parallel x expert parallel
    python examples/train_moe.py --mesh fsdp=2,ep=2,tensor=2
    python examples/train_moe.py --mesh pod=2,ep=4 --ep-axes pod,ep
    python examples/train_moe.py --backend ragged_all_to_all --steps 200
    python examples/train_moe.py --fp8                    # FP8 dispatch

Prints the loss (it falls), tokens/s, and the share of step time spent in dispatch/combine,
measured by timing the same jitted train step with the token exchange replaced by local
copies of the same shapes (same routing, same expert FLOPs, no communication).
"""

from __future__ import annotations

import os

# 8 virtual CPU devices when running on CPU (the flag only affects the host platform);
# must be set before jax initialises.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep.flax import MoE  # noqa: E402
from jax_ep.flax.exchange import Exchange, ExpertRows  # noqa: E402

REPLICA_AXES = ("tensor",)  # mesh axes the batch is not split over (no tensor-parallel layers)


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab: int = 64
    hidden: int = 128
    heads: int = 4
    layers: int = 2
    experts: int = 8
    topk: int = 2
    expert_hidden: int = 128
    shared_hidden: int = 0
    max_len: int = 64
    aux_loss_coef: float = 0.01
    fp8: bool = False
    tied_head: bool = True
    expert_path: str = "auto"  # jax_ep.experts: "auto" picks the platform's measured best
    # expert rows = factor x the balanced load (jax_ep.capacity); None never drops
    capacity_factor: float | None = jax_ep.capacity.DEFAULT_CAPACITY_FACTOR


class KVCache(nnx.Variable):
    """Per-layer key/value cache for decoding."""


class Block(nnx.Module):
    """Pre-norm block: causal self-attention, then a routed MoE FFN."""

    def __init__(
        self,
        cfg: ModelConfig,
        group: jax_ep.Group,
        impl: Any,
        rngs: nnx.Rngs,
        low_latency_group: jax_ep.Group | None,
    ):
        d = cfg.hidden
        self.heads = cfg.heads
        self.norm1 = nnx.RMSNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.norm2 = nnx.RMSNorm(d, rngs=rngs)
        self.moe = MoE(
            d,
            cfg.expert_hidden,
            cfg.experts,
            cfg.topk,
            group=group,
            rngs=rngs,
            impl=impl,
            aux_loss_coef=cfg.aux_loss_coef,
            fp8=cfg.fp8,
            shared_intermediate=cfg.shared_hidden,
            low_latency_group=low_latency_group,
            expert_path=cfg.expert_path,
            capacity_factor=cfg.capacity_factor,
        )

    def __call__(self, x, cache=None, pos=None, low_latency=False):
        """``x`` ``[B, S, D]``; with ``cache`` (``(k, v)`` ``[B, L, heads, dh]``) the S new
        positions start at ``pos`` and attend to the cache. Returns (x, aux loss, cache)."""
        b, s, d = x.shape
        dh = d // self.heads
        q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, s, 3 * self.heads, dh), 3, axis=2)
        if cache is None:
            keys, values, offset = k, v, 0
        else:
            keys = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), pos, 1)
            values = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), pos, 1)
            cache, offset = (keys, values), pos
        logits = jnp.einsum("bshd,blhd->bhsl", q, keys) / math.sqrt(dh)
        visible = jnp.arange(keys.shape[1])[None, :] <= (offset + jnp.arange(s))[:, None]
        attn = jax.nn.softmax(jnp.where(visible, logits, -1e30), axis=-1)
        x = x + self.out(jnp.einsum("bhsl,blhd->bshd", attn, values).reshape(b, s, d))
        y, aux = self.moe(self.norm2(x), return_aux=True, low_latency=low_latency)
        return x + y, aux.aux_loss, cache


class MoELM(nnx.Module):
    """Embedding, ``layers`` attention + MoE blocks, final norm, tied or untied LM head."""

    def __init__(
        self,
        cfg: ModelConfig,
        group: jax_ep.Group,
        *,
        impl: Any = "jax_ep",
        rngs: nnx.Rngs,
        low_latency_group: jax_ep.Group | None = None,
    ):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab, cfg.hidden, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.max_len, cfg.hidden)))
        self.blocks = nnx.List(
            [Block(cfg, group, impl, rngs, low_latency_group) for _ in range(cfg.layers)]
        )
        self.norm = nnx.RMSNorm(cfg.hidden, rngs=rngs)
        self.head = (
            None if cfg.tied_head else nnx.Linear(cfg.hidden, cfg.vocab, use_bias=False, rngs=rngs)
        )

    def __call__(self, tokens, caches=None, pos=None, low_latency=False):
        """``tokens`` ``[B, S]`` int32 → (logits ``[B, S, V]`` float32, aux loss, caches)."""
        s = tokens.shape[1]
        start = 0 if pos is None else pos
        # the lookup says where its output lives: under explicit sharding a gather from a
        # replicated table with batch-sharded ids is otherwise ambiguous
        out_spec = P(*jax.typeof(tokens).sharding.spec, None)
        x = self.embed.embedding[...].at[tokens].get(out_sharding=out_spec)
        x = x + jax.lax.dynamic_slice_in_dim(self.pos[...], start, s)[None]
        aux_total = jnp.float32(0.0)
        new_caches = []
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x, aux, cache = block(x, cache, pos, low_latency)
            aux_total = aux_total + aux
            new_caches.append(cache)
        x = self.norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        return logits.astype(jnp.float32), aux_total, new_caches


# ----------------------------------------------------------------------------
# data: a two-successor Markov grammar
# ----------------------------------------------------------------------------


class Grammar:
    """Each token has two successors, each taken with probability 1/2 (entropy ln 2)."""

    def __init__(self, vocab: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.successors = np.stack([rng.choice(vocab, 2, replace=False) for _ in range(vocab)])
        self.rng = np.random.default_rng(seed + 1)

    def sample(self, batch: int, length: int) -> np.ndarray:
        seq = np.empty((batch, length), np.int32)
        seq[:, 0] = self.rng.integers(0, self.vocab, batch)
        for i in range(1, length):
            choice = self.rng.integers(0, 2, batch)
            seq[:, i] = self.successors[seq[:, i - 1], choice]
        return seq

    def valid_fraction(self, seq: np.ndarray) -> float:
        """Share of transitions in ``seq`` ``[B, L]`` that the grammar allows."""
        prev, nxt = seq[:, :-1], seq[:, 1:]
        ok = (self.successors[prev] == nxt[..., None]).any(-1)
        return float(ok.mean())


# ----------------------------------------------------------------------------
# a no-communication stand-in for timing
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalCopyExchange(Exchange):
    """Dispatch/combine replaced by local copies of the same shapes (timing only: wrong math).

    The experts get the buffer shape of the jax_ep ragged dispatch at the default capacity
    (:func:`jax_ep.capacity.dispatch_capacity`) with ``T*K`` valid rows (the average a rank
    receives), so routing and expert FLOPs match the real step; combine is a weighted sum over
    the first ``T*K`` rows.
    """

    axis_name: Any
    num_experts: int
    name = "local_copy"

    def dispatch(self, x, topk_idx, topk_weights):
        num_ranks = jax.lax.axis_size(self.axis_name)
        e_loc = self.num_experts // num_ranks
        num_tokens, k = topk_idx.shape
        rows = jax_ep.capacity.dispatch_capacity(
            "ragged",
            num_ranks=num_ranks,
            num_tokens=num_tokens,
            num_topk=k,
            num_experts=self.num_experts,
        )
        valid = min(num_tokens * k, rows)
        sizes = jnp.full((e_loc,), valid // e_loc, jnp.int32).at[-1].add(valid % e_loc)
        x_rows = jnp.tile(x, (-(-rows // num_tokens), 1))[:rows]
        return ExpertRows(x_rows, sizes, jnp.int32(0), None)

    def combine(self, y, topk_weights, rows):
        num_tokens, k = topk_weights.shape
        y = y[: num_tokens * k].reshape(k, num_tokens, -1).astype(jnp.float32)
        return jnp.einsum("tk,ktd->td", topk_weights, y).astype(y.dtype)


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """The device mesh, the EP axis (one name or a tuple) and the axes the batch is split over."""

    mesh: jax.sharding.Mesh
    ep: str | tuple[str, ...]
    batch_axes: tuple[str, ...]

    @property
    def batch_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    @property
    def ep_size(self) -> int:
        names = (self.ep,) if isinstance(self.ep, str) else self.ep
        return math.prod(self.mesh.shape[a] for a in names)

    def per_shard(self, batch: int) -> int:
        """Sequences per batch shard (``batch`` must split evenly)."""
        if batch % self.batch_shards:
            raise SystemExit(f"--batch {batch} must be divisible by the {self.batch_shards} shards")
        return batch // self.batch_shards

    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.batch_axes))

    def describe(self) -> str:
        axes = " x ".join(f"{n}={s}" for n, s in self.mesh.shape.items())
        return f"mesh {axes} | experts over {self.ep} | batch over {'x'.join(self.batch_axes)}"


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,ep=4"`` → ``{"data": 2, "ep": 4}`` (mesh axes in order)."""
    axes = {}
    for part in spec.split(","):
        name, eq, size = part.partition("=")
        if not eq or not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise SystemExit(f"--mesh takes name=size pairs like data=2,ep=4; got {spec!r}")
        if name.strip() in axes:
            raise SystemExit(f"--mesh names the axis {name.strip()!r} twice: {spec!r}")
        axes[name.strip()] = int(size)
    return axes


def make_layout(args: argparse.Namespace) -> Layout:
    """The :class:`Layout` of ``--mesh``/``--ep-axes`` (or ``--devices`` on one ``ep`` axis)."""
    if args.mesh:
        axes = parse_mesh(args.mesh)
    else:
        axes = {"ep": args.devices or len(jax.devices())}
    need = math.prod(axes.values())
    if need > len(jax.devices()):
        raise SystemExit(f"the mesh {axes} needs {need} devices, there are {len(jax.devices())}")
    mesh = jax.make_mesh(tuple(axes.values()), tuple(axes), devices=jax.devices()[:need])
    ep = tuple(a.strip() for a in args.ep_axes.split(","))
    ep = ep[0] if len(ep) == 1 else ep
    batch = tuple(a for a in axes if a not in REPLICA_AXES)
    return Layout(mesh, ep, batch)


def make_group(
    layout: Layout, cfg: ModelConfig, tokens_per_rank: int, backend: str, low_latency: bool = False
) -> jax_ep.Group:
    jax_ep_backend = "reference" if backend == "reference" else "auto"
    return jax_ep.Group(
        layout.mesh,
        layout.ep,
        num_experts=cfg.experts,
        num_topk=cfg.topk,
        hidden=cfg.hidden,
        num_max_tokens_per_rank=tokens_per_rank,
        dtype=jnp.float32,  # the model's compute dtype: the buffers must hold float32 rows
        backend=jax_ep_backend,
        low_latency=low_latency,
    )


def impl_for(backend: str) -> str:
    return {
        "jax_ep": "jax_ep",
        "reference": "reference",
        "ragged_all_to_all": "ragged_all_to_all",
        "all_to_all": "all_to_all",
    }[backend]


def make_train_step():
    @nnx.jit
    def train_step(model: MoELM, optimizer: nnx.Optimizer, batch: jax.Array):
        def loss_fn(model):
            logits, aux, _ = model(batch[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
            return ce + aux, ce

        (_, ce), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return ce

    return train_step


def time_steps(runs, repeats: int) -> list[float]:
    """Median seconds per call of each ``(step, model, optimizer, batches)`` in ``runs``.

    Each step is called once first (compiles); then the steps take turns, so drifts in machine
    load hit all of them alike.
    """
    for step, model, optimizer, batches in runs:
        jax.block_until_ready(step(model, optimizer, batches[0]))
    times = [[] for _ in runs]
    for i in range(repeats):
        for j, (step, model, optimizer, batches) in enumerate(runs):
            t0 = time.perf_counter()
            jax.block_until_ready(step(model, optimizer, batches[i % len(batches)]))
            times[j].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """Options shared by this script and decode_moe.py: backend, model sizes, devices."""
    ap.add_argument(
        "--backend",
        default="jax_ep",
        choices=["jax_ep", "reference", "ragged_all_to_all", "all_to_all"],
    )
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--expert-hidden", type=int, default=128)
    ap.add_argument("--devices", type=int, default=None, help="EP ranks (default: all)")
    ap.add_argument(
        "--expert-path",
        default="auto",
        choices=["auto", *jax_ep.experts.PATHS],
        help="expert FFN implementation (jax_ep.experts; auto: the platform's best)",
    )
    ap.add_argument(
        "--mesh",
        default=None,
        help="device mesh as name=size pairs, e.g. data=2,ep=4 or fsdp=2,ep=2,tensor=2 "
        "(default: one 'ep' axis over --devices)",
    )
    ap.add_argument(
        "--ep-axes", default="ep", help="mesh axis (or comma-separated axes) of expert parallelism"
    )


def model_config(args: argparse.Namespace, **fields) -> ModelConfig:
    """The :class:`ModelConfig` of the :func:`add_model_args` options (plus ``fields``)."""
    return ModelConfig(
        vocab=args.vocab,
        hidden=args.hidden,
        layers=args.layers,
        experts=args.experts,
        topk=args.topk,
        expert_hidden=args.expert_hidden,
        fp8=args.fp8,
        expert_path=args.expert_path,
        **fields,
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32, help="global sequences per step")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--shared-hidden", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--fp8", action="store_true", help="FP8 dispatch (jax_ep/reference only)")
    ap.add_argument(
        "--timing-steps",
        type=int,
        default=15,
        help="steps timed (each way) for tokens/s and the dispatch/combine share (0: skip)",
    )
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)
    layout = make_layout(args)
    with jax.set_mesh(layout.mesh):  # explicit-sharding context for the model's own ops
        return run(args, layout)


def run(args: argparse.Namespace, layout: Layout) -> dict:
    mesh, per_shard = layout.mesh, layout.per_shard(args.batch)
    cfg = model_config(args, shared_hidden=args.shared_hidden, max_len=args.seq)
    group = make_group(layout, cfg, per_shard * args.seq, args.backend)
    model = MoELM(cfg, group, impl=impl_for(args.backend), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
    grammar = Grammar(cfg.vocab)
    data_sharding = layout.batch_sharding()

    def batch():
        return jax.device_put(grammar.sample(args.batch, args.seq + 1), data_sharding)

    print(
        f"devices: {mesh.size} x {jax.devices()[0].platform} | {layout.describe()} | "
        f"backend {args.backend} (exchange {model.blocks[0].moe.exchange.name}) | experts "
        f"{model.blocks[0].moe.expert_path} | fp8 {args.fp8}"
    )
    print(
        f"model: vocab {cfg.vocab}, hidden {cfg.hidden}, layers {cfg.layers}, experts "
        f"{cfg.experts} (top-{cfg.topk}, {cfg.experts // layout.ep_size} per device), batch "
        f"{args.batch} x {args.seq} tokens"
    )
    print(
        f"loss floor ln 2 = {math.log(2):.3f}, uniform guess ln {cfg.vocab} = "
        f"{math.log(cfg.vocab):.3f}"
    )
    train_step = make_train_step()
    t0 = time.perf_counter()
    losses = []
    for step in range(1, args.steps + 1):
        losses.append(float(train_step(model, optimizer, batch())))
        if step == 1:
            print(
                f"step    1  loss {losses[0]:.3f}  (compile + first step "
                f"{time.perf_counter() - t0:.1f} s)"
            )
        elif step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {np.mean(losses[-args.log_every :]):.3f}")
    train_s = time.perf_counter() - t0
    result = {
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-10:])),
        "train_seconds": train_s,
    }

    if args.timing_steps > 0:
        tokens = args.batch * args.seq
        batches = [batch() for _ in range(4)]
        # the same model and step with a no-communication exchange in every MoE layer
        local = MoELM(cfg, group, impl=LocalCopyExchange(layout.ep, cfg.experts), rngs=nnx.Rngs(0))
        local_opt = nnx.Optimizer(local, optax.adam(args.lr), wrt=nnx.Param)
        t_real, t_local = time_steps(
            [
                (train_step, model, optimizer, batches),
                (make_train_step(), local, local_opt, batches),
            ],
            args.timing_steps,
        )
        share = max(0.0, (t_real - t_local) / t_real)
        print(
            f"step time {t_real * 1e3:.1f} ms (median of {args.timing_steps}) -> "
            f"{tokens / t_real:,.0f} tokens/s"
        )
        print(
            f"dispatch/combine share of the step: {100 * share:.0f}% (the same jitted step "
            f"with dispatch/combine replaced by local copies of the same shapes took "
            f"{t_local * 1e3:.1f} ms)"
        )
        result.update(
            step_ms=t_real * 1e3,
            tokens_per_s=tokens / t_real,
            local_step_ms=t_local * 1e3,
            exchange_share=share,
        )
    return result


if __name__ == "__main__":
    main()
