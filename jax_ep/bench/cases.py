"""Benchmark cases: jax_ep's ops and the baselines on the same routing, same devices."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import baselines
from jax_ep.bench import check
from jax_ep.bench.profile import kernel_breakdown
from jax_ep.bench.timing import measure


@dataclasses.dataclass
class Setup:
    """Where the ranks live: ``shard_map`` over real devices, or loopback on one device."""

    num_ranks: int
    loopback: bool
    tokens: int
    hidden: int
    topk: int
    experts: int
    seed: int = 0
    node_size: int = 0  # ranks per node (internode: nodes exchange through NVSHMEM)

    def __post_init__(self):
        self.node_size = self.node_size or self.num_ranks
        devices = jax.devices()
        self.mesh = Mesh(
            np.array(devices[:1] if self.loopback else devices[: self.num_ranks]), ("ep",)
        )

    @property
    def transport(self) -> str:
        if self.mesh.devices.flat[0].platform != "gpu":
            return "host (no GPU)"
        if self.num_ranks == 1:
            return "none (EP=1)"
        if self.node_size < self.num_ranks:
            return (
                f"NVSHMEM between {self.num_ranks // self.node_size} nodes of "
                f"{self.node_size} ranks, NVLink inside a node"
            )
        if jax.process_count() > 1:
            return "NVLink, one process per GPU"
        return (
            "loopback: all ranks on one GPU, 'link' bytes go through HBM"
            if self.loopback
            else "NVLink"
        )

    def routing(self, num_tokens: int | None = None):
        """Uniform random top-k (distinct experts), weights, bf16 tokens, stacked [R, ...]."""
        t = num_tokens or self.tokens
        rng = np.random.default_rng(self.seed)
        scores = rng.random((self.num_ranks, t, self.experts), dtype=np.float32)
        idx = np.argpartition(-scores, self.topk - 1, axis=-1)[..., : self.topk].astype(np.int32)
        w = rng.random((self.num_ranks, t, self.topk), dtype=np.float32)
        x = rng.standard_normal((self.num_ranks, t, self.hidden), dtype=np.float32)
        return x.astype(jnp.bfloat16), idx, w

    def put(self, *arrays):
        if self.loopback:
            return [jax.device_put(a, self.mesh.devices.flat[0]) for a in arrays]
        sharding = NamedSharding(self.mesh, P("ep"))
        # every process holds the whole array; each device takes its rank's slice
        return [
            jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i]) for a in arrays
        ]

    def per_rank(self, fn):
        """Jitted callable on stacked ``[R, ...]`` arrays running ``fn`` once per rank."""
        if self.loopback:
            return jax.jit(jax.vmap(fn, axis_name="ep"))

        def body(*a):
            local = jax.tree.map(lambda v: v[0], a)
            return jax.tree.map(lambda o: o[None], fn(*local))

        return jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=P("ep"), out_specs=P("ep")))

    def group(
        self,
        backend: str,
        *,
        low_latency: bool = False,
        max_tokens: int | None = None,
        config: jax_ep.Config | None = None,
    ) -> jax_ep.Group:
        if backend == "reference":
            # timed as the specification in plain JAX: without its host-side expert-id check
            # (one host callback per step; the CUDA backend checks ids on the device)
            config = dataclasses.replace(config or jax_ep.Config(), host_checks=False)
        return jax_ep.Group(
            self.mesh,
            "ep",
            num_experts=self.experts,
            num_topk=self.topk,
            hidden=self.hidden,
            num_max_tokens_per_rank=max_tokens or self.tokens,
            backend=backend,
            loopback=self.num_ranks if self.loopback else None,
            low_latency=low_latency,
            config=config,
        )


# ----------------------------------------------------------------------------
# bytes moved (per rank, averaged over ranks)
# ----------------------------------------------------------------------------


def wire_row_bytes(hidden: int, fp8: bool) -> int:
    return hidden + hidden // 128 * 4 if fp8 else hidden * 2


def traffic(idx: np.ndarray, experts: int, node_size: int | None = None) -> dict:
    """Counts of what must move: (token, remote rank) pairs, (token, remote expert) pairs,
    received tokens and rows, per rank on average. With nodes (``node_size`` < ranks):
    ``net_token_node_pairs`` (token, other destination node): the rows NVSHMEM carries,
    once per node; ``nvlink_token_rank_pairs``: the rows a relay or source forwards over
    NVLink inside a node; ``net_expert_rows`` the low-latency messages to other nodes."""
    R, T, _ = idx.shape
    P = node_size or R
    e_loc = experts // R
    ranks = np.where(idx >= 0, idx // e_loc, -1)
    token_rank = (ranks[..., None] == np.arange(R)).any(axis=2)  # [R, T, R]
    src = np.arange(R)[:, None, None]
    dst = np.arange(R)[None, None, :]
    remote_pairs = (token_rank & (dst != src)).sum() / R
    received = token_rank.sum() / R
    rows = (
        sum(len(set(int(e) for e in row if e >= 0)) for row in idx.reshape(-1, idx.shape[-1])) / R
    )
    remote_rows = (
        sum(
            len({int(e) for e in idx[s, t] if e >= 0 and e // e_loc != s})
            for s in range(R)
            for t in range(T)
        )
        / R
    )
    out = dict(
        remote_token_rank_pairs=remote_pairs,
        received_tokens=received,
        expert_rows=rows,
        remote_expert_rows=remote_rows,
    )
    if P < R:
        token_node = token_rank.reshape(R, T, R // P, P).any(axis=3)  # [R, T, N]
        own_node = (np.arange(R) // P)[:, None, None] == np.arange(R // P)[None, None, :]
        # a relay of the source's local index receives over the network; others by NVLink
        forwarded = token_rank & (dst % P != src % P)
        net_rows = sum(
            len({int(e) for e in idx[s, t] if e >= 0 and e // e_loc // P != s // P})
            for s in range(R)
            for t in range(T)
        )
        out.update(
            net_token_node_pairs=(token_node & ~own_node).sum() / R,
            nvlink_token_rank_pairs=forwarded.sum() / R,
            net_expert_rows=net_rows / R,
        )
    return out


def rates(result: dict, link_bytes: float, hbm_bytes: float, net_bytes: float = 0.0) -> dict:
    """GB/s of the bytes that cross NVLink (``link``), HBM, and (internode) NVSHMEM."""
    t = result["median_us"] * 1e-6
    out = dict(
        result,
        link_bytes=link_bytes,
        link_GBps=link_bytes / t / 1e9 if link_bytes else 0.0,
        hbm_bytes=hbm_bytes,
        hbm_GBps=hbm_bytes / t / 1e9,
    )
    if net_bytes:
        out.update(net_bytes=net_bytes, net_GBps=net_bytes / t / 1e9)
    return out


# ----------------------------------------------------------------------------
# high-throughput cases: one Case per implementation and token count
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One implementation at one token count; ``run(done, out)`` times it, appending each row
    to ``out`` as it is measured (a case that fails later keeps them); ``done``: the rows of
    the cases before it, for the check."""

    label: str
    backend: str
    tokens: int
    run: Callable[[list[dict], list[dict]], None]


