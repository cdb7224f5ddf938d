"""The per-rank MoE layers the layer benchmark times, and their inputs (made on the device).

One layer = dispatch → SwiGLU experts → weighted combine, router excluded (the top-k ids and
weights are inputs; the backward differentiates the tokens, the router weights and the expert
weights). Three ways to run it per rank:

* :func:`jax_ep_layer`: :func:`jax_ep.dispatch` into the expert path's layout,
  :func:`jax_ep.experts.expert_ffn`, :func:`jax_ep.combine`;
* :func:`local_layer`: what a JAX user writes without expert parallelism (MaxText's
  ``RoutedMoE`` at EP=1): sort the (token, k) selections by expert, gather the rows, grouped
  GEMM, unsort, weighted sum over k;
* :func:`experts_only`: the expert FFN alone on rows already dispatched (the layer without its
  exchange: the difference is what dispatch + combine cost).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import experts
from jax_ep.capacity import dispatch_capacity


@dataclasses.dataclass(frozen=True)
class Shape:
    """One MoE layer's sizes (per rank: ``experts // ranks`` local experts)."""

    name: str
    experts: int
    topk: int
    hidden: int
    intermediate: int

    def expert_flops(self, tokens: int) -> float:
        """Useful forward FLOPs of the experts per rank: three GEMMs per (token, k) row."""
        return 2.0 * 3 * self.hidden * self.intermediate * tokens * self.topk


# DeepSeek-V3's routed experts (hidden 7168, expert FFN 2048, top-8 of 256), as one EP8
# rank's share run at EP=1 (32 experts) and as all experts on one GPU.
TARGETS = {
    "ep8-share": Shape("ep8-share", 32, 8, 7168, 2048),
    "all-experts": Shape("all-experts", 256, 8, 7168, 2048),
}


def _placed(setup, make):
    """``make(key)`` → ``[R, *shape]`` made on the device(s), one rank's block per EP device."""
    if setup.loopback:
        out = jax.sharding.SingleDeviceSharding(setup.mesh.devices.flat[0])
    else:
        out = NamedSharding(setup.mesh, P("ep"))
    return jax.jit(make, out_shardings=out)


def cotangent_like(setup, rows: jax.Array, seed: int):
    """A random cotangent shaped like ``rows`` (stacked per rank), made on the device."""
    return _placed(setup, lambda key: jax.random.normal(key, rows.shape, rows.dtype))(
        jax.random.key(seed)
    )


def routing_and_tokens(setup, shape: Shape, tokens: int, seed: int, dtype):
    """``x`` ``[R, T, D]``, uniform top-k ids (distinct) ``[R, T, K]``, normalised weights,
    and a cotangent ``[R, T, D]`` for the backward, all generated on the device."""
    R = setup.num_ranks

    def make(key):
        kx, ks, kc = jax.random.split(key, 3)
        x = jax.random.normal(kx, (R, tokens, shape.hidden), dtype)
        scores = jax.random.uniform(ks, (R, tokens, shape.experts), jnp.float32)
        w, idx = jax.lax.top_k(scores, shape.topk)
        w = w / jnp.sum(w, axis=-1, keepdims=True)
        ct = jax.random.normal(kc, (R, tokens, shape.hidden), dtype)
        return x, idx.astype(jnp.int32), w, ct

    return _placed(setup, make)(jax.random.key(seed))


def expert_weights(setup, shape: Shape, seed: int, dtype):
    """``wi_0``/``wi_1`` ``[R, E_loc, D, F]`` and ``wo`` ``[R, E_loc, F, D]`` on the device,
    one at a time (at 256 experts each is 7.5 GB in bf16)."""
    R, e_loc = setup.num_ranks, shape.experts // setup.num_ranks
    D, F = shape.hidden, shape.intermediate
    out = []
    for i, (a, b) in enumerate(((D, F), (D, F), (F, D))):

        def make(key, a=a, b=b):
            return (jax.random.normal(key, (R, e_loc, a, b), dtype) * a**-0.5).astype(dtype)

        out.append(_placed(setup, make)(jax.random.key(seed + i)))
    return tuple(out)


def jax_ep_layer(group, path: str, capacity_factor, dtype):
    """Per rank: ``(x, idx, w, wi_0, wi_1, wo) -> (out [T, D], num_dropped)``."""
    layout = experts.LAYOUTS[path]

    def layer(x, idx, w, wi_0, wi_1, wo):
        out = jax_ep.dispatch(
            x, idx, w, group=group, layout=layout, capacity_factor=capacity_factor
        )
        y, _ = experts.expert_ffn(out.x, out.counts, wi_0, wi_1, wo, path=path, dtype=dtype)
        return jax_ep.combine(y, out.handle, group=group), out.num_dropped

    return layer


def local_layer(num_experts: int, path: str, capacity_factor, dtype):
    """Per rank, no expert parallelism (MaxText ``RoutedMoE`` at EP=1), same signature."""

    def layer(x, idx, w, wi_0, wi_1, wo):
        num_tokens, k = idx.shape
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        rows = jnp.take(x, order // k, axis=0)
        sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
        capacity = dispatch_capacity(
            "expert_major",
            num_ranks=1,
            num_tokens=num_tokens,
            num_topk=k,
            num_experts=num_experts,
            capacity_factor=capacity_factor,
        )
        y, dropped = experts.expert_ffn(
            rows, sizes, wi_0, wi_1, wo, path=path, dtype=dtype, capacity=capacity
        )
        back = jnp.take(y, jnp.argsort(order), axis=0).reshape(num_tokens, k, -1)
        out = jnp.einsum("tk,tkd->td", w, back, preferred_element_type=jnp.float32)
        return out.astype(dtype), dropped

    return layer


def experts_only(path: str, dtype):
    """Per rank: ``(rows, counts, wi_0, wi_1, wo) -> (y, 0)`` on already dispatched rows."""

    def layer(rows, counts, wi_0, wi_1, wo):
        y, dropped = experts.expert_ffn(rows, counts, wi_0, wi_1, wo, path=path, dtype=dtype)
        return y, dropped

    return layer


def dispatched_rows(group, path: str, capacity_factor):
    """Per rank: ``(x, idx, w) -> (rows, counts)``: the expert inputs the layer would see."""
    layout = experts.LAYOUTS[path]

    def dispatch(x, idx, w):
        out = jax_ep.dispatch(
            x, idx, w, group=group, layout=layout, capacity_factor=capacity_factor
        )
        return out.x, out.counts

    return dispatch


def with_backward(layer, diff: tuple[int, ...]):
    """``layer(*args) -> (y, aux)`` → ``(*args, ct) -> (loss, grads of args[diff])``:
    forward and backward of ``sum(y * ct)`` (float32), the gradients returned like a training
    step's (they are materialised)."""

    def step(*args):
        *inputs, ct = args

        def loss(*d):
            full = list(inputs)
            for i, v in zip(diff, d, strict=True):
                full[i] = v
            y, _ = layer(*full)
            return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

        return jax.value_and_grad(loss, argnums=tuple(range(len(diff))))(*[inputs[i] for i in diff])

    return step
