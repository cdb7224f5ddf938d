"""Expert FFN paths (jax_ep.experts) against a dense per-row SwiGLU: forward and gradients.

Padding rows (past each expert's valid rows) are filled with NaN, as a dispatch that does not
zero its unused capacity may leave them: the valid rows and every gradient must still match
the dense reference, which never sees the padding. Paths that run here (``ragged_dot``,
``einsum``, and the tokamax path's products driven by ``jax.lax.ragged_dot_general``) are
checked on CPU in float32 (tolerance 1e-5 of the largest value); the Mosaic GPU kernels run on
an sm_90 GPU only, in bf16 (tolerance 3e-2: bf16 rounds at different points than the dense
float32 reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HOPPER_SKIP_REASON, TOKAMAX_SKIP_REASON
from jax.sharding import PartitionSpec as P

from jax_ep import experts
from jax_ep.experts import matmul, tokamax_path

G, D, F = 4, 128, 64  # experts, hidden, FFN
SIZES = np.array([5, 0, 9, 3], np.int32)  # an empty expert, uneven loads
ROWS = 24  # ragged buffer rows (> sum(SIZES) = 17: 7 padding rows)
CAP = 10  # expert_major slots per expert


def _weights(seed=0, dtype=jnp.float32):
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    return (
        (jax.random.normal(k0, (G, D, F)) / np.sqrt(D)).astype(dtype),
        (jax.random.normal(k1, (G, D, F)) / np.sqrt(D)).astype(dtype),
        (jax.random.normal(k2, (G, F, D)) / np.sqrt(F)).astype(dtype),
    )


def _valid_rows(seed=1):
    """``[sum(SIZES), D]`` valid rows and the expert of each."""
    n = int(SIZES.sum())
    x = jax.random.normal(jax.random.key(seed), (n, D), jnp.float32)
    return x, np.repeat(np.arange(G), SIZES)


def _dense(x, expert, w0, w1, wo):
    """Per-row SwiGLU with that row's expert weights (no grouping at all)."""
    h0 = jnp.einsum("rd,rdf->rf", x, w0[expert])
    h1 = jnp.einsum("rd,rdf->rf", x, w1[expert])
    return jnp.einsum("rf,rfd->rd", jax.nn.silu(h0) * h1, wo[expert])


def _ragged(x):
    return jnp.concatenate([x, jnp.full((ROWS - x.shape[0], D), jnp.nan, x.dtype)])


def _expert_major(x, expert):
    slot = np.concatenate([np.arange(n) for n in SIZES])
    return jnp.full((G, CAP, D), jnp.nan, x.dtype).at[expert, slot].set(x)


def _unpack(y, expert):
    """Valid rows of a path's output, in the ragged order."""
    if y.ndim == 2:
        return y[: int(SIZES.sum())]
    slot = np.concatenate([np.arange(n) for n in SIZES])
    return y[expert, slot]


def _close(got, want, rtol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    scale = float(np.max(np.abs(want))) or 1.0
    err = float(np.max(np.abs(got - want)))
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3g} > {rtol} * {scale:.3g}"


def _check_path(ffn, layout, dtype=jnp.float32, rtol=1e-5, oracle=None):
    """``ffn(rows, sizes, w0, w1, wo)`` against :func:`_dense`, values and gradients; or, for
    a low-precision kernel, against ``oracle`` (same signature, same layout) in the same
    dtype: rounding the weights to bf16 moves every row the same way, so a float32 oracle
    would measure bf16 itself, not the kernel."""
    x, expert = _valid_rows()
    w = _weights()
    ct = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    pack = _ragged if layout == "ragged" else (lambda v: _expert_major(v, expert))

    def loss_path(x, w):
        y = ffn(pack(x.astype(dtype)), jnp.asarray(SIZES), *[a.astype(dtype) for a in w])
        return jnp.sum(_unpack(y, expert).astype(jnp.float32) * ct)

    def loss_dense(x, w):
        if oracle is not None:
            y = oracle(pack(x.astype(dtype)), jnp.asarray(SIZES), *[a.astype(dtype) for a in w])
            return jnp.sum(_unpack(y, expert).astype(jnp.float32) * ct)
        return jnp.sum(_dense(x, expert, *w) * ct)

    # the padding rows enter as constants: their gradients are not part of the comparison
    got = jax.jit(jax.value_and_grad(loss_path, argnums=(0, 1)))(x, w)
    want = jax.jit(jax.value_and_grad(loss_dense, argnums=(0, 1)))(x, w)
    _close(got[0], want[0], rtol, "loss")
    for name, g, ref in zip(
        ("x", "wi_0", "wi_1", "wo"), (got[1][0], *got[1][1]), (want[1][0], *want[1][1]), strict=True
    ):
        _close(g, ref, rtol, f"grad {name}")
    # an empty expert gets an exactly zero weight gradient
    for g in got[1][1]:
        assert not np.any(np.asarray(g)[1]), "the empty expert has a weight gradient"


def _xla_ragged_dot(x, sizes, w0, w1, wo):
    """The oracle of the bf16 kernels: XLA's ragged_dot path in the same dtype (only the
    accumulation order differs)."""
    return experts.swiglu(x, sizes, w0, w1, wo, path="ragged_dot")


@pytest.mark.parametrize("path", ["ragged_dot", "einsum"])
def test_xla_paths_match_dense_with_nan_padding(path):
    def ffn(x, sizes, w0, w1, wo):
        return experts.swiglu(x, sizes, w0, w1, wo, path=path)

    _check_path(ffn, experts.LAYOUTS[path])


