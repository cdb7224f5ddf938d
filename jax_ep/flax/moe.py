"""``jax_ep.flax.MoE``: a routed mixture-of-experts layer (flax.nnx) on jax_ep's dispatch/combine.

Per EP rank the layer does::

    logits  = x @ gate.kernel                          # [T, E] float32
    routing = route(logits, ...)                        # top-k ids and weights (routing.py)
    rows    = dispatch(x, topk_idx, topk_weights)       # the expert path's layout + sizes [E_loc]
    h       = SwiGLU_e(rows) (jax_ep.experts)           # each row through its local expert
    y       = combine(h) (+ shared expert(x))           # [T, D]

Parameters follow MaxText's ``RoutedMoE`` (names and shapes): ``gate.kernel`` ``[D, E]``,
``wi_0``/``wi_1`` ``[E, D, F]``, ``wo`` ``[E, F, D]`` and, with ``mlp_bias=True`` (GPT-OSS),
``wi_0_bias``/``wi_1_bias`` ``[E, F]`` and ``wo_bias`` ``[E, D]``, with the expert dimension
annotated on the group's EP mesh axis (or tuple of axes) and placed there at creation,
whatever Flax's ``flax_always_shard_variable`` says; the gate and the shared expert are
replicated. With ``routing_bias=True`` the DeepSeek-V3 balancing bias is ``gate.bias`` ``[E]``,
a :class:`RoutingBias` variable (not an ``nnx.Param``: optimisers that update ``nnx.Param``
leave it alone), moved by :meth:`MoE.update_routing_bias`; with ``gate_bias=True`` (GPT-OSS)
``gate.bias`` is instead a trained ``nnx.Param`` added to the logits.
:func:`jax_ep.flax.load_maxtext_weights` copies a MaxText checkpoint's arrays in by name.

Calling conventions (the same module works in both):

* global: ``moe(x)`` with ``x`` ``[..., D]`` sharded on its leading dimension over the
  *token axes*: ``token_axes`` if given; else, for ``x`` typed with an Explicit mesh sharding,
  the axes its leading dimension is split over plus any EP axis missing from them; else every
  mesh axis. The layer wraps itself in ``jax.shard_map`` over the group's mesh (tokens
  replicated over the other axes, e.g. a tensor axis); each rank sees its token block and its
  ``E_loc`` experts, and the output comes back with ``x``'s sharding.
* per rank: inside a ``shard_map``/``vmap`` that binds the EP axis, ``x`` is the rank's block
  and the expert weights are either this rank's ``[E_loc, ...]`` slices (the usual case when
  the module's state came in through ``shard_map`` with its partition specs) or all ``[E, ...]``
  (the rank slices its own).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import experts as _experts
from jax_ep import mesh_axes
from jax_ep.capacity import DEFAULT_CAPACITY_FACTOR, dispatch_capacity
from jax_ep.experts import ACTIVATIONS, Activation
from jax_ep.flax import routing as _routing
from jax_ep.flax.exchange import (
    AllToAllExchange,
    Exchange,
    JaxEpExchange,
    RaggedAllToAllExchange,
)

IMPLS = ("jax_ep", "reference", "ragged_all_to_all", "all_to_all")

Initializer = Callable[..., jax.Array]


class RoutingBias(nnx.Variable):
    """DeepSeek-V3 expert bias ``[E]``: added to the scores for top-k selection only.

    Not trained by gradients; :meth:`MoE.update_routing_bias` moves it from the load.
    """


class ExpertLoad(nnx.Variable):
    """Tokens routed to each expert ``[E]`` float32 since the last bias update (all ranks)."""


class MoEAux(NamedTuple):
    """Side outputs of one :class:`MoE` call (global over the token shards).

    aux_loss: ``[]`` float32, ``aux_loss_coef * balance_loss`` (0 when the coefficient is 0);
      add it to the training loss.
    tokens_per_expert: ``[E]`` float32 tokens that chose each expert.
    num_dropped: ``[]`` int32 selections dropped for capacity (always 0 with
      ``capacity_factor=None``).
    """

    aux_loss: jax.Array
    tokens_per_expert: jax.Array
    num_dropped: jax.Array


def default_kernel_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Truncated normal with variance 1/fan_in, fan_in = ``shape[-2]`` (the contracted dim of
    ``[in, out]`` and ``[E, in, out]`` kernels; leading dims are batch dims)."""
    init = nnx.initializers.variance_scaling(
        1.0,
        "fan_in",
        "truncated_normal",
        in_axis=-2,
        out_axis=-1,
        batch_axis=tuple(range(len(shape) - 2)),
    )
    return init(key, shape, dtype)


