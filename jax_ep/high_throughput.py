"""The high-throughput ops (training, prefill): validation, backend choice, custom VJPs.

Backends (:mod:`jax_ep.backends`) implement the forward pieces only; the gradients
are written once here in terms of them:

* dispatch's backward is a combine of the output cotangent (for the expert
  layouts with weight 1 per delivered row), plus a token combine that returns
  the router-weight cotangents to their home rank;
* combine's backward is a cached token dispatch of the output cotangent,
  followed by local work on the expert side: scaling by the router weights
  (cotangent of the expert outputs) and row dot products (cotangent of the
  router weights).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_ep import _compat, checks, validation
from jax_ep import fp8 as _fp8
from jax_ep.backends import backend_for, default_backend
from jax_ep.backends.spec import OpSpec
from jax_ep.capacity import DEFAULT_CAPACITY_FACTOR, dispatch_capacity
from jax_ep.group import order_chain
from jax_ep.handles import DispatchLayout, DispatchOut, Handle
from jax_ep.rows import pad_rows, take_rows

# ----------------------------------------------------------------------------
# get_dispatch_layout
# ----------------------------------------------------------------------------


def get_dispatch_layout(
    topk_idx: jax.Array,
    num_experts: int | None = None,
    *,
    num_ranks: int | None = None,
    group=None,
) -> DispatchLayout:
    """Tokens per rank, tokens per expert and the token-in-rank mask of ``topk_idx``.

    Args:
      topk_idx: ``[num_tokens, num_topk]`` integer expert ids, -1 = masked.
      num_experts, num_ranks: taken from ``group`` when given.
    Returns:
      :class:`DispatchLayout`: ``[R]`` and ``[E]`` int32 counts (a token counts
      once per rank and once per distinct expert) and a ``[T, R]`` bool mask.
      Local to each rank: no communication.
    """
    if group is not None:
        validation.check_group(group, "get_dispatch_layout")
        num_experts, num_ranks = group.num_experts, group.num_ranks
    if num_experts is None or num_ranks is None:
        raise ValueError("get_dispatch_layout needs num_experts and num_ranks (or group=)")
    validation.check_num_experts(num_experts, num_ranks)
    topk_idx, _ = validation.check_routing(topk_idx, None, None)
    backend = group.backend if group is not None else default_backend()
    out = backend_for(backend).layout(topk_idx, num_experts, num_ranks)
    host_checks = group.config.host_checks if group is not None else True
    if backend == "reference" and checks.wanted(host_checks, topk_idx):
        # the CUDA layout kernel reports bad ids from the device; the reference fails here
        # (deciding over the group's ranks together when the group's axis is bound)
        counts = checks.expert_id_guard(
            out.num_tokens_per_rank,
            topk_idx,
            num_experts,
            "get_dispatch_layout",
            group.axis_name if group is not None else None,
        )
        out = out._replace(num_tokens_per_rank=counts)
    return out


# ----------------------------------------------------------------------------
# high-throughput dispatch
# ----------------------------------------------------------------------------


def check_group_axis(group, op: str) -> int:
    """The EP axis size here, checked against the group's."""
    validation.check_group(group, op)
    num_ranks = validation.axis_size_or_raise(group.axis_name, op)
    if num_ranks != group.num_ranks:
        raise ValueError(
            f"jax_ep.{op}: axis {group.axis_name!r} has size {num_ranks} here but the "
            f"group was created for {group.num_ranks} ranks"
        )
    return num_ranks


