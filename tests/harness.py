"""Shared test machinery: routing generators, runners for each backend/mode, and a
NumPy oracle that implements the jax_ep contract independently of JAX.

Inputs are generated from one seed for all ranks, stacked ``[R, T, ...]``; the
oracle needs no collectives. Token payloads encode (source rank, token) in
their first two channels so misrouting shows up as wrong values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep.capacity import dispatch_capacity

ROUTINGS = ("random", "skewed", "one_expert", "duplicates", "masked", "empty_rank", "all_masked")


def make_routing(
    kind: str, num_ranks: int, num_tokens: int, num_topk: int, num_experts: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``[R, T, K]`` int32 expert ids and float32 weights for a routing pattern."""
    rng = np.random.default_rng(seed)
    shape = (num_ranks, num_tokens)
    k = min(num_topk, num_experts)

    def distinct(pool: np.ndarray, p=None) -> np.ndarray:
        out = np.full(shape + (num_topk,), -1, np.int32)
        for r in range(num_ranks):
            for t in range(num_tokens):
                out[r, t, : min(k, len(pool))] = rng.choice(
                    pool, min(k, len(pool)), replace=False, p=p
                )
        return out

    experts = np.arange(num_experts)
    if kind == "random":
        idx = distinct(experts)
    elif kind == "skewed":  # a few experts take most tokens
        p = 1.0 / (experts + 1.0) ** 2
        idx = distinct(experts, p / p.sum())
    elif kind == "one_expert":  # every token to the last expert only
        idx = np.full(shape + (num_topk,), -1, np.int32)
        idx[..., 0] = num_experts - 1
    elif kind == "duplicates":  # a token naming the same expert several times
        idx = distinct(experts)
        idx[..., 1::2] = idx[..., :1]
    elif kind == "masked":
        idx = distinct(experts)
        idx[rng.random(idx.shape) < 0.35] = -1
    elif kind == "empty_rank":  # the last rank receives nothing
        e_loc = num_experts // num_ranks
        pool = experts[: max(e_loc, num_experts - e_loc)] if num_ranks > 1 else experts
        idx = distinct(pool)
    elif kind == "all_masked":
        idx = np.full(shape + (num_topk,), -1, np.int32)
    else:
        raise ValueError(kind)
    weights = rng.random(shape + (num_topk,)).astype(np.float32) + 0.1
    return idx.astype(np.int32), weights


def make_tokens(num_ranks: int, num_tokens: int, hidden: int, dtype=jnp.bfloat16, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_ranks, num_tokens, hidden)).astype(np.float32)
    x[:, :, 0] = np.arange(num_ranks)[:, None]
    if hidden > 1:
        x[:, :, 1] = (np.arange(num_tokens) % 64)[None, :]
    return x.astype(np.dtype(dtype))


# ----------------------------------------------------------------------------
# runners
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    """Runs a per-rank function on stacked ``[R, ...]`` inputs; returns stacked outputs.

    mode "shard_map": one device per rank; "loopback": R virtual ranks on one device
    under ``jax.vmap(axis_name="ep")``.
    """

    backend: str
    num_ranks: int
    mode: str
    platform: str = "cpu"

    def __post_init__(self):
        devices = jax.devices(self.platform)
        if self.mode == "shard_map":
            self.mesh = Mesh(np.array(devices[: self.num_ranks]), ("ep",))
        else:
            self.mesh = Mesh(np.array(devices[:1]), ("ep",))

    def group(self, **kw) -> jax_ep.Group:
        loopback = self.num_ranks if self.mode == "loopback" else None
        return jax_ep.Group(self.mesh, "ep", backend=self.backend, loopback=loopback, **kw)

    def run(self, fn, *args, jit: bool = True):
        if self.mode == "loopback":
            dev = self.mesh.devices.flat[0]
            f = jax.vmap(fn, axis_name="ep")
            args = [jax.device_put(a, dev) for a in args]
        else:
            sharding = NamedSharding(self.mesh, P("ep"))
            args = [jax.device_put(a, sharding) for a in args]

            def per_rank(*a):
                out = fn(*[v[0] for v in a])
                return jax.tree.map(lambda o: o[None], out)

            f = jax.shard_map(per_rank, mesh=self.mesh, in_specs=P("ep"), out_specs=P("ep"))
        f = jax.jit(f) if jit else f
        return jax.tree.map(np.asarray, f(*args))

    def __str__(self):
        return f"{self.backend}-{self.mode}-R{self.num_ranks}"


