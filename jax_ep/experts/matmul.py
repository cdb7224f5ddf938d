"""Grouped matmuls with a backward pass that never reads rows past the valid ones.

A grouped matmul multiplies the rows of each expert by that expert's weights:

* ragged layout: ``a`` ``[rows, K]`` grouped by expert, ``sizes`` ``[G]`` rows per expert
  (rows ``>= sum(sizes)`` are padding), ``w`` ``[G, K, N]`` → ``[rows, N]``;
* expert_major layout: ``a`` ``[G, C, K]``, the first ``sizes[g]`` rows of expert ``g`` are
  valid, ``w`` ``[G, K, N]`` → ``[G, C, N]``.

Padding rows hold whatever the dispatch left there (:class:`jax_ep.DispatchOut`: they are
unspecified, possibly NaN). The forward pass may compute on them (each output row depends on its
own input row only, and nobody reads those outputs); the backward pass may not: the weight
gradient sums over rows, where ``garbage * 0`` can be NaN. :func:`masked_matmul` therefore wraps
every implementation in one ``custom_vjp`` whose backward selects the padding rows of the input
and of the output cotangent to zero before the products. The cost, one select over each, lands
in the backward only, and XLA fuses it into the neighbouring elementwise work where it can.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_ep import _compat

Product = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
Backward = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def ragged_row_mask(a: jax.Array, sizes: jax.Array) -> jax.Array:
    """``[rows, 1]``: the row belongs to a group (``row < sum(sizes)``)."""
    return (jnp.arange(a.shape[0], dtype=jnp.int32) < jnp.sum(sizes))[:, None]


def expert_major_row_mask(a: jax.Array, sizes: jax.Array) -> jax.Array:
    """``[G, C, 1]``: slot ``c`` of expert ``g`` is below ``sizes[g]``."""
    return (jnp.arange(a.shape[1], dtype=jnp.int32)[None, :] < sizes[:, None])[..., None]


def row_mask(layout: str):
    return expert_major_row_mask if layout == "expert_major" else ragged_row_mask


def autodiff_backward(product: Product) -> Backward:
    """The backward of a differentiable ``product``: JAX's own transpose of it."""

    def backward(a, w, sizes, dy):
        _, vjp = jax.vjp(lambda a, w: product(a, w, sizes), a, w)
        return vjp(dy)

    return backward


def masked_matmul(product: Product, backward: Backward, layout: str) -> Product:
    """``product`` with a ``custom_vjp`` whose ``backward(a, w, sizes, dy) -> (da, dw)`` sees
    the padding rows of ``a`` and ``dy`` as zeros (module docstring). ``sizes`` gets no
    cotangent; ``da`` on padding rows is unspecified (nobody reads it)."""
    mask = row_mask(layout)

    @jax.custom_vjp
    def matmul(a, w, sizes):
        return product(a, w, sizes)

    def fwd(a, w, sizes):
        return product(a, w, sizes), (a, w, sizes)

    def bwd(res, dy):
        a, w, sizes = res
        valid = mask(a, sizes)
        a0 = jnp.where(valid, a, jnp.zeros((), a.dtype))
        dy0 = jnp.where(valid, dy.astype(a.dtype), jnp.zeros((), a.dtype))
        da, dw = backward(a0, w, sizes, dy0)
        da = _compat.cotangent_like(da.astype(a.dtype), a)
        return da, _compat.cotangent_like(dw.astype(w.dtype), w), None

    matmul.defvjp(fwd, bwd)
    return matmul


# ----------------------------------------------------------------------------
# the XLA paths (every platform)
# ----------------------------------------------------------------------------


def ragged_dot_product(a, w, sizes):
    """``jax.lax.ragged_dot``, output in the input dtype (float32 accumulation where the
    platform's dot does it: cuBLAS, XLA:CPU)."""
    return jax.lax.ragged_dot(a, w, sizes, preferred_element_type=a.dtype)


def einsum_product(a, w, sizes):
    """One batched matmul over the expert dimension of the expert_major layout."""
    del sizes  # every slot is computed; the capacity bounds the cost
    return jnp.einsum("gck,gkn->gcn", a, w, preferred_element_type=a.dtype)


ragged_dot = masked_matmul(ragged_dot_product, autodiff_backward(ragged_dot_product), "ragged")
einsum = masked_matmul(einsum_product, autodiff_backward(einsum_product), "expert_major")