def dispatch(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    *,
    group,
    layout: str = "expert_major",
    capacity: int | None = None,
    capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR,
    fp8: bool = False,
    round_scale: bool = False,
    dequantize: bool = False,
    on_overflow: str = "report",
) -> DispatchOut:
    """Send each token to the ranks that hold its top-k experts.

    Runs per rank inside ``shard_map``/``vmap`` over ``group.axis_name``.

    Args:
      x: ``[num_tokens, hidden]`` bf16/f16/f32 tokens of this rank.
      topk_idx: ``[num_tokens, num_topk]`` int expert ids in ``[0, num_experts)``, -1 = masked.
      topk_weights: ``[num_tokens, num_topk]`` router weights (float32 on the wire).
      layout: ``"expert_major"`` (``[E_loc, capacity, H]``), ``"ragged"`` (``[capacity, H]``
        grouped by expert: feed ``x`` and ``counts`` to ``jax.lax.ragged_dot``) or
        ``"per_rank"`` (DeepEP normal mode: one row per received token).
      capacity: static rows (per expert for expert_major); overrides ``capacity_factor``.
      capacity_factor: rows as a multiple of the balanced load (``T*K`` per rank for ragged,
        ``R*T*K/E`` per expert for expert_major), at most the worst case; ``None`` = the worst
        case, which never drops. per_rank always gets the worst case, ``R*T`` rows
        (:mod:`jax_ep.capacity`). Memory: :meth:`jax_ep.Group.memory_report`.
      fp8: quantise to float8_e4m3fn with one float32 scale per 128 channels before sending.
      round_scale: power-of-two scales (UE8M0-compatible).
      dequantize: with ``fp8``, return ``x`` dequantised to the input dtype (FP8 on the wire
        only); then the op is differentiable with a straight-through gradient.
      on_overflow: ``"report"`` (``num_dropped`` tells) or ``"error"`` (the step fails with a
        message giving the count; costs a device-to-host check).
    Returns:
      :class:`DispatchOut`. Its ``handle`` feeds :func:`combine`.
    """
    validation.check_tokens(x)
    topk_idx, topk_weights = validation.check_routing(topk_idx, topk_weights, x.shape[0])
    validation.check_layout(layout)
    validation.check_fp8(x.shape[1], fp8)
    validation.check_on_overflow(on_overflow)
    if dequantize and not fp8:
        raise ValueError("dequantize=True only makes sense with fp8=True")
    num_ranks = check_group_axis(group, "dispatch")
    num_tokens, num_topk = topk_idx.shape
    if capacity is None:
        capacity = dispatch_capacity(
            layout,
            num_ranks=num_ranks,
            num_tokens=num_tokens,
            num_topk=num_topk,
            num_experts=group.num_experts,
            capacity_factor=capacity_factor,
        )
    capacity = validation.check_capacity(capacity)
    group.check_fits(x.shape[1], x.dtype, num_tokens, num_topk, "dispatch")
    spec = group.spec(
        layout=layout, capacity=capacity, fp8=fp8, round_scale=round_scale, dequantize=dequantize
    )
    x, topk_idx, topk_weights = _compat.match_varying(x, topk_idx, topk_weights)
    out, token = _dispatch(spec, x, topk_idx, topk_weights, group.take_token(x))
    group.put_token(token)
    ox, oscales, oidx, ow, counts, dropped, handle = out
    if on_overflow == "error":
        counts = checks.overflow_guard(
            counts, dropped, f"dispatch(layout={layout!r}, capacity={capacity})", group.axis_name
        )
    return DispatchOut(ox, oscales, oidx, ow, counts, dropped, handle)


def _dispatch_impl(spec: OpSpec, x, topk_idx, topk_weights, token):
    out, token = backend_for(spec).dispatch(x, topk_idx, topk_weights, token, spec)
    if spec.fp8 and spec.dequantize:
        out = (_fp8.dequantize(out[0], out[1], x.dtype), None) + tuple(out[2:])
    return tuple(out), token


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dispatch(spec: OpSpec, x, topk_idx, topk_weights, token):
    return _dispatch_impl(spec, x, topk_idx, topk_weights, token)


def _dispatch_fwd(spec, x, topk_idx, topk_weights, token):
    out, token = _dispatch_impl(spec, x, topk_idx, topk_weights, token)
    return (out, token), (out[-1], jnp.zeros((0,), x.dtype), token)