def runner_params(runners, *names: str):
    """``pytest.param`` of the runners whose id (``str(runner)``) is one of ``names``, or is
    any CUDA runner when ``"cuda"`` is given. CUDA runners exist only with the kernels; any
    other name that matches none is an error, so a test never loses its runner silently when
    the list changes."""
    chosen = [r for r in runners if str(r) in names or ("cuda" in names and r.backend == "cuda")]
    missing = {n for n in names if not n.startswith("cuda")} - {str(r) for r in chosen}
    if missing:
        raise ValueError(f"no runner named {sorted(missing)} in {[str(r) for r in runners]}")
    return [pytest.param(r, id=str(r)) for r in chosen]


# ----------------------------------------------------------------------------
# NumPy oracle of the contract (jax_ep/reference.py module docstring)
# ----------------------------------------------------------------------------


def _to(dtype, a):
    return np.asarray(a, np.float32).astype(np.dtype(dtype))


def default_capacity(layout: str, num_ranks: int, num_tokens: int, num_topk: int, num_experts: int):
    """The rows :func:`jax_ep.dispatch` picks when given no capacity (the default factor)."""
    return dispatch_capacity(
        layout,
        num_ranks=num_ranks,
        num_tokens=num_tokens,
        num_topk=num_topk,
        num_experts=num_experts,
    )


def valid_rows(x, counts, layout: str) -> list:
    """The defined rows of a dispatch payload (the rest are unspecified): one array per
    expert for expert_major (its first ``counts[e]`` rows), else the first rows in one array."""
    x, counts = np.asarray(x), np.asarray(counts)
    if layout == "expert_major":
        return [x[e, : int(n)] for e, n in enumerate(counts)]
    return [x[: int(np.sum(counts))]]


def assert_valid_rows_equal(got, want, counts, layout: str, what: str = "x"):
    """Dispatch payloads agree on their defined rows (rows past them are unspecified)."""
    for i, (g, w) in enumerate(
        zip(valid_rows(got, counts, layout), valid_rows(want, counts, layout), strict=True)
    ):
        assert_equal(g, w, f"{what} (expert {i})" if layout == "expert_major" else what)


def oracle_dispatch(x, idx, w, num_experts: int, layout: str, capacity: int):
    """Per-rank expected dispatch outputs and handle, as dicts of NumPy arrays."""
    num_ranks, num_tokens, num_topk = idx.shape
    hidden = x.shape[-1]
    e_loc = num_experts // num_ranks
    rt = num_ranks * num_tokens
    outs = []
    for me in range(num_ranks):
        local = np.where((idx >= me * e_loc) & (idx < (me + 1) * e_loc), idx - me * e_loc, -1)
        toks = [
            (s, t) for s in range(num_ranks) for t in range(num_tokens) if (local[s, t] >= 0).any()
        ]
        n = len(toks)
        o = dict(
            num_recv=np.int32(n),
            recv_src=np.full(rt, -1, np.int32),
            recv_topk_idx=np.full((rt, num_topk), -1, np.int32),
            recv_weights=np.zeros((rt, num_topk), np.float32),
        )
        for i, (s, t) in enumerate(toks):
            o["recv_src"][i] = s * num_tokens + t
            o["recv_topk_idx"][i] = local[s, t]
            o["recv_weights"][i] = np.where(local[s, t] >= 0, w[s, t], 0)
        if layout == "per_rank":
            kept = min(n, capacity)
            o["x"] = np.zeros((capacity, hidden), x.dtype)
            o["topk_idx"] = np.full((capacity, num_topk), -1, np.int32)
            o["topk_weights"] = np.zeros((capacity, num_topk), np.float32)
            o["recv_rows"] = np.full((rt, 1), -1, np.int32)
            for i, (s, t) in enumerate(toks[:kept]):
                o["x"][i] = x[s, t]
                o["topk_idx"][i] = o["recv_topk_idx"][i]
                o["topk_weights"][i] = o["recv_weights"][i]
                o["recv_rows"][i] = i
            o["counts"], o["num_dropped"] = np.int32(kept), np.int32(n - kept)
        else:
            count = np.zeros(e_loc, np.int64)
            slots = []
            for s, t in toks:
                chosen = {}
                for e in local[s, t]:
                    if e >= 0 and e not in chosen:
                        chosen[e] = count[e]
                        count[e] += 1
                slots.append(chosen)
            offset = np.cumsum(count) - count
            if layout == "expert_major":
                kept = np.minimum(count, capacity)
                o["x"] = np.zeros((e_loc, capacity, hidden), x.dtype)
                flat = o["x"].reshape(-1, hidden)
            else:
                kept = np.clip(capacity - offset, 0, count)
                o["x"] = np.zeros((capacity, hidden), x.dtype)
                flat = o["x"]
            o["recv_rows"] = np.full((rt, num_topk), -1, np.int32)
            for i, ((s, t), chosen) in enumerate(zip(toks, slots, strict=False)):
                for k, e in enumerate(local[s, t]):
                    if e < 0:
                        continue
                    slot = chosen[e]
                    if layout == "expert_major":
                        row = e * capacity + slot if slot < capacity else -1
                    else:
                        row = offset[e] + slot if offset[e] + slot < capacity else -1
                    o["recv_rows"][i, k] = row
                    if row >= 0:
                        flat[row] = x[s, t]
            o["counts"] = kept.astype(np.int32)
            o["num_dropped"] = np.int32(count.sum() - kept.sum())
        outs.append(o)
    return outs


