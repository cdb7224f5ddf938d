"""The ordering token: the device state of a group made visible to XLA.

The CUDA kernels keep per-rank sequence numbers and double-buffer parities in the
group's buffers; every rank must run its ops of a group one at a time and in the
same order. XLA only orders what data orders, so every op of a CUDA group takes the
group's *ordering token* (``[2]`` int32 per rank: the sequence number of the op that
produced it) as an operand and returns a new one, written by its last kernel. The
ops of a group inside one traced function form one chain through these tokens:
concurrent command buffers, latency-hiding reordering and CSE cannot pair the wrong
calls, and an op whose outputs are unused is only dropped with everything after it
(docs/protocol.md, "Ordering and lifetime").

:class:`OrderChain` threads the token implicitly, so the public ops keep their
signatures: it remembers the last token produced in each trace being built and hands
it to the next op traced there or in a trace nested inside it (the body of a ``scan``,
``cond`` or ``vmap``, the forward pass under ``jax.grad``), which closes over it. The
backward pass of an op takes its forward op's token. What a nested trace's ops
produce is not seen by the enclosing trace's later ops unless data carries it out
(e.g. the results of a ``scan`` over layers feed the next layer); ops whose results
feed each other (dispatch → combine, a send → its receive, one layer → the next) are
ordered by that data as well.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
from jax._src import core

from jax_ep import _compat

TOKEN_SHAPE = (2,)


def _current_trace():
    return core.trace_ctx.trace


def _ancestors(trace) -> list:
    """``trace`` and the traces it is nested in, innermost first."""
    out = []
    while trace is not None:
        out.append(trace)
        trace = getattr(trace, "parent_trace", None)
    return out


class OrderChain:
    """The last ordering token of one group in each trace being built (CUDA groups)."""

    def __init__(self) -> None:
        # (weakref to a trace, the last token produced in it), outermost first: only the
        # traces on the stack of the latest op are kept, so finished traces are released
        self._stack: list[tuple[weakref.ref, jax.Array]] = []

    def take(self, like: jax.Array, after: jax.Array | None = None) -> jax.Array:
        """The token the next op must take: the last one of this trace or of the nearest
        enclosing trace that has one, else a new root shaped like ``like``; ``after`` (a
        token this op must also follow, e.g. its forward op's in a backward pass) is
        merged in."""
        token = self._nearest(_ancestors(_current_trace()))
        if token is None:
            token = root_like(like)
        if after is not None and after is not token:
            # elementwise max: a data dependence on both that XLA cannot fold away
            token = jnp.maximum(token, after)
        return token

    def put(self, token: jax.Array) -> None:
        """Records the token an op returned (the next op of this trace takes it)."""
        if not isinstance(token, core.Tracer):  # eager: each call is its own program
            self._stack = []
            return
        stack = _ancestors(_current_trace())
        kept = [(ref, tok) for ref, tok in self._stack if ref() is not None and ref() in stack]
        kept = [(ref, tok) for ref, tok in kept if ref() is not stack[0]]
        self._stack = kept + [(weakref.ref(stack[0]), token)]

    def _nearest(self, stack: list):
        for trace in stack:
            for ref, token in reversed(self._stack):
                if ref() is trace:
                    return token
        return None


def root_like(like: jax.Array) -> jax.Array:
    """A fresh token (zeros) that varies over the same mesh axes as ``like`` and, under
    ``jax.vmap`` (loopback groups), carries its virtual-rank axis."""
    zero = jnp.sum(like.reshape(-1)[:1].astype(jnp.int32)) * 0
    token = jnp.zeros(TOKEN_SHAPE, jnp.int32) + zero
    (token,) = _compat.match_varying(token, like)[:1]
    return token
