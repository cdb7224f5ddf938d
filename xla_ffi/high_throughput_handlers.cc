// FFI handlers of the high-throughput dispatch and combine: read shapes from the
// buffers (shape-polymorphic), check them against the group's buffers, fill the
// launch parameters. Semantics live in jax_ep/reference.py, kernels in
// csrc/high_throughput.
#include "high_throughput/params.h"
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/handlers.h"

namespace jax_ep::ffi_layer {

struct HtDispatchAttrs {
  std::string_view group;
  int64_t num_experts;
  LayoutKind layout;
  bool fp8;
  bool round_scale;
};

struct HtCombineAttrs {
  std::string_view group;
  int64_t num_experts;
};

}  // namespace jax_ep::ffi_layer

XLA_FFI_REGISTER_ENUM_ATTR_DECODING(jax_ep::LayoutKind);
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::ffi_layer::HtDispatchAttrs,
                                      xla::ffi::StructMember<std::string_view>("group"),
                                      xla::ffi::StructMember<int64_t>("num_experts"),
                                      xla::ffi::StructMember<jax_ep::LayoutKind>("layout"),
                                      xla::ffi::StructMember<bool>("fp8"), xla::ffi::StructMember<bool>("round_scale"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::ffi_layer::HtCombineAttrs,
                                      xla::ffi::StructMember<std::string_view>("group"),
                                      xla::ffi::StructMember<int64_t>("num_experts"));