def oracle_combine(ys, handles, idx, num_experts: int, layout: str, dtype, node_size=None):
    """``[R, T, H]`` expected combine of per-rank layout rows ``ys`` (contract order, float32).

    ``node_size``: the internode order (docs/protocol.md, "Internode"): a token's partials
    are summed per node (ascending ranks, float32, rounded to ``dtype``), then the nodes'
    rows in ascending node order. One node (the default) is the intranode order.
    """
    num_ranks, num_tokens, _ = idx.shape
    node_size = node_size or num_ranks
    e_loc = num_experts // num_ranks
    hidden = ys[0].shape[-1]
    partial = {}
    for me in range(num_ranks):
        h = handles[me]
        y = np.asarray(ys[me], np.float32).reshape(-1, hidden)
        for i in range(int(h["num_recv"])):
            acc = np.zeros(hidden, np.float32)
            for k in range(h["recv_rows"].shape[1]):
                row = h["recv_rows"][i, k]
                if row < 0:
                    continue
                wk = (
                    np.float32(1.0) if layout == "per_rank" else np.float32(h["recv_weights"][i, k])
                )
                acc = (acc + (wk * y[row]).astype(np.float32)).astype(np.float32)
            partial[(me, int(h["recv_src"][i]))] = _to(dtype, acc).astype(np.float32)
    out = np.zeros((num_ranks, num_tokens, hidden), np.float32)
    for s in range(num_ranks):
        for t in range(num_tokens):
            ranks = sorted({int(e) // e_loc for e in idx[s, t] if e >= 0})
            acc = np.zeros(hidden, np.float32)
            for node in sorted({d // node_size for d in ranks}):
                part = np.zeros(hidden, np.float32)
                for d in ranks:
                    if d // node_size == node:
                        part = (part + partial[(d, s * num_tokens + t)]).astype(np.float32)
                acc = (acc + _to(dtype, part).astype(np.float32)).astype(np.float32)
            out[s, t] = acc
    return _to(dtype, out)


def dense_moe(x, idx, w, expert_scale):
    """``Σ_k w[t,k] * scale[e_k] * x[t]`` without communication (for gradient checks)."""
    valid = idx >= 0
    s = jnp.where(valid, expert_scale[jnp.maximum(idx, 0)], 0.0) * w
    return jnp.sum(s, axis=-1)[..., None] * x


def toy_expert(v):
    """The toy experts' shared map: expert ``e`` sends a row ``v`` to ``s_e * (v * v + v)``."""
    return v * v + v


def toy_scales(num_experts: int):
    """``[E]`` per-expert scales ``s_e`` of the toy experts."""
    return (jnp.arange(num_experts, dtype=jnp.float32) + 1.0) / num_experts


def toy_moe_layer(x, idx, w, group, layout, fp8=False):
    """Per-rank toy MoE through jax_ep (dispatch, toy experts, combine); returns ``[T, H]``.

    Runs inside whatever binds ``group.axis_name`` (one axis or a tuple of mesh axes).
    """
    num_experts = group.num_experts
    e_loc = num_experts // group.num_ranks
    hidden = x.shape[-1]
    me = jax.lax.axis_index(group.axis_name)
    s = toy_scales(num_experts)
    out = jax_ep.dispatch(x, idx, w, group=group, layout=layout, fp8=fp8, dequantize=fp8)
    rows = out.x.reshape(-1, hidden)
    gx = rows if fp8 else toy_expert(rows)
    if layout == "per_rank":
        # DeepEP normal mode: the expert side weights and sums its local experts itself
        local_s = jnp.where(out.topk_idx >= 0, s[me * e_loc + jnp.maximum(out.topk_idx, 0)], 0.0)
        y = jnp.sum(local_s * out.topk_weights, axis=1)[:, None] * gx
        return jax_ep.combine(y, out.handle, group=group)
    if layout == "expert_major":
        e = jnp.arange(rows.shape[0]) // out.x.shape[1]
    else:
        e = jnp.searchsorted(jnp.cumsum(out.counts), jnp.arange(rows.shape[0]), side="right")
    y = (s[jnp.minimum(me * e_loc + e, num_experts - 1)][:, None] * gx).reshape(out.x.shape)
    return jax_ep.combine(y, out.handle, group=group)


def toy_dense_moe(x, idx, w, num_experts: int, fp8=False):
    """What :func:`toy_moe_layer` computes, per token, without communication."""
    valid = idx >= 0
    coef = jnp.sum(jnp.where(valid, toy_scales(num_experts)[jnp.maximum(idx, 0)] * w, 0.0), axis=-1)
    return coef[..., None] * (x if fp8 else toy_expert(x))


def assert_equal(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if got.dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, np.float16):
        got, want = got.astype(np.float32), want.astype(np.float32)
    np.testing.assert_array_equal(got, want, err_msg=what)


def oracle_low_latency(x, idx, num_experts: int, t_max: int, active=None):
    """Per-rank expected low-latency dispatch: valid rows, counts, src info, first k, ranges."""
    num_ranks, num_tokens, _ = idx.shape
    e_loc = num_experts // num_ranks
    active = np.ones(num_ranks, bool) if active is None else np.asarray(active, bool)
    outs = []
    for me in range(num_ranks):
        rows = [[] for _ in range(e_loc)]
        for s in range(num_ranks):
            if not active[s] or not active[me]:
                continue
            for t in range(num_tokens):
                seen = set()
                for k, e in enumerate(idx[s, t]):
                    if e >= 0 and e // e_loc == me and e not in seen:
                        seen.add(e)
                        rows[e - me * e_loc].append((s, t, k))
        counts = np.array([len(r) for r in rows], np.int32)
        ranges = np.zeros((e_loc, num_ranks, 2), np.int32)
        for e in range(e_loc):
            for s in range(num_ranks):
                n = sum(1 for (ss, _, _) in rows[e] if ss == s)
                ranges[e, s] = (sum(1 for (ss, _, _) in rows[e] if ss < s), n)
        outs.append(
            dict(
                counts=counts,
                ranges=ranges,
                x=[
                    np.stack([x[s, t] for s, t, _ in r])
                    if r
                    else np.zeros((0, x.shape[-1]), x.dtype)
                    for r in rows
                ],
                src_info=[np.array([s * t_max + t for s, t, _ in r], np.int32) for r in rows],
                topk_slot=[np.array([k for _, _, k in r], np.int32) for r in rows],
            )
        )
    dropped = [
        int(sum(1 for e in idx[me].ravel() if e >= 0 and not active[e // e_loc]))
        if active[me]
        else 0
        for me in range(num_ranks)
    ]
    return outs, dropped


def oracle_low_latency_combine(ys, idx, w, num_experts: int, t_max: int, dtype, active=None):
    """``[R, T, H]``: ``Σ_k w * y[e_k, row(t, e_k)]`` in float32 k order, failed ranks skipped."""
    num_ranks, num_tokens, num_topk = idx.shape
    e_loc = num_experts // num_ranks
    active = np.ones(num_ranks, bool) if active is None else np.asarray(active, bool)
    row_of = {}
    for me in range(num_ranks):
        for e in range(e_loc):
            n = 0
            for s in range(num_ranks):
                for t in range(num_tokens):
                    if active[s] and active[me] and (idx[s, t] == me * e_loc + e).any():
                        row_of[(s, t, me * e_loc + e)] = n
                        n += 1
    out = np.zeros((num_ranks, num_tokens, ys[0].shape[-1]), np.float32)
    for s in range(num_ranks):
        for t in range(num_tokens):
            acc = np.zeros(ys[0].shape[-1], np.float32)
            for k in range(num_topk):
                e = idx[s, t, k]
                if e < 0 or not active[e // e_loc] or not active[s]:
                    continue
                y = np.asarray(ys[e // e_loc][e % e_loc, row_of[(s, t, e)]], np.float32)
                acc = (acc + (np.float32(w[s, t, k]) * y).astype(np.float32)).astype(np.float32)
            out[s, t] = acc
    return _to(dtype, out)


def assert_within_ulps(got, want, dtype, ulps: int, what: str = "combine"):
    """``|got - want| <= ulps`` units in the last place of ``want`` in ``dtype``."""
    got = np.asarray(got).astype(np.float32)
    want = np.asarray(want).astype(np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    mantissa = {2: 7 if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else 10, 4: 23}[
        np.dtype(dtype).itemsize
    ]
    _, exponent = np.frexp(np.abs(want))
    ulp = np.ldexp(np.float32(1), exponent - 1 - mantissa)
    bad = np.abs(got - want) > ulps * ulp
    assert not bad.any(), (
        f"{what}: {bad.sum()} elements differ by more than {ulps} ulp, e.g. "
        f"{got[bad][:3]} vs {want[bad][:3]}"
    )