def baseline_skip_reason(name: str, setup: Setup) -> str | None:
    """Why ``name`` cannot run on this platform/setup (known up front), or None."""
    if name not in _BASELINES:
        return f"unknown baseline (known: {', '.join(_BASELINES)})"
    if name == "ragged_all_to_all" and setup.mesh.devices.flat[0].platform == "cpu":
        return (
            "XLA:CPU has no ragged-all-to-all (UNIMPLEMENTED: HLO opcode ragged-all-to-all "
            "is not supported by XLA:CPU)"
        )
    if name == "ragged_all_to_all" and setup.loopback:
        return "loopback runs the ranks under vmap, and JAX has no vmap rule for it"
    if name == "local" and setup.num_ranks != 1:
        return "EP=1 only: it has no exchange (every expert local)"
    return None


class _Inputs:
    """One token count's routing and device arrays, made when a case first needs them."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self._v = None

    def get(self):
        if self._v is None:
            x, idx, w = self.setup.routing()
            self._v = (
                *self.setup.put(x, idx, w),
                traffic(idx, self.setup.experts, self.setup.node_size),
                idx,
            )
        return self._v


def ht_plan(
    setup: Setup,
    *,
    layouts,
    backends,
    baselines_wanted,
    calls: int,
    repeats: int,
    config: jax_ep.Config,
    profile: bool = False,
    chain: int = 1,
) -> tuple[list[Case], list[dict]]:
    """The cases of one token count (baselines, then the reference backend, then CUDA: the
    CUDA case can then tell which of its rows lose, and profile those), and the baselines
    skipped with the reason."""
    inputs = _Inputs(setup)
    cases, skipped = [], []
    for name in baselines_wanted:
        why = baseline_skip_reason(name, setup)
        if why:
            skipped.append(dict(baseline=name, tokens=setup.tokens, reason=why))
            continue
        cases.append(
            Case(
                f"baseline {name}",
                name,
                setup.tokens,
                functools.partial(_baseline_case, setup, inputs, name, calls, repeats, chain),
            )
        )
    for backend in sorted(backends, key=lambda b: b == "cuda"):
        cases.append(
            Case(
                f"jax_ep {backend} backend",
                backend,
                setup.tokens,
                functools.partial(
                    _backend_case,
                    setup,
                    inputs,
                    backend,
                    layouts,
                    calls,
                    repeats,
                    config,
                    profile,
                    chain,
                ),
            )
        )
    return cases, skipped


def _row(setup, tr, name, backend, layout, fp8, res, link, hbm, **extra) -> dict:
    H, T = setup.hidden, setup.tokens
    net = 0.0
    if "net_token_node_pairs" in tr and backend == "cuda":
        # two hops: bytes per node over NVSHMEM, then NVLink
        row_b = wire_row_bytes(H, fp8) if name == "dispatch" else 2 * H
        net, link = tr["net_token_node_pairs"] * row_b, tr["nvlink_token_rank_pairs"] * row_b
    row = dict(
        op=name,
        backend=backend,
        layout=layout,
        fp8=fp8,
        tokens=T,
        **rates(res, link, hbm, net),
        **extra,
    )
    print(
        f"  {name:9s} {backend:18s} {layout:12s} fp8={int(fp8)} {row['median_us']:9.1f} us"
        f"  link {row['link_GBps']:7.1f} GB/s  hbm {row['hbm_GBps']:7.1f} GB/s"
        + (f"  nvshmem {row['net_GBps']:7.1f} GB/s" if net else "")
        + (f"  {row['us_per_row']:.3f} us per row (XLA's own)" if "us_per_row" in row else ""),
        flush=True,
    )
    return row


def _backend_case(
    setup, inputs, backend, layouts, calls, repeats, config, profile, chain, done, out
) -> None:
    xd, idxd, wd, tr, _ = inputs.get()
    H, T = setup.hidden, setup.tokens
    # one process only: with several, each decides from its own timings, and a profile run
    # on some processes but not on the others would leave the exchange waiting for peers
    can_profile = setup.mesh.devices.flat[0].platform == "gpu" and jax.process_count() == 1

    def add(row, run):
        # a CUDA row slower than a rival already timed (or every CUDA row with --profile):
        # where did its time go (GPU only)
        if backend == check.JAX_EP and can_profile and (profile or check.loses(row, done)):
            row["profile"] = _per_op(kernel_breakdown(run), chain)
            _print_profile(row["profile"])
        out.append(row)

    group = setup.group(backend, config=config)
    try:
        sms = config.resolved_num_sms(setup.num_ranks) if backend == "cuda" else None
        for layout in layouts:
            rows = tr["received_tokens"] if layout == "per_rank" else tr["expert_rows"]
            for fp8 in (False, True):
                op = functools.partial(_dispatch_only, group=group, layout=layout, fp8=fp8)
                disp = setup.per_rank(_chained(op, chain, _feed_routing, needs_barrier(backend)))
                run = functools.partial(disp, xd, idxd, wd)
                res = _per_call(measure(run, calls=calls, repeats=repeats), chain)
                row_b = wire_row_bytes(H, fp8)
                link = tr["remote_token_rank_pairs"] * row_b
                hbm = T * H * 2 + rows * (H if fp8 else 2 * H)
                add(
                    _row(setup, tr, "dispatch", backend, layout, fp8, res, link, hbm, num_sms=sms),
                    run,
                )
            # combine of bf16 expert outputs (FP8 is a dispatch-only wire format)
            first = setup.per_rank(functools.partial(_dispatch_full, group=group, layout=layout))
            y, handle = first(xd, idxd, wd)
            op = functools.partial(_combine_only, group=group)
            comb = setup.per_rank(_chained(op, chain, _feed_handle, needs_barrier(backend)))
            run = functools.partial(comb, y, handle)
            res = _per_call(measure(run, calls=calls, repeats=repeats), chain)
            link = tr["remote_token_rank_pairs"] * 2 * H
            hbm = rows * 2 * H + tr["received_tokens"] * 2 * H + T * 2 * H
            add(
                _row(setup, tr, "combine", backend, layout, False, res, link, hbm, num_sms=sms), run
            )
    finally:
        group.close()


def _baseline_case(setup, inputs, name, calls, repeats, chain, done, out) -> None:
    del done
    xd, idxd, wd, tr, idx = inputs.get()
    H, T = setup.hidden, setup.tokens
    d_fn, c_fn = _BASELINES[name]
    # the baselines send one row per (token, k) selection
    extra = {}
    if name == "ragged_all_to_all":
        extra["rows_per_rank"] = float(np.sum(idx >= 0) / setup.num_ranks)
    link = 0.0 if name == "local" else tr["remote_expert_rows"] * 2 * H

    def per_row(res):
        if not extra:
            return {}
        return dict(extra, us_per_row=res["median_us"] / max(extra["rows_per_rank"], 1.0))

    if name == "ragged_all_to_all":
        # ~5 µs per row (XLA's own cost: 170 ms a call at EP=1, 4096 tokens): the host's
        # dispatch is nothing beside it, and a chain would only multiply the run's time
        chain = extra["ops_per_program"] = 1
    d_op = functools.partial(d_fn, num_experts=setup.experts)
    disp = setup.per_rank(_chained(d_op, chain, _feed_routing))
    res = _per_call(measure(functools.partial(disp, xd, idxd), calls=calls, repeats=repeats), chain)
    out.append(
        _row(
            setup,
            tr,
            "dispatch",
            name,
            "ragged",
            False,
            res,
            link,
            T * H * 2 + tr["expert_rows"] * 2 * H,
            **per_row(res),
        )
    )
    yb, state = setup.per_rank(d_op)(xd, idxd)
    comb = setup.per_rank(_chained(c_fn, chain, _feed_weights))
    res = _per_call(
        measure(functools.partial(comb, yb, wd, state), calls=calls, repeats=repeats), chain
    )
    out.append(
        _row(
            setup,
            tr,
            "combine",
            name,
            "ragged",
            False,
            res,
            link,
            2 * tr["expert_rows"] * 2 * H + T * 2 * H,
            **per_row(res),
        )
    )


# high-throughput chains: `chain` dependent ops in one program, as a model step runs
# them (the host's per-call dispatch is paid once per program, not once per op); each
# call's arguments depend on the previous result through a select on a scalar made of
# every leaf of it (``consumed``), which XLA cannot fold, so no call is merged with
# another or reordered, none is computed in part, and none shares work that reads the
# routing, handle or weights with another (``_feed``).


def _chained(op, chain: int, feed, whole: bool = True):
    if chain == 1:
        return op

    def run(*args):
        for _ in range(chain):
            out, flag = consumed(op(*args), whole)
            args = feed(args, flag, whole)
        return out

    return run


def needs_barrier(backend: str) -> bool:
    """Whether ``backend``'s ops need ``consumed``'s barrier: not jax_ep's CUDA ops, which
    are custom calls that XLA runs whole or not at all."""
    return backend != check.JAX_EP


def consumed(out, whole: bool = True):
    """``out``, and a scalar that is always false yet depends on one element of every
    leaf of it: the next op's feed. With ``whole``, the leaves pass through an
    optimization barrier first.

    XLA cannot narrow a computation through the barrier, so every leaf of a pure-JAX op
    is computed whole, as when a model consumes it. Without it such a result, used only
    through one element, shrinks to that element (a gather to one row) and the chain
    times less than the op. Returning every op's result instead kept it whole but timed
    the host: each output of a program costs host time (a decode chain of 32 empty ops
    returning 9 leaves each took 78 us per op on an H200, 19 us with 4 outputs). The
    barrier also cuts XLA's command buffers into pieces (the same empty op: 32 us), so
    jax_ep's custom calls, which XLA cannot narrow, go without it (``needs_barrier``)."""
    leaves, tree = jax.tree.flatten(out)
    if whole:
        leaves = jax.lax.optimization_barrier(leaves)
    s = sum(leaf.reshape(-1)[0].astype(jnp.float32) for leaf in leaves)
    return jax.tree.unflatten(tree, leaves), (s != s) & (s > 0)  # false for NaN too