def _param(
    init: Initializer,
    key: jax.Array,
    shape: Sequence[int],
    dtype,
    sharding: tuple,
    mesh: jax.sharding.Mesh | None,
) -> nnx.Param:
    """A Param annotated with ``sharding``; placed on ``mesh`` now when there is one."""
    value = init(key, tuple(shape), dtype)
    if mesh is None:  # loopback group: nothing to place on, keep the annotation
        return nnx.Param(value, out_sharding=sharding, eager_sharding=False)
    # eager_sharding explicit: placed on the mesh even where flax_always_shard_variable is off
    # (MaxText turns it off), so param[...].sharding is the mesh sharding users copy into
    return nnx.Param(value, out_sharding=sharding, mesh=mesh, eager_sharding=True)


class GateLogit(nnx.Module):
    """Router projection ``[D] → [E]`` computed in float32 (MaxText ``GateLogit`` names).

    kernel: ``[D, E]`` Param. bias: ``[E]`` :class:`RoutingBias` (``routing_bias``, selection
    only), a Param added to the logits (``logit_bias``, GPT-OSS), or None.
    """

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        *,
        routing_bias: bool,
        param_dtype,
        kernel_init: Initializer,
        mesh,
        rngs: nnx.Rngs,
        logit_bias: bool = False,
    ):
        if routing_bias and logit_bias:
            raise ValueError(
                "routing_bias (DeepSeek: selection only) and gate_bias (GPT-OSS: a trained "
                "logit bias) are two meanings of gate.bias: choose one"
            )
        self.kernel = _param(
            kernel_init, rngs.params(), (hidden, num_experts), param_dtype, (None, None), mesh
        )
        if logit_bias:
            self.bias = _param(_zeros, None, (num_experts,), param_dtype, (None,), mesh)
        elif routing_bias:
            self.bias = RoutingBias(jnp.zeros((num_experts,), jnp.float32))
        else:
            self.bias = None

    @property
    def logit_bias(self) -> bool:
        """Whether ``bias`` is added to the logits (GPT-OSS) rather than steering selection."""
        return isinstance(self.bias, nnx.Param)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., D]`` → ``[..., E]`` float32 logits (with the logit bias, if any)."""
        logits = jnp.dot(x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        if self.logit_bias:
            logits = logits + self.bias[...].astype(jnp.float32)
        return logits


def _zeros(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


class SharedExpert(nnx.Module):
    """A gated FFN on every token (the layer's activation, no clipping, as MaxText's
    ``MlpBlock``): ``wi_0``/``wi_1`` ``[D, F]``, ``wo`` ``[F, D]``."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        *,
        param_dtype,
        kernel_init: Initializer,
        mesh,
        rngs: nnx.Rngs,
    ):
        self.wi_0 = _param(
            kernel_init, rngs.params(), (hidden, intermediate), param_dtype, (None, None), mesh
        )
        self.wi_1 = _param(
            kernel_init, rngs.params(), (hidden, intermediate), param_dtype, (None, None), mesh
        )
        self.wo = _param(
            kernel_init, rngs.params(), (intermediate, hidden), param_dtype, (None, None), mesh
        )


class _Weights(NamedTuple):
    """The arrays one MoE call reads (a pytree to pass through ``shard_map``)."""

    gate: jax.Array
    bias: jax.Array | None  # selection-only (DeepSeek)
    wi_0: jax.Array
    wi_1: jax.Array
    wo: jax.Array
    shared: tuple[jax.Array, jax.Array, jax.Array] | None
    logit_bias: jax.Array | None = None  # added to the logits (GPT-OSS)
    expert_bias: tuple[jax.Array, jax.Array, jax.Array] | None = None  # wi_0/wi_1/wo biases


@dataclasses.dataclass(frozen=True)
class _Router:
    num_topk: int
    score_func: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    group_score: str = "top2_sum"

    def __call__(self, logits, bias, logit_bias=None):
        return _routing.route(
            logits,
            num_topk=self.num_topk,
            score_func=self.score_func,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            bias=bias,
            group_score=self.group_score,
            logit_bias=logit_bias,
        )


def _dense_ffn(x, wi_0, wi_1, wo, dtype, act: Activation):
    """The shared expert: ``act(x @ wi_0, x @ wi_1) @ wo`` on every token, float32
    accumulation (the routed experts run through :mod:`jax_ep.experts`)."""

    def dense(a, w):
        return jnp.dot(a, w.astype(dtype), preferred_element_type=jnp.float32)

    h = act(dense(x, wi_0), dense(x, wi_1)).astype(dtype)
    return dense(h, wo).astype(dtype)