def test_tokamax_products_are_the_right_ragged_dot_generals():
    # the tokamax path's three products, driven by jax's own ragged_dot_general on CPU
    mm = matmul.masked_matmul(*tokamax_path.products(jax.lax.ragged_dot_general), "ragged")

    def ffn(x, sizes, w0, w1, wo):
        h = jax.nn.silu(mm(x, w0, sizes)) * mm(x, w1, sizes)
        return mm(h, wo, sizes)

    _check_path(ffn, "ragged")


@pytest.mark.parametrize("path", ["ragged_dot", "einsum"])
def test_expert_ffn_converts_layouts(path):
    # ragged rows into an expert_major path and back (and the reverse): same values
    x, expert = _valid_rows()
    w = _weights()
    want = _dense(x, expert, *w)
    sizes = jnp.asarray(SIZES)
    for rows in (_ragged(x), _expert_major(x, expert)):
        y, dropped = experts.expert_ffn(rows, sizes, *w, path=path, capacity=CAP)
        _close(_unpack(y, expert), want, 1e-5, f"{path} on {rows.ndim}-d rows")
        assert int(dropped) == 0


def test_conversion_drops_are_counted_and_zero():
    x, expert = _valid_rows()
    em, kept, dropped = experts.ragged_to_expert_major(_ragged(x), jnp.asarray(SIZES), 4)
    np.testing.assert_array_equal(kept, np.minimum(SIZES, 4))
    assert int(dropped) == int(np.maximum(SIZES - 4, 0).sum())
    back = experts.expert_major_to_ragged(em, jnp.asarray(SIZES), ROWS)
    slot = np.concatenate([np.arange(n) for n in SIZES])
    keep = slot < 4
    np.testing.assert_array_equal(np.asarray(back)[: len(slot)][keep], np.asarray(x)[keep])
    assert not np.any(np.asarray(back)[: len(slot)][~keep]), "dropped rows must be zero"
    assert not np.any(np.asarray(back)[len(slot) :]), "rows past the valid ones are zero"


def test_resolve_picks_per_platform_and_checks_overrides():
    kw = dict(dtype=jnp.bfloat16, hidden=D, intermediate=F)
    assert experts.resolve("auto", platform="cpu", **kw) == "ragged_dot"
    assert experts.resolve("auto", platform="gpu", **kw) == "einsum"  # no load given
    assert experts.resolve("auto", platform="gpu", rows_per_expert=128, **kw) == "einsum"
    if not HOPPER_SKIP_REASON:  # many rows per expert: the Mosaic kernels, where they run
        assert experts.resolve("auto", platform="gpu", rows_per_expert=1024, **kw) == "mosaic"
    assert experts.resolve("einsum", **kw) == "einsum"
    with pytest.raises(ValueError, match="expert path"):
        experts.resolve("megablox", **kw)
    if jax.devices()[0].platform != "gpu":
        with pytest.raises(ValueError, match="NVIDIA GPU"):
            experts.resolve("mosaic", **kw)
    with pytest.raises(ValueError, match="computes on expert_major"):
        experts.swiglu(jnp.zeros((8, D)), jnp.asarray(SIZES), *_weights(), path="einsum")


@pytest.mark.skipif(bool(HOPPER_SKIP_REASON), reason=HOPPER_SKIP_REASON or "sm_90 present")
def test_mosaic_kernels_match_dense_on_hopper():
    def ffn(x, sizes, w0, w1, wo):
        return experts.swiglu(x, sizes, w0, w1, wo, path="mosaic")

    _check_path(ffn, "ragged", dtype=jnp.bfloat16, rtol=2e-2, oracle=_xla_ragged_dot)


@pytest.mark.parametrize("path", ["ragged_dot", "einsum"])
def test_replicated_weights_inside_shard_map_get_the_summed_gradient(path):
    # weights replicated over the EP axis, rows per rank: d(weights) sums every rank's part
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("ep",))
    x, expert = _valid_rows()
    w = _weights()
    pack = _ragged if experts.LAYOUTS[path] == "ragged" else (lambda v: _expert_major(v, expert))
    rows = jnp.stack([pack(x), pack(2 * x)])

    def loss(w, rows):
        def per_rank(rows, w):
            y = experts.swiglu(rows[0], jnp.asarray(SIZES), *w, path=path)
            return jax.lax.psum(jnp.sum(_unpack(y, expert)), "ep")

        return jax.shard_map(per_rank, mesh=mesh, in_specs=(P("ep"), P()), out_specs=P())(rows, w)

    got = jax.jit(jax.grad(loss))(w, rows)
    want = jax.grad(lambda w: jnp.sum(_dense(x, expert, *w)) + jnp.sum(_dense(2 * x, expert, *w)))(
        w
    )
    for g, ref, name in zip(got, want, ("wi_0", "wi_1", "wo"), strict=True):
        _close(g, ref, 1e-5, f"grad {name}")


@pytest.mark.skipif(bool(TOKAMAX_SKIP_REASON), reason=TOKAMAX_SKIP_REASON or "tokamax present")
def test_tokamax_kernels_match_dense_on_gpu():
    def ffn(x, sizes, w0, w1, wo):
        return experts.swiglu(x, sizes, w0, w1, wo, path="tokamax")

    _check_path(ffn, "ragged", dtype=jnp.bfloat16, rtol=2e-2, oracle=_xla_ragged_dot)