def _per_call(res: dict, chain: int) -> dict:
    return {k: (v / chain if k.endswith("_us") else v) for k, v in res.items()}


def fed(tree, flag):
    """Every array of ``tree`` made to depend on ``flag`` (always false: values unchanged)."""

    def one(a):
        if a.dtype == jnp.bool_:
            return jnp.where(flag, ~a, a)
        return jnp.where(flag, a + 1 if jnp.issubdtype(a.dtype, jnp.integer) else a * 2, a)

    return jax.tree.map(one, tree)


def _feed(minimal):
    """A chain's feed (``_chained``). For a pure-JAX op (``whole``) every argument but the
    first, the token or expert rows, depends on the previous result: work that reads the
    routing, the handle or the weights cannot be computed once for the whole chain (the
    reference combine's scatter, the local path's unsort were, when only the weights or
    the token list were fed). Work on the rows alone still can be (an FP8 quantisation of
    ``x``): feeding the rows would add a pass over them to every op. A custom call cannot
    be split, so it gets only ``minimal``: one dependence on the previous op."""

    def feed(args, flag, whole):
        return (args[0], *fed(args[1:], flag)) if whole else minimal(args, flag)

    return feed


@_feed
def _feed_routing(args, flag):  # dispatch(x, idx, ...): the routing
    x, idx, *rest = args
    return (x, jnp.where(flag, idx + 1, idx), *rest)