def _first_occurrence_weights(rows: jax.Array) -> jax.Array:
    """``[RT, K]`` rows → 1.0 at the first k of each delivered row, else 0 (a token's copy once)."""
    k = rows.shape[1]
    same = rows[:, :, None] == rows[:, None, :]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [k, k'] k' < k
    dup = jnp.any(same & earlier[None], axis=2)
    return jnp.where((rows >= 0) & ~dup, 1.0, 0.0).astype(jnp.float32)


def _backward_token(spec: OpSpec, like: jax.Array, forward_token):
    """The token a backward op takes: after its forward op and the group's last op here."""
    chain = order_chain(spec)
    return forward_token if chain is None else chain.take(like, after=forward_token)


def _backward_done(spec: OpSpec, token) -> None:
    chain = order_chain(spec)
    if chain is not None:
        chain.put(token)


def _dispatch_bwd(spec: OpSpec, res, ct):
    handle, x_like, token = res
    (ct_x, _, _, ct_w, _, _, ct_handle), _ = ct
    b = backend_for(spec)
    token = _backward_token(spec, handle.recv_src, token)
    rt = handle.recv_src.shape[0]
    # router weights' cotangents, per received token, to go home with dx
    g = ct_handle.recv_weights
    if spec.layout == "per_rank":
        g = g + pad_rows(ct_w, rt)
    g = jnp.where(handle.recv_topk_idx >= 0, g, 0.0)
    # one exchange carries dx and dw, except between nodes (two then)
    carry = None if spec.spans_nodes else g
    if spec.fp8 and not spec.dequantize:
        # quantised payloads have no gradient; dequantize=True gives straight-through
        dx, carried = jnp.zeros((handle.num_tokens, ct_x.shape[-1]), x_like.dtype), None
    elif spec.layout == "per_rank":
        (dx, carried), token = b.token_combine(pad_rows(ct_x, rt), handle, token, spec, extra=carry)
    else:
        weights = _first_occurrence_weights(handle.recv_rows)
        (dx, carried), token = b.combine(ct_x, handle, weights, token, spec, extra=carry)
    if carried is None:
        (dw, _), token = b.token_combine(g, handle, token, spec)
    else:
        dw = carried
    _backward_done(spec, token)
    return dx.astype(x_like.dtype), None, dw, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


# ----------------------------------------------------------------------------
# high-throughput combine
# ----------------------------------------------------------------------------


def combine(
    y: jax.Array,
    handle: Handle,
    topk_weights: jax.Array | None = None,
    *,
    group,
) -> jax.Array:
    """Bring expert outputs back to their tokens' home ranks and reduce them.

    Args:
      y: expert outputs in the dispatch layout of ``handle`` (``DispatchOut.x``'s shape,
        bf16/f16/f32).
      handle: ``DispatchOut.handle``.
      topk_weights: ``[num_tokens, num_topk]`` home-side weights to use instead of the
        ones given to dispatch (expert layouts only; costs one small extra exchange).
    Returns:
      ``[num_tokens, hidden]`` in ``y``'s dtype. expert layouts:
      ``out[t] = Σ_k w[t,k] * y[expert_k, slot(t, k)]``; per_rank: ``out[t] = Σ_ranks y[row]``
      (unweighted, DeepEP semantics). Masked and dropped selections contribute nothing.
    """
    if not isinstance(handle, Handle):
        raise TypeError(
            f"handle must be DispatchOut.handle (a jax_ep.Handle), got {type(handle).__name__}"
        )
    validation.check_tokens(y.reshape(-1, y.shape[-1]) if y.ndim == 3 else y, "y")
    expected = (
        (handle.num_local_experts, handle.capacity)
        if handle.layout == "expert_major"
        else (handle.capacity,)
    )
    if y.shape[:-1] != expected:
        raise ValueError(
            f"y has shape {y.shape} but the {handle.layout} dispatch produced rows of "
            f"shape {expected + (y.shape[-1],)}"
        )
    check_group_axis(group, "combine")
    group.check_fits(y.shape[-1], y.dtype, handle.num_tokens, handle.topk_idx.shape[1], "combine")
    spec = group.spec(layout=handle.layout, capacity=handle.capacity)
    weights = handle.recv_weights
    if topk_weights is not None:
        if handle.layout == "per_rank":
            raise ValueError(
                "per_rank combine is an unweighted sum (DeepEP semantics); "
                "weight the rows before combine instead of passing topk_weights"
            )
        _, topk_weights = validation.check_routing(handle.topk_idx, topk_weights, None)
        recv, token = _token_dispatch(spec, topk_weights, handle, group.take_token(handle.recv_src))
        group.put_token(token)
        weights = jnp.where(handle.recv_topk_idx >= 0, recv, 0.0)
    y, weights = _compat.match_varying(y, weights)
    out, token = _combine(spec, y, weights, handle, group.take_token(y))
    group.put_token(token)
    return out


def _combine_impl(spec: OpSpec, y, weights, handle, token):
    (out, _), token = backend_for(spec).combine(y, handle, weights, token, spec)
    return out, token


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine(spec: OpSpec, y, weights, handle, token):
    return _combine_impl(spec, y, weights, handle, token)


def _combine_fwd(spec, y, weights, handle, token):
    out, token = _combine_impl(spec, y, weights, handle, token)
    return (out, token), (y, weights, handle, token)


def _expand_to_rows(d_tok: jax.Array, rows: jax.Array, weights: jax.Array, num_rows: int, dtype):
    """``dy[row] = Σ_{(i,k) → row} w[i,k] * d[i]`` (each row belongs to one token)."""
    rt, k = rows.shape
    target = jnp.where(rows >= 0, rows, num_rows).reshape(-1)
    tok = jnp.broadcast_to(jnp.arange(rt, dtype=jnp.int32)[:, None], rows.shape).reshape(-1)
    row_token = jnp.full((num_rows + 1,), -1, jnp.int32).at[target].set(tok, mode="drop")[:num_rows]
    row_w = jnp.zeros((num_rows + 1,), jnp.float32).at[target].add(weights.reshape(-1), mode="drop")
    got = take_rows(d_tok, row_token).astype(jnp.float32) * row_w[:num_rows, None]
    return got.astype(dtype)


def _row_dots(d_tok: jax.Array, y_rows: jax.Array, rows: jax.Array) -> jax.Array:
    """``g[i, k] = <d[i], y[rows[i, k]]>`` in float32 (0 where the row does not exist)."""
    cols = []
    for k in range(rows.shape[1]):
        y_k = take_rows(y_rows, rows[:, k]).astype(jnp.float32)
        cols.append(jnp.sum(d_tok.astype(jnp.float32) * y_k, axis=-1))
    return jnp.where(rows >= 0, jnp.stack(cols, axis=1), 0.0)


def _combine_bwd(spec: OpSpec, res, ct):
    y, weights, handle, token = res
    ct_out, _ = ct
    token = _backward_token(spec, handle.recv_src, token)
    # [RT, H] output cotangent per token
    d_tok, token = backend_for(spec).token_dispatch(ct_out, handle, token, spec)
    _backward_done(spec, token)
    if spec.layout == "per_rank":
        return pad_rows(d_tok, handle.capacity).astype(y.dtype), None, None, None
    hidden = y.shape[-1]
    y_rows = y.reshape(-1, hidden)
    dy = _expand_to_rows(d_tok, handle.recv_rows, weights, y_rows.shape[0], y.dtype).reshape(
        y.shape
    )
    dw = _row_dots(d_tok, y_rows, handle.recv_rows)
    return dy, dw, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _token_dispatch(spec: OpSpec, x, handle, token):
    return backend_for(spec).token_dispatch(x, handle, token, spec)


def _token_dispatch_fwd(spec, x, handle, token):
    out, token = backend_for(spec).token_dispatch(x, handle, token, spec)
    return (out, token), (handle, token)


def _token_dispatch_bwd(spec, res, ct):
    handle, token = res
    ct_out, _ = ct
    token = _backward_token(spec, handle.recv_src, token)
    (dx, _), token = backend_for(spec).token_combine(ct_out, handle, token, spec)
    _backward_done(spec, token)
    return dx, None, None


_token_dispatch.defvjp(_token_dispatch_fwd, _token_dispatch_bwd)