def _axis_bound(axis_name) -> bool:
    """All of the EP axis is bound here (a per-rank call), or none of it (a global call)."""
    bound = mesh_axes.bound(axis_name)
    if bound and len(bound) != len(mesh_axes.names(axis_name)):
        missing = tuple(n for n in mesh_axes.names(axis_name) if n not in bound)
        raise ValueError(
            f"MoE: the EP axis {axis_name!r} is only partly bound here ({missing} is not): call "
            "the layer inside a shard_map/vmap that binds all of it, or outside any"
        )
    return bool(bound)


def _same_spec(a: P, b: P) -> bool:
    def norm(spec):
        parts = list(spec)
        while parts and parts[-1] is None:
            parts.pop()
        return tuple(parts)

    return norm(a) == norm(b)


def _place(a: jax.Array, mesh: jax.sharding.Mesh, spec: P) -> jax.Array:
    """``a`` laid out as ``spec`` on ``mesh`` for the layer's ``shard_map``.

    On an Explicit mesh ``a`` is moved there unless its type already says so (shard_map
    refuses a mismatch); Auto meshes let shard_map place inputs itself. ``jax.device_put``
    rather than ``jax.reshard``: eagerly (also under an eager ``jax.grad``) it also copies an
    array that sits on other devices (a weight put on one device, say) onto the mesh; under
    ``jit`` it reshards.
    """
    if not mesh.are_all_axes_explicit:
        if not isinstance(a, jax.core.Tracer) and a.sharding.device_set == set(mesh.devices.flat):
            return a
        return jax.device_put(a, NamedSharding(mesh, spec))
    have = getattr(jax.typeof(a), "sharding", None)
    if have is not None and getattr(have, "mesh", None) == mesh and _same_spec(have.spec, spec):
        return a
    return jax.device_put(a, NamedSharding(mesh, spec))


def _explicit_spec(a: jax.Array, mesh: jax.sharding.Mesh) -> P | None:
    """The PartitionSpec ``a`` is typed with on an Explicit ``mesh`` (None when its type says
    nothing: Auto axes, no mesh); a different mesh is an error naming both."""
    have = getattr(jax.typeof(a), "sharding", None)
    have_mesh = getattr(have, "mesh", None)
    if have_mesh is None or have_mesh.empty or not have_mesh.explicit_axes:
        return None
    if have_mesh.shape_tuple != mesh.abstract_mesh.shape_tuple:
        raise ValueError(
            f"MoE: x is sharded on the mesh {mesh_axes.describe(have_mesh)} but the layer's "
            f"group lives on {mesh_axes.describe(mesh)}"
        )
    return have.spec


def _check_context_mesh(mesh: jax.sharding.Mesh) -> None:
    """A mesh context (``jax.set_mesh``) must be the group's mesh (or absent)."""
    ctx = jax.sharding.get_abstract_mesh()
    if not ctx.empty and ctx.shape_tuple != mesh.abstract_mesh.shape_tuple:
        raise ValueError(
            f"MoE: the mesh context (jax.set_mesh) is {mesh_axes.describe(ctx)} but the "
            f"layer's group lives on {mesh_axes.describe(mesh)}: call the layer under the "
            "group's mesh (or none)"
        )


def _global_token_axes(x: jax.Array, mesh, ep_axis, token_axes) -> tuple[str, ...]:
    """The mesh axes a global call splits ``x``'s leading dimension over (checked)."""
    ep = mesh_axes.names(ep_axis)
    if token_axes is None:
        spec = _explicit_spec(x, mesh)
        if spec is None:
            token_axes = tuple(mesh.axis_names)
        else:
            have = mesh_axes.names(spec[0]) if len(spec) and spec[0] is not None else ()
            token_axes = have + tuple(a for a in ep if a not in have)
    mesh_axes.check_in_mesh(mesh, token_axes, "MoE token_axes")
    missing = tuple(a for a in ep if a not in token_axes)
    if missing:
        raise ValueError(
            f"MoE token_axes {token_axes!r} leave out the EP axis {missing!r} of the mesh "
            f"{mesh_axes.describe(mesh)}: each EP rank dispatches its own tokens, so the tokens "
            "must be split over every EP axis"
        )
    shards = mesh_axes.size(mesh, token_axes)
    if not jax.export.is_symbolic_dim(x.shape[0]) and x.shape[0] % shards:
        raise ValueError(
            f"MoE: x's leading dimension {x.shape[0]} does not split over the token axes "
            f"{token_axes!r} ({shards} shards of the mesh {mesh_axes.describe(mesh)})"
        )
    return token_axes