@_feed
def _feed_handle(args, flag):  # jax_ep combine(y, handle): the handle's token list
    y, handle = args
    return y, dataclasses.replace(
        handle, recv_src=jnp.where(flag, handle.recv_src + 1, handle.recv_src)
    )


@_feed
def _feed_weights(args, flag):  # baseline combine(y, weights, state): the router weights
    y, w, state = args
    return y, jnp.where(flag, w * 2, w), state


def _dispatch_only(x, idx, w, *, group, layout, fp8):
    out = jax_ep.dispatch(x, idx, w, group=group, layout=layout, fp8=fp8)
    return out.x, out.counts


def _dispatch_full(x, idx, w, *, group, layout):
    out = jax_ep.dispatch(x, idx, w, group=group, layout=layout)
    return out.x, out.handle


def _combine_only(y, handle, *, group):
    return jax_ep.combine(y, handle, group=group)


def _ragged_dispatch(x, idx, *, num_experts):
    out = baselines.ragged_all_to_all_dispatch(x, idx, axis_name="ep", num_experts=num_experts)
    return out.x, out.state


def _ragged_combine(y, w, state):
    return baselines.ragged_all_to_all_combine(y, w, state, axis_name="ep")


def _a2a_dispatch(x, idx, *, num_experts):
    out = baselines.all_to_all_dispatch(x, idx, axis_name="ep", num_experts=num_experts)
    return out.x, out.state