namespace jax_ep::ffi_layer {
namespace {

// Checks that one call fits the buffers the group allocated: routing, the wire row of
// the payload (raw or FP8), the combine row of a raw payload, the expert count.
ffi::Error check_fits(const DeviceState* state, int64_t T, int64_t K, int64_t H, int esize, bool fp8, int64_t E) {
  JAX_EP_CHECK(check_routing_shape(state, T, K, false));
  JAX_EP_CHECK(check_row(state, H, esize, fp8, true));
  JAX_EP_CHECK(check_row(state, H, esize, false, false));
  return check_num_experts(state, E);
}

template <bool kSync>
ffi::Error HtDispatch(cudaStream_t stream, int32_t device, ExecState* exec, HtDispatchAttrs attrs, ffi::AnyBuffer x,
                      ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights, ffi::AnyBuffer order_in,
                      ffi::Result<ffi::AnyBuffer> out_x, ffi::Result<ffi::AnyBuffer> out_scales,
                      ffi::Result<ffi::AnyBuffer> out_topk_idx, ffi::Result<ffi::AnyBuffer> out_topk_weights,
                      ffi::Result<ffi::AnyBuffer> out_counts, ffi::Result<ffi::AnyBuffer> out_dropped,
                      ffi::Result<ffi::AnyBuffer> recv_src, ffi::Result<ffi::AnyBuffer> recv_topk_idx,
                      ffi::Result<ffi::AnyBuffer> recv_rows, ffi::Result<ffi::AnyBuffer> recv_weights,
                      ffi::Result<ffi::AnyBuffer> num_recv, ffi::Result<ffi::AnyBuffer> order_out) {
  GroupCall call;
  JAX_EP_CHECK(call.open(exec, device, stream, order_in, *order_out));
  DeviceState* state = call.state();
  const int num_local = state->num_local_ranks;
  ffi::Span<const int64_t> xd, id, wd;
  JAX_EP_CHECK(per_rank_dims(x, "x", 2, num_local, &xd));
  JAX_EP_CHECK(per_rank_dims(topk_idx, "topk_idx", 2, num_local, &id));
  JAX_EP_CHECK(per_rank_dims(topk_weights, "topk_weights", 2, num_local, &wd));
  int dtype;
  JAX_EP_CHECK(payload_dtype(x.element_type(), "x", &dtype));
  if (topk_idx.element_type() != ffi::DataType::S32) return invalid("topk_idx must be int32");
  if (topk_weights.element_type() != ffi::DataType::F32) return invalid("topk_weights must be float32");
  const int64_t T = xd[0], H = xd[1], K = id[1];
  if (id[0] != T || wd[0] != T || wd[1] != K) return invalid("x, topk_idx and topk_weights disagree on shapes");
  const LayoutKind layout_kind = attrs.layout;
  if (layout_kind < kPerRank || layout_kind > kRagged)
    return invalid("unknown layout " + std::to_string(int(layout_kind)));
  // capacity is read from the output's shape: it may be symbolic in the exported program
  ffi::Span<const int64_t> od;
  const int out_ndim = layout_kind == kExpertMajor ? 3 : 2;
  JAX_EP_CHECK(per_rank_dims(*out_x, "output x", out_ndim, num_local, &od));
  const int64_t capacity = od[out_ndim - 2];
  if (capacity <= 0) return invalid("capacity must be positive, got " + std::to_string(capacity));
  JAX_EP_CHECK(check_fits(state, T, K, H, element_bytes(x.element_type()), attrs.fp8, attrs.num_experts));
  const int64_t e_loc = attrs.num_experts / state->num_ranks;
  const int64_t rows_out = layout_kind == kExpertMajor ? e_loc * capacity : capacity;
  const int64_t payload = attrs.fp8 ? H : H * element_bytes(x.element_type());
  if (int64_t(out_x->size_bytes()) != num_local * rows_out * payload)
    return invalid("output x has " + std::to_string(out_x->size_bytes()) + " bytes, expected " +
                   std::to_string(num_local * rows_out * payload));
  if (int64_t(recv_src->element_count()) != num_local * state->num_ranks * T)
    return invalid("recv_src must have num_ranks * num_tokens entries per rank");

  HtDispatchArgs a;
  set_sizes(a, state, H, K, attrs.num_experts, dtype);
  a.num_tokens = int(T);
  a.layout_kind = layout_kind;
  a.capacity = int(capacity);
  a.fp8 = int(attrs.fp8);
  a.round_scale = int(attrs.round_scale);
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.typed_data<int32_t>();
  a.topk_weights = topk_weights.typed_data<float>();
  a.out_x = out_x->untyped_data();
  a.out_scales = attrs.fp8 ? static_cast<float*>(out_scales->untyped_data()) : nullptr;
  a.out_topk_idx = static_cast<int*>(out_topk_idx->untyped_data());
  a.out_topk_weights = static_cast<float*>(out_topk_weights->untyped_data());
  a.out_counts = static_cast<int*>(out_counts->untyped_data());
  a.out_dropped = static_cast<int*>(out_dropped->untyped_data());
  a.recv_src = static_cast<int*>(recv_src->untyped_data());
  a.recv_topk_idx = static_cast<int*>(recv_topk_idx->untyped_data());
  a.recv_rows = static_cast<int*>(recv_rows->untyped_data());
  a.recv_weights = static_cast<float*>(recv_weights->untyped_data());
  a.num_recv = static_cast<int*>(num_recv->untyped_data());
  a.order = static_cast<int*>(order_out->untyped_data());
  return finish(stream, state, launch_ht_dispatch(a, stream), kSync);
}

template <bool kSync>
ffi::Error HtCombine(cudaStream_t stream, int32_t device, ExecState* exec, HtCombineAttrs attrs, ffi::AnyBuffer y,
                     ffi::AnyBuffer recv_src, ffi::AnyBuffer recv_rows, ffi::AnyBuffer weights, ffi::AnyBuffer num_recv,
                     ffi::AnyBuffer topk_idx, ffi::AnyBuffer extra, ffi::AnyBuffer order_in,
                     ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> out_extra,
                     ffi::Result<ffi::AnyBuffer> order_out) {
  GroupCall call;
  JAX_EP_CHECK(call.open(exec, device, stream, order_in, *order_out));
  DeviceState* state = call.state();
  const int num_local = state->num_local_ranks;
  ffi::Span<const int64_t> yd, sd, rd, wd, num_recv_dims, id;
  JAX_EP_CHECK(per_rank_dims(y, "y", 2, num_local, &yd));
  JAX_EP_CHECK(per_rank_dims(recv_src, "recv_src", 1, num_local, &sd));
  JAX_EP_CHECK(per_rank_dims(recv_rows, "recv_rows", 2, num_local, &rd));
  JAX_EP_CHECK(per_rank_dims(weights, "weights", 2, num_local, &wd));
  JAX_EP_CHECK(per_rank_dims(num_recv, "num_recv", 0, num_local, &num_recv_dims));
  JAX_EP_CHECK(per_rank_dims(topk_idx, "topk_idx", 2, num_local, &id));
  int dtype;
  JAX_EP_CHECK(payload_dtype(y.element_type(), "y", &dtype));
  if (weights.element_type() != ffi::DataType::F32) return invalid("weights must be float32");
  const int64_t T = id[0], K = id[1], H = yd[1], RT = sd[0];
  if (RT != int64_t(state->num_ranks) * T) return invalid("recv_src must have num_ranks * num_tokens entries");
  if (rd[0] != RT || wd[0] != RT || wd[1] != rd[1] || rd[1] > kMaxTopk)
    return invalid("recv_rows / weights must be [num_ranks * num_tokens, <=32]");
  JAX_EP_CHECK(check_fits(state, T, K, H, element_bytes(y.element_type()), false, attrs.num_experts));
  ffi::Span<const int64_t> xd;
  JAX_EP_CHECK(per_rank_dims(extra, "extra", 2, num_local, &xd));
  const int64_t X = xd[1];
  JAX_EP_CHECK(expect(extra, "extra", {RT, X}, ffi::DataType::F32, num_local));
  JAX_EP_CHECK(expect(*out_extra, "extra (result)", {T, X}, ffi::DataType::F32, num_local));
  if (X > state->layout.sizes.num_topk)
    return invalid("extra has " + std::to_string(X) + " columns, more than the group's num_topk");
  if (X > 0 && state->layout.sizes.num_nodes > 1)
    return invalid("extra columns are not carried between nodes; combine them separately");
  HtCombineArgs a;
  set_sizes(a, state, H, K, attrs.num_experts, dtype);
  a.num_tokens = int(T);
  a.rows_per_token = int(rd[1]);
  a.num_y_rows = int(yd[0]);
  a.y = y.untyped_data();
  a.recv_src = recv_src.typed_data<int32_t>();
  a.recv_rows = recv_rows.typed_data<int32_t>();
  a.weights = weights.typed_data<float>();
  a.num_recv = num_recv.typed_data<int32_t>();
  a.topk_idx = topk_idx.typed_data<int32_t>();
  a.num_extra = int(X);
  a.extra = X ? extra.typed_data<float>() : nullptr;
  a.out_extra = X ? static_cast<float*>(out_extra->untyped_data()) : nullptr;
  a.out = out->untyped_data();
  a.order = static_cast<int*>(order_out->untyped_data());
  return finish(stream, state, launch_ht_combine(a, stream), kSync);
}

template <bool kSync>
ffi::Error HtCachedDispatch(cudaStream_t stream, int32_t device, ExecState* exec, HtCombineAttrs attrs,
                            ffi::AnyBuffer x, ffi::AnyBuffer topk_idx, ffi::AnyBuffer recv_src, ffi::AnyBuffer order_in,
                            ffi::Result<ffi::AnyBuffer> rows, ffi::Result<ffi::AnyBuffer> order_out) {
  GroupCall call;
  JAX_EP_CHECK(call.open(exec, device, stream, order_in, *order_out));
  DeviceState* state = call.state();
  const int num_local = state->num_local_ranks;
  ffi::Span<const int64_t> xd, id;
  JAX_EP_CHECK(per_rank_dims(x, "x", 2, num_local, &xd));
  JAX_EP_CHECK(per_rank_dims(topk_idx, "topk_idx", 2, num_local, &id));
  const int64_t T = xd[0], H = xd[1], K = id[1], RT = int64_t(state->num_ranks) * T;
  int dtype;
  JAX_EP_CHECK(payload_dtype(x.element_type(), "x", &dtype));
  JAX_EP_CHECK(expect(topk_idx, "topk_idx", {T, K}, ffi::DataType::S32, num_local));
  JAX_EP_CHECK(expect(recv_src, "recv_src", {RT}, ffi::DataType::S32, num_local));
  JAX_EP_CHECK(expect(*rows, "rows", {RT, H}, x.element_type(), num_local));
  JAX_EP_CHECK(check_fits(state, T, K, H, element_bytes(x.element_type()), false, attrs.num_experts));
  HtDispatchArgs a;
  set_sizes(a, state, H, K, attrs.num_experts, dtype);
  a.num_tokens = int(T);
  a.layout_kind = kPerRank;
  a.capacity = int(RT);
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.typed_data<int32_t>();
  a.recv_src = const_cast<int*>(recv_src.typed_data<int32_t>());  // read, not written
  a.out_x = rows->untyped_data();
  a.order = static_cast<int*>(order_out->untyped_data());
  return finish(stream, state, launch_ht_cached_dispatch(a, stream), kSync);
}

auto dispatch_binding() {
  return group_op_binding<HtDispatchAttrs>()
      .Arg<ffi::AnyBuffer>()   // x
      .Arg<ffi::AnyBuffer>()   // topk_idx
      .Arg<ffi::AnyBuffer>()   // topk_weights
      .Arg<ffi::AnyBuffer>()   // order token
      .Ret<ffi::AnyBuffer>()   // x
      .Ret<ffi::AnyBuffer>()   // scales
      .Ret<ffi::AnyBuffer>()   // topk_idx (per_rank)
      .Ret<ffi::AnyBuffer>()   // topk_weights (per_rank)
      .Ret<ffi::AnyBuffer>()   // counts
      .Ret<ffi::AnyBuffer>()   // num_dropped
      .Ret<ffi::AnyBuffer>()   // recv_src
      .Ret<ffi::AnyBuffer>()   // recv_topk_idx
      .Ret<ffi::AnyBuffer>()   // recv_rows
      .Ret<ffi::AnyBuffer>()   // recv_weights
      .Ret<ffi::AnyBuffer>()   // num_recv
      .Ret<ffi::AnyBuffer>();  // order token
}

auto combine_binding() {
  return group_op_binding<HtCombineAttrs>()
      .Arg<ffi::AnyBuffer>()   // y
      .Arg<ffi::AnyBuffer>()   // recv_src
      .Arg<ffi::AnyBuffer>()   // recv_rows
      .Arg<ffi::AnyBuffer>()   // weights
      .Arg<ffi::AnyBuffer>()   // num_recv
      .Arg<ffi::AnyBuffer>()   // topk_idx
      .Arg<ffi::AnyBuffer>()   // extra columns [R*T, X] (X may be 0)
      .Arg<ffi::AnyBuffer>()   // order token
      .Ret<ffi::AnyBuffer>()   // out
      .Ret<ffi::AnyBuffer>()   // extra columns summed [T, X]
      .Ret<ffi::AnyBuffer>();  // order token
}

auto cached_dispatch_binding() {
  return group_op_binding<HtCombineAttrs>()
      .Arg<ffi::AnyBuffer>()   // x
      .Arg<ffi::AnyBuffer>()   // topk_idx
      .Arg<ffi::AnyBuffer>()   // recv_src (the forward's handle)
      .Arg<ffi::AnyBuffer>()   // order token
      .Ret<ffi::AnyBuffer>()   // rows [R*T, H]
      .Ret<ffi::AnyBuffer>();  // order token
}

JAX_EP_DEFINE_OP_HANDLERS(kHtDispatch, HtDispatch, dispatch_binding());
JAX_EP_DEFINE_OP_HANDLERS(kHtCombine, HtCombine, combine_binding());
JAX_EP_DEFINE_OP_HANDLERS(kHtCachedDispatch, HtCachedDispatch, cached_dispatch_binding());

}  // namespace

void add_high_throughput_handlers(HandlerTable& table) {
  add_group_op(table, "high_throughput_dispatch", kHtDispatch, kHtDispatchSync);
  add_group_op(table, "high_throughput_combine", kHtCombine, kHtCombineSync);
  add_group_op(table, "high_throughput_cached_dispatch", kHtCachedDispatch, kHtCachedDispatchSync);
}

}  // namespace jax_ep::ffi_layer