class MoE(nnx.Module):
    """Routed MoE layer with expert parallelism over a :class:`jax_ep.Group`.

    Args:
      hidden: model dim ``D``.
      intermediate: expert FFN dim ``F``.
      num_experts: ``E`` (the group's).
      num_topk: ``K`` (at most the group's ``num_topk``).
      group: the EP group: its mesh, EP axis (``"ep"`` by default, or a tuple of mesh axes)
        and backend. Create it outside ``jit`` with ``num_max_tokens_per_rank`` >= tokens per
        rank per call.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      impl: ``"jax_ep"`` (the group's backend), ``"reference"`` (jax_ep's pure-JAX backend on
        the same mesh), ``"ragged_all_to_all"`` (MaxText's path, :mod:`jax_ep.baselines`),
        ``"all_to_all"`` (padded all_to_all baseline), or an :class:`Exchange` instance.
      score_func: ``"softmax"``, ``"sigmoid"`` or ``"sqrtsoftplus"`` (DeepSeek-V4).
      n_group, topk_group: DeepSeek group-limited routing (1, 1 = off).
      group_score: how group-limited routing scores a group: ``"top2_sum"`` (the sum of its
        two best biased scores: DeepSeek-V3's reference and MaxText) or ``"max"`` (its best
        score: DeepSeek-V2).
      norm_topk_prob: renormalise the top-k weights to sum to 1.
      routed_scaling_factor: multiplies the routed experts' weights.
      aux_loss_coef: coefficient of the balancing loss (:func:`routing.balance_loss`). The
        weighted loss is in ``MoEAux.aux_loss`` (``return_aux=True``) and, when > 0 and the call
        runs under ``nnx.capture(..., nnx.Intermediate)``, sown as ``"aux_loss"``.
      routing_bias: keep a DeepSeek-V3 selection bias ``gate.bias`` and count the load in
        ``expert_load`` (an :class:`ExpertLoad` variable) for :meth:`update_routing_bias`.
      gate_bias: a trained router bias ``gate.bias`` (an ``nnx.Param``) added to the logits
        (GPT-OSS); excludes ``routing_bias``.
      mlp_bias: expert biases ``wi_0_bias``/``wi_1_bias`` ``[E, F]`` and ``wo_bias`` ``[E, D]``
        added after each expert matmul (GPT-OSS).
      activation: the expert FFN's gated activation: ``"silu"`` (SwiGLU), ``"gelu"``
        (GeGLU) or ``"gpt_oss"`` (``h0 * sigmoid(activation_alpha * h0) * (h1 + 1)``).
      activation_limit: clip the FFN's pre-activations first (``h0 <= limit``,
        ``|h1| <= limit``; GPT-OSS 7.0, DeepSeek-V4 10.0); None = no clipping.
      activation_alpha: the sigmoid's slope of ``activation="gpt_oss"``.
      shared_intermediate: FFN dim of a shared expert (0 = none).
      fp8: FP8 dispatch (e4m3 on the wire, dequantised at the expert, straight-through
        gradient); needs ``D % 128 == 0``. jax_ep impls only.
      capacity_factor: expert rows = factor × the balanced load (``T*K`` rows per rank, or
        ``R*T*K/E`` per expert for expert_major; :mod:`jax_ep.capacity`); None = the worst case
        (never drops). Overflow is counted in ``MoEAux.num_dropped``.
      expert_path: how the routed experts compute (:mod:`jax_ep.experts`): ``"auto"`` (the
        platform's measured best: on GPUs batched einsum on expert_major rows, or the
        Mosaic kernels on sm_90 for bf16/f16 from ``MIN_ROWS_PER_EXPERT["mosaic"]`` rows per
        expert; ``jax.lax.ragged_dot`` elsewhere), ``"ragged_dot"``, ``"einsum"``,
        ``"mosaic"`` (jax's Hopper grouped-GEMM kernels, bf16) or ``"tokamax"`` (if
        installed). jax_ep impls dispatch straight into the path's layout; the baselines'
        ragged rows are regrouped.
      low_latency: default path for calls: :func:`jax_ep.low_latency_dispatch`/``_combine``
        (decoding). jax_ep impls only. Overridable per call.
      low_latency_group: group for the low-latency path (created with ``low_latency=True``;
        ``num_max_low_latency_tokens_per_rank`` = decode tokens per rank); default ``group``.
      token_axes: mesh axes the tokens are split over. Global calls: the axes ``x``'s leading
        dimension is split over (it must include every EP axis; default: ``x``'s own split
        on an Explicit mesh, plus the EP axes, else every mesh axis). Per-rank calls: the axes
        the global balancing statistics sum over (default: the EP axes).
      ragged_all_to_all_emulation: for ``impl="ragged_all_to_all"``: replace
        ``jax.lax.ragged_all_to_all`` by a dense emulation. None = only where every device is
        a CPU (XLA:CPU lacks the op, jax-ml/jax#34755), with a warning.
      dtype: compute dtype of the experts and of the dispatched payload (router is float32).
      param_dtype: parameter dtype.
      kernel_init: initializer of every kernel (fan-in over dim -2).
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        num_topk: int,
        *,
        group: jax_ep.Group,
        rngs: nnx.Rngs,
        impl: str | Exchange = "jax_ep",
        score_func: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        aux_loss_coef: float = 0.0,
        routing_bias: bool = False,
        group_score: str = "top2_sum",
        gate_bias: bool = False,
        mlp_bias: bool = False,
        activation: str = "silu",
        activation_limit: float | None = None,
        activation_alpha: float = 1.702,
        shared_intermediate: int = 0,
        fp8: bool = False,
        capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR,
        expert_path: str = "auto",
        low_latency: bool = False,
        low_latency_group: jax_ep.Group | None = None,
        token_axes: Sequence[str] | None = None,
        ragged_all_to_all_emulation: bool | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer | None = None,
    ):
        if not isinstance(group, jax_ep.Group):
            raise TypeError(f"group must be a jax_ep.Group, got {type(group).__name__}")
        if group.num_experts != num_experts:
            raise ValueError(
                f"num_experts={num_experts} but the group was created for {group.num_experts}"
            )
        if num_topk > group.num_topk:
            raise ValueError(f"num_topk={num_topk} exceeds the group's num_topk={group.num_topk}")
        if fp8 and hidden % 128:
            raise ValueError(f"fp8 dispatch needs hidden % 128 == 0, got hidden={hidden}")
        if score_func not in _routing.SCORE_FUNCS:
            raise ValueError(
                f"score_func must be one of {_routing.SCORE_FUNCS}, got {score_func!r}"
            )
        if group_score not in _routing.GROUP_SCORES:
            raise ValueError(
                f"group_score must be one of {_routing.GROUP_SCORES}, got {group_score!r}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if activation == "gpt_oss" and shared_intermediate > 0:
            raise ValueError(
                "activation='gpt_oss' has no shared-expert form (GPT-OSS has no shared expert)"
            )
        self.hidden = hidden
        self.intermediate = intermediate
        self.num_experts = num_experts
        self.num_topk = num_topk
        self.group = group
        self.axis_name = group.axis_name
        self.aux_loss_coef = float(aux_loss_coef)
        self.fp8 = fp8
        self.low_latency = low_latency
        self.token_axes = (
            mesh_axes.names(mesh_axes.normalize(token_axes, "MoE token_axes"))
            if token_axes is not None
            else None
        )
        self.dtype = dtype
        for g in (group, low_latency_group):
            too_narrow = g is not None and g.dtype.itemsize < jnp.dtype(dtype).itemsize
            if too_narrow and g.backend == "cuda":
                raise ValueError(
                    f"MoE(dtype={jnp.dtype(dtype).name}) dispatches {jnp.dtype(dtype).name} rows, "
                    f"but the jax_ep.Group buffers hold {g.dtype.name}: create the Group with "
                    f"dtype={jnp.dtype(dtype).name}"
                )
        exchange = _make_exchange(
            impl, group, num_experts, fp8, capacity_factor, ragged_all_to_all_emulation
        )
        self.impl = impl if isinstance(impl, str) else exchange.name
        ll_group = low_latency_group if low_latency_group is not None else group
        if impl == "reference":
            ll_group = _reference_twin(ll_group)
        if low_latency and not isinstance(exchange, JaxEpExchange):
            raise ValueError("low_latency=True needs impl='jax_ep' or 'reference'")
        router = _Router(
            num_topk,
            score_func,
            n_group,
            topk_group,
            norm_topk_prob,
            float(routed_scaling_factor),
            group_score,
        )
        self.expert_path = _experts.resolve(
            expert_path,
            dtype=dtype,
            hidden=hidden,
            intermediate=intermediate,
            platform=group.devices[0].platform,
            # the balanced load of a local expert at the group's token bound
            rows_per_expert=(
                group.num_ranks * group.num_max_tokens_per_rank * num_topk / num_experts
            ),
        )
        self.plan = _Plan(
            hidden,
            num_experts,
            num_topk,
            group.num_ranks,
            group.axis_name,
            router,
            self.aux_loss_coef,
            fp8,
            jnp.dtype(dtype),
            exchange,
            ll_group,
            self.expert_path,
            capacity_factor,
            Activation(activation, activation_limit, float(activation_alpha)),
        )

        # creation may run without a mesh context: place annotated params on the group's mesh
        mesh = group.mesh if group.loopback is None else None
        init = kernel_init or default_kernel_init
        expert_axes = (self.axis_name, None, None)
        self.gate = GateLogit(
            hidden,
            num_experts,
            routing_bias=routing_bias,
            param_dtype=param_dtype,
            kernel_init=init,
            mesh=mesh,
            rngs=rngs,
            logit_bias=gate_bias,
        )
        self.wi_0 = _param(
            init, rngs.params(), (num_experts, hidden, intermediate), param_dtype, expert_axes, mesh
        )
        self.wi_1 = _param(
            init, rngs.params(), (num_experts, hidden, intermediate), param_dtype, expert_axes, mesh
        )
        self.wo = _param(
            init, rngs.params(), (num_experts, intermediate, hidden), param_dtype, expert_axes, mesh
        )
        if mlp_bias:  # MaxText: ("exp", "activation_mlp") / ("exp", "activation_embed")
            bias_axes = (self.axis_name, None)
            self.wi_0_bias = _param(
                _zeros, None, (num_experts, intermediate), param_dtype, bias_axes, mesh
            )
            self.wi_1_bias = _param(
                _zeros, None, (num_experts, intermediate), param_dtype, bias_axes, mesh
            )
            self.wo_bias = _param(_zeros, None, (num_experts, hidden), param_dtype, bias_axes, mesh)
        else:
            self.wi_0_bias = self.wi_1_bias = self.wo_bias = None
        self.shared_experts = (
            SharedExpert(
                hidden,
                shared_intermediate,
                param_dtype=param_dtype,
                kernel_init=init,
                mesh=mesh,
                rngs=rngs,
            )
            if shared_intermediate > 0
            else None
        )
        self.expert_load = (
            ExpertLoad(jnp.zeros((num_experts,), jnp.float32)) if routing_bias else None
        )

    @property
    def exchange(self) -> Exchange:
        """The token exchange that ``impl`` selected."""
        return self.plan.exchange

    def _weights(self) -> _Weights:
        shared = None
        if self.shared_experts is not None:
            s = self.shared_experts
            shared = (s.wi_0[...], s.wi_1[...], s.wo[...])
        bias = logit_bias = expert_bias = None
        if self.gate.bias is not None:
            if self.gate.logit_bias:
                logit_bias = self.gate.bias[...]
            else:
                bias = self.gate.bias[...]
        if self.wi_0_bias is not None:
            expert_bias = (self.wi_0_bias[...], self.wi_1_bias[...], self.wo_bias[...])
        return _Weights(
            self.gate.kernel[...],
            bias,
            self.wi_0[...],
            self.wi_1[...],
            self.wo[...],
            shared,
            logit_bias,
            expert_bias,
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        low_latency: bool | None = None,
        return_aux: bool = False,
    ) -> jax.Array | tuple[jax.Array, MoEAux]:
        """Apply the layer.

        Args:
          x: ``[..., D]`` tokens: the global batch (split over the token axes on its leading
            dim, see the class docstring; other placements are resharded first, and the output
            gets ``x``'s placement back) or, inside ``shard_map``/``vmap`` over the EP axis,
            this rank's block.
          low_latency: use the low-latency ops (decoding); default: the module's setting.
          return_aux: also return :class:`MoEAux`.
        Returns:
          ``[..., D]`` in ``dtype`` (and :class:`MoEAux` with ``return_aux``).
        """
        if x.shape[-1] != self.hidden:
            raise ValueError(f"x has {x.shape[-1]} features, the layer was built for {self.hidden}")
        use_ll = self.low_latency if low_latency is None else low_latency
        if use_ll and not isinstance(self.plan.exchange, JaxEpExchange):
            raise ValueError(f"low_latency needs impl='jax_ep' or 'reference', not {self.impl!r}")
        w = self._weights()
        if _axis_bound(self.axis_name):
            token_axes = self.token_axes or mesh_axes.names(self.axis_name)
            y, aux = self.plan.per_rank(w, x, use_ll, token_axes)
        else:
            y, aux = self._global(w, x, use_ll)
        if self.expert_load is not None:
            self.expert_load[...] = self.expert_load[...] + aux.tokens_per_expert
        if self.aux_loss_coef > 0 and hasattr(self, "__captures__"):
            # only inside nnx.capture (which sets __captures__): flax 0.12 deprecates sow
            # outside it, where it would also grow a tuple attribute on every call
            self.sow(nnx.Intermediate, "aux_loss", aux.aux_loss)
        return (y, aux) if return_aux else y

    def update_routing_bias(self, rate: float) -> None:
        """DeepSeek-V3 balancing step: ``gate.bias += rate * sign(mean_load - load)`` from the
        load counted since the last update, then reset the count. Call after the optimiser
        step (it is no gradient update)."""
        if self.gate.bias is None or self.expert_load is None:
            raise ValueError("update_routing_bias needs MoE(..., routing_bias=True)")
        self.gate.bias[...] = _routing.routing_bias_update(
            self.gate.bias[...], self.expert_load[...], rate
        )
        self.expert_load[...] = jnp.zeros_like(self.expert_load[...])

    def _global(self, w: _Weights, x: jax.Array, use_ll: bool):
        mesh = self.group.mesh
        if mesh is None or self.group.loopback is not None:
            raise ValueError(
                "a loopback group has no mesh: call the MoE per rank inside "
                f"jax.vmap(..., axis_name={self.axis_name!r})"
            )
        _check_context_mesh(mesh)
        token_axes = _global_token_axes(x, mesh, self.axis_name, self.token_axes)
        fn, x_spec, w_specs = _global_call(
            self.plan,
            mesh,
            use_ll,
            x.ndim,
            token_axes,
            tuple(a is not None for a in (w.bias, w.shared, w.logit_bias, w.expert_bias)),
        )
        home = _explicit_spec(x, mesh) if mesh.are_all_axes_explicit else None
        w = jax.tree.map(lambda a, spec: _place(a, mesh, spec), w, w_specs)
        y, aux = fn(w, _place(x, mesh, x_spec))
        if home is not None and not _same_spec(home, x_spec):  # back to x's own placement
            y = jax.device_put(y, NamedSharding(mesh, home))
        return y, aux


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one MoE layer: what a trace depends on besides the arrays.

    Hashable (the exchange and groups by identity), so a jitted global call is cached per plan.
    """

    hidden: int
    num_experts: int
    num_topk: int
    num_ranks: int
    axis_name: Any
    router: _Router
    aux_loss_coef: float
    fp8: bool
    dtype: Any
    exchange: Exchange
    low_latency_group: jax_ep.Group
    expert_path: str = "ragged_dot"
    capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR
    activation: Activation = _experts.SWIGLU

    def per_rank(self, w: _Weights, x: jax.Array, use_ll: bool, token_axes: tuple):
        """One rank's layer; ``x`` ``[..., D]`` is this rank's token block. Returns (y, aux)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.hidden).astype(self.dtype)
        w = self.local_experts(w)
        # the router runs in float32 whatever the compute dtype (top-k is sensitive to rounding)
        logits = jnp.dot(x.astype(jnp.float32), w.gate.astype(jnp.float32))
        route = self.router(logits, w.bias, w.logit_bias)
        if use_ll:
            y, dropped = self.experts_low_latency(w, x, route)
        else:
            y, dropped = self.experts_high_throughput(w, x, route)
        if w.shared is not None:
            shared = _dense_ffn(x, *w.shared, self.dtype, self.activation.unclipped())
            y = (y.astype(jnp.float32) + shared.astype(jnp.float32)).astype(self.dtype)
        tokens_per_expert, score_sum = _routing.balance_statistics(route, self.num_experts)
        stats = (tokens_per_expert, score_sum, jnp.float32(x.shape[0]), dropped)
        tokens_per_expert, score_sum, num_tokens, dropped = jax.lax.psum(stats, token_axes)
        loss = jnp.float32(0.0)
        if self.aux_loss_coef > 0:
            loss = self.aux_loss_coef * _routing.balance_loss(
                tokens_per_expert, score_sum, num_tokens, self.num_topk
            )
        return y.reshape(lead + (self.hidden,)), MoEAux(loss, tokens_per_expert, dropped)

    def local_experts(self, w: _Weights) -> _Weights:
        """This rank's ``[E_loc, ...]`` expert weights (sliced here if given all ``E``)."""
        e_loc = self.num_experts // self.num_ranks
        if w.wi_0.shape[0] == e_loc:
            return w
        if w.wi_0.shape[0] != self.num_experts:
            raise ValueError(
                f"expert weights have {w.wi_0.shape[0]} experts; expected "
                f"{e_loc} (this rank's) or {self.num_experts}"
            )
        start = jax.lax.axis_index(self.axis_name) * e_loc

        def take(a):
            return jax.lax.dynamic_slice_in_dim(a, start, e_loc, axis=0)

        expert_bias = None if w.expert_bias is None else tuple(map(take, w.expert_bias))
        return w._replace(
            wi_0=take(w.wi_0), wi_1=take(w.wi_1), wo=take(w.wo), expert_bias=expert_bias
        )

    def experts_high_throughput(self, w: _Weights, x: jax.Array, route: _routing.Routing):
        layout = _experts.LAYOUTS[self.expert_path]
        if layout in self.exchange.layouts and layout != "ragged":
            rows = self.exchange.dispatch(x, route.topk_idx, route.topk_weights, layout=layout)
        else:
            rows = self.exchange.dispatch(x, route.topk_idx, route.topk_weights)
        capacity = dispatch_capacity(
            "expert_major",
            num_ranks=self.num_ranks,
            num_tokens=x.shape[0],
            num_topk=self.num_topk,
            num_experts=self.num_experts,
            capacity_factor=self.capacity_factor,
        )
        y, regroup_dropped = self.expert_ffn(w, rows.x, rows.group_sizes, capacity)
        y = self.exchange.combine(y, route.topk_weights, rows)
        return y, rows.num_dropped + regroup_dropped

    def expert_ffn(self, w: _Weights, rows, counts, capacity: int | None = None):
        """The gated expert FFN on dispatched rows (this plan's path, activation, biases)."""
        return _experts.expert_ffn(
            rows,
            counts,
            w.wi_0,
            w.wi_1,
            w.wo,
            path=self.expert_path,
            dtype=self.dtype,
            capacity=capacity,
            activation=self.activation,
            bias=w.expert_bias,
        )

    def experts_low_latency(self, w: _Weights, x: jax.Array, route: _routing.Routing):
        group = self.low_latency_group
        out = jax_ep.low_latency_dispatch(x, route.topk_idx, group=group, fp8=self.fp8)
        rows = out.x
        if out.scales is not None:
            rows = jax_ep.dequantize_fp8(rows, out.scales, self.dtype)
        # the receive layout is expert_major; rows past counts[e] may hold anything (NaN
        # included): jax_ep.experts never lets them reach a valid row or a gradient
        y, _ = self.expert_ffn(w, rows, out.counts)
        y = jax_ep.low_latency_combine(
            y, route.topk_idx, route.topk_weights, out.handle, group=group
        )
        return y, out.num_dropped


@functools.lru_cache(maxsize=64)
def _global_call(
    plan: _Plan,
    mesh: jax.sharding.Mesh,
    use_ll: bool,
    x_ndim: int,
    token_axes: tuple[str, ...],
    present: tuple[bool, bool, bool, bool],
):
    """The jitted ``shard_map`` of :meth:`_Plan.per_rank` over ``mesh`` and its specs.

    ``x`` is split over ``token_axes`` (replicated over the other mesh axes), the experts over
    the EP axis; ``present`` says which optional weights exist (selection bias, shared expert,
    logit bias, expert biases). Jitted (and cached) so an eager ``moe(x)`` runs one compiled
    program instead of dispatching hundreds of small ops per rank; under an outer ``jit`` it
    simply inlines.
    """
    has_bias, has_shared, has_logit_bias, has_expert_bias = present
    x_spec = P(token_axes, *([None] * (x_ndim - 1)))
    expert = P(plan.axis_name, None, None)
    w_specs = _Weights(
        P(),
        P() if has_bias else None,
        expert,
        expert,
        expert,
        (P(), P(), P()) if has_shared else None,
        P() if has_logit_bias else None,
        (P(plan.axis_name, None),) * 3 if has_expert_bias else None,
    )

    def body(w, x):
        return plan.per_rank(w, x, use_ll, token_axes)

    fn = jax.shard_map(
        body, mesh=mesh, in_specs=(w_specs, x_spec), out_specs=(x_spec, MoEAux(P(), P(), P()))
    )
    return jax.jit(fn), x_spec, w_specs


def _make_exchange(
    impl,
    group: jax_ep.Group,
    num_experts: int,
    fp8: bool,
    capacity_factor: float | None,
    emulation: bool | None,
) -> Exchange:
    if isinstance(impl, Exchange):
        return impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or an Exchange, got {impl!r}")
    if impl in ("jax_ep", "reference"):
        return JaxEpExchange(
            group if impl == "jax_ep" else _reference_twin(group), capacity_factor, fp8
        )
    if fp8:
        raise ValueError(f"fp8=True needs a jax_ep impl; {impl!r} has no FP8 wire format")
    if impl == "all_to_all":
        return AllToAllExchange(group.axis_name, num_experts, capacity_factor)
    if emulation is None:
        emulation = all(d.platform == "cpu" for d in group.devices)
        if emulation:
            warnings.warn(
                "impl='ragged_all_to_all' on CPU: XLA:CPU has no ragged_all_to_all "
                "(jax-ml/jax#34755); using a dense all_to_all emulation of it",
                stacklevel=4,
            )
    return RaggedAllToAllExchange(group.axis_name, num_experts, capacity_factor, bool(emulation))


def _reference_twin(group: jax_ep.Group) -> jax_ep.Group:
    """``group`` itself if it runs the reference backend, else a reference group like it."""
    if group.backend == "reference":
        return group
    return jax_ep.Group(
        group.mesh,
        group.axis_name,
        num_experts=group.num_experts,
        num_topk=group.num_topk,
        hidden=group.hidden,
        num_max_tokens_per_rank=group.num_max_tokens_per_rank,
        dtype=group.dtype,
        backend="reference",
        loopback=group.loopback,
        low_latency=group.low_latency,
        num_max_low_latency_tokens_per_rank=group.num_max_low_latency_tokens_per_rank,
        config=group.config,
    )