def _a2a_combine(y, w, state):
    return baselines.all_to_all_combine(y, w, state, axis_name="ep")


def _local_dispatch(x, idx, *, num_experts):
    out = baselines.local_dispatch(x, idx, num_experts=num_experts)
    return out.x, out.state


_BASELINES = {
    "local": (_local_dispatch, baselines.local_combine),
    "ragged_all_to_all": (_ragged_dispatch, _ragged_combine),
    "all_to_all": (_a2a_dispatch, _a2a_combine),
}


# ----------------------------------------------------------------------------
# low-latency cases: a decode-like jitted chain, so launch gaps are what a
# decode step sees (inside a CUDA graph when XLA's command buffers are on)
# ----------------------------------------------------------------------------


def ll_cases(
    setup: Setup,
    *,
    backends,
    chain: int,
    calls: int,
    repeats: int,
    fp8: bool,
    config: jax_ep.Config,
    tokens: int | None = None,
    profile: bool = False,
) -> list[dict]:
    T = tokens or setup.tokens
    x, idx, w = setup.routing(T)
    xd, idxd, wd = setup.put(x, idx, w)
    tr = traffic(idx, setup.experts, setup.node_size)
    H = setup.hidden
    out = []
    for backend in backends:
        group = setup.group(backend, low_latency=True, max_tokens=T, config=config)
        common = dict(group=group, fp8=fp8, chain=chain, whole=needs_barrier(backend))
        y, handle = setup.per_rank(functools.partial(_ll_expert_inputs, group=group, fp8=fp8))(
            xd, idxd
        )
        for what in ("dispatch", "combine", "pair"):
            chain_fn = setup.per_rank(functools.partial(_ll_chain, what=what, **common))
            step = functools.partial(_with_expert_inputs, chain_fn, y, handle)
            calls_before = _handler_calls(group)
            res = measure(lambda s=step: s(xd, idxd, wd), calls=calls, repeats=repeats)
            calls_after = _handler_calls(group)
            res = _per_call(res, chain)
            msg = 16 + wire_row_bytes(H, fp8)
            per_row = {"dispatch": msg, "combine": 2 * H, "pair": msg + 2 * H}[what]
            # internode: messages to other nodes' ranks go through NVSHMEM, the rest NVLink
            net_rows = tr.get("net_expert_rows", 0.0) if backend == "cuda" else 0.0
            link = (tr["remote_expert_rows"] - net_rows) * per_row
            row = dict(
                op=f"ll_{what}",
                backend=backend,
                fp8=fp8,
                tokens=T,
                chain=chain,
                **rates(res, link, 0.0, net_rows * per_row),
            )
            print(
                f"  ll_{what:8s} {backend:10s} fp8={int(fp8)} {row['median_us']:8.2f} us/call"
                f"  link {row['link_GBps']:6.1f} GB/s",
                flush=True,
            )
            if backend == "cuda":
                # captured: made while XLA recorded a CUDA graph; replays make none
                row["handler_calls"] = {k: calls_after[k] - calls_before[k] for k in calls_after}
            if profile:
                row["profile"] = _per_op(kernel_breakdown(lambda s=step: s(xd, idxd, wd)), chain)
                _print_profile(row["profile"])
            out.append(row)
        out += _overlap_rows(setup, backend, xd, idxd, calls=calls, repeats=repeats, **common)
        group.close()
    return out


