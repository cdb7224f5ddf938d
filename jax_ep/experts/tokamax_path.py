"""Grouped matmul through ``tokamax.ragged_dot`` (PyPI ``tokamax``: Pallas Mosaic-GPU and
Triton kernels), when it is installed. Never required: nothing else imports it.

The three products are tokamax's forward kernels, called with the dimension numbers of each
(forward, input gradient ``dy @ w[g]^T``, weight gradient ``a_g^T @ dy_g``), inside
:func:`jax_ep.experts.matmul.masked_matmul`'s ``custom_vjp`` rather than through tokamax's
own VJP, for three reasons found by reading tokamax 0.0.12: its backward rule does not trace
inside ``shard_map`` with ``check_vma=True`` (jax_ep's default), its Triton weight gradient of
an *empty* group reads the previous group's rows (so empty experts are zeroed here), and its
kernels leave rows past ``sum(sizes)`` unwritten. Its first call may autotune for minutes when
``--tokamax_autotuning_cache_miss_fallback=autotune``; the default is heuristics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_ep import _compat
from jax_ep.experts.matmul import masked_matmul

FORWARD = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [1]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
INPUT_GRAD = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
WEIGHT_GRAD = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
)


@functools.cache
def _tokamax():
    import tokamax
    from absl import flags

    # tokamax reads absl flags on its first call and would parse sys.argv (the caller's
    # command line, e.g. `--tokens 4096`) as its own flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def unsupported() -> str:
    """Why the tokamax path cannot run here ('' when it can be tried)."""
    try:
        _tokamax()
    except Exception as e:  # ImportError, or a tokamax that does not load with this jax
        return f"tokamax is not importable ({type(e).__name__}: {e})"
    return ""


def products(general):
    """(forward, backward) built on a ``ragged_dot_general``-like function ``general``."""

    def forward(a, w, sizes):
        y = general(a, w, sizes, FORWARD, preferred_element_type=a.dtype)
        return _compat.match_varying(y, a, w, sizes)[0]

    def backward(a, w, sizes, dy):
        da = general(dy, w, sizes, INPUT_GRAD, preferred_element_type=a.dtype)
        dw = general(a, dy, sizes, WEIGHT_GRAD, preferred_element_type=w.dtype)
        dw = jnp.where(sizes[:, None, None] > 0, dw, jnp.zeros((), dw.dtype))
        return _compat.match_varying(da, dy, w)[0], _compat.match_varying(dw, a, dy)[0]

    return forward, backward


def _general(*args, **kwargs):
    return _tokamax().ragged_dot_general(*args, **kwargs)


ragged_matmul = masked_matmul(*products(_general), "ragged")