def _overlap_rows(setup, backend, xd, idxd, *, calls, repeats, **common) -> list[dict]:
    """Dispatch split into send / receive with an expert-sized matmul between them
    (DeepEP's receive hook, in JAX form): the time the overlap hides is
    t(send + recv) + t(matmul) - t(send, matmul, recv)."""
    fp8, chain = common["fp8"], common["chain"]
    H = setup.hidden
    rng = np.random.default_rng(setup.seed + 1)
    wmat = rng.standard_normal((setup.num_ranks, H, H), dtype=np.float32) / np.sqrt(H)
    (wd,) = setup.put(wmat.astype(jnp.bfloat16))
    times = {}
    for mode in ("comm", "compute", "both"):
        fn = setup.per_rank(functools.partial(_ll_overlap, mode=mode, **common))
        res = measure(lambda f=fn: f(xd, idxd, wd), calls=calls, repeats=repeats)
        times[mode] = res["median_us"] / chain
    hidden_us = times["comm"] + times["compute"] - times["both"]
    print(
        f"  ll_overlap  {backend:10s} fp8={int(fp8)} send+recv {times['comm']:.2f} us, "
        f"matmul {times['compute']:.2f} us, both {times['both']:.2f} us: "
        f"{hidden_us:.2f} us hidden",
        flush=True,
    )
    return [
        dict(
            op="ll_dispatch_overlap",
            backend=backend,
            fp8=fp8,
            tokens=xd.shape[1],
            chain=chain,
            split_us=times["comm"],
            matmul_us=times["compute"],
            overlapped_us=times["both"],
            hidden_us=hidden_us,
            matmul=f"[{xd.shape[1]}, {H}] x [{H}, {H}] bf16, tanh",
        )
    ]


def _ll_overlap(x, idx, wmat, *, group, fp8, chain, mode, whole):
    """``chain`` steps of: dispatch send, [H x H] matmul on an independent chain, receive
    (every receive's result consumed whole, as in ``_ll_chain``)."""
    h = x
    for _ in range(chain):
        if mode != "compute":
            ticket = jax_ep.low_latency_dispatch_send(x, idx, group=group, fp8=fp8)
        if mode != "comm":
            h = jnp.tanh(h @ wmat)
        if mode != "compute":
            o, flag = consumed(jax_ep.low_latency_dispatch_recv(ticket), whole)
            idx = jnp.where(flag, idx + 1, idx)
    return idx, h


def _handler_calls(group) -> dict:
    stats = group.call_stats()
    return {k: sum(s[f"handler_calls_{k}"] for s in stats) for k in ("captured", "direct")}


def _per_op(breakdown: dict, chain: int) -> dict:
    """A profile of ``chain``-op programs, per op."""
    if not breakdown:
        return {}
    for k in breakdown["kernels"].values():
        k["per_call"] /= chain
    for key in ("busy_us_per_call", "span_us_per_call"):
        breakdown[key] /= chain
    return breakdown


def _print_profile(p: dict) -> None:
    if not p:
        print("    (no GPU kernels in the profile)", flush=True)
        return
    for name, k in p["kernels"].items():
        print(f"    {k['per_call']:5.2f} x {k['median_us']:7.2f} us  {name}", flush=True)
    print(
        f"    per op: kernels busy {p['busy_us_per_call']:.2f} us of a "
        f"{p['span_us_per_call']:.2f} us span",
        flush=True,
    )


def _with_expert_inputs(chain_fn, y, handle, x, idx, w):
    return chain_fn(x, idx, w, y, handle)


def _ll_expert_inputs(x, idx, *, group, fp8):
    """One dispatch's handle and its rows as the expert stand-in's output (bf16): made
    once, outside the timed programs (a dequantise of the whole [E_loc, R*T_max, H]
    receive buffer would otherwise be timed with every program)."""
    out = jax_ep.low_latency_dispatch(x, idx, group=group, fp8=fp8)
    rows = jax_ep.dequantize_fp8(out.x, out.scales, jnp.float32) if fp8 else out.x
    return rows.astype(jnp.bfloat16), out.handle


def _ll_chain(x, idx, w, y, handle, *, group, what, fp8, chain, whole):
    """``chain`` dependent low-latency ops in one program (a decode loop's shape); every
    op's result is consumed whole (``consumed``)."""
    for _ in range(chain):
        if what == "dispatch":
            out = jax_ep.low_latency_dispatch(x, idx, group=group, fp8=fp8)
        elif what == "combine":
            out = jax_ep.low_latency_combine(y, idx, w, handle, group=group)
        else:
            o = jax_ep.low_latency_dispatch(x, idx, group=group, fp8=fp8)
            out = (o, jax_ep.low_latency_combine(y, idx, w, o.handle, group=group))
        out, flag = consumed(out, whole)
        if what == "pair":
            x = out[1]
        # every operand but the rows (x, y) depends on this op (see _feed): the reference
        # combine's scatter, which reads only (y, handle), was computed once per chain when
        # only the weights were fed; a custom call needs one dependence, the routing
        if whole:
            idx, w, handle = fed((idx, w, handle), flag)
        else:
            idx = jnp.where(flag, idx + 1, idx)
    return x, w, idx
