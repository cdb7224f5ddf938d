// FFI handlers of the low-latency (decode) dispatch and combine, whole and in halves: read shapes
// from the buffers (shape-polymorphic), check them against the group's low-latency
// buffers, fill the launch parameters. Semantics live in jax_ep/reference.py
// (low_latency_dispatch / low_latency_combine), kernels in csrc/low_latency.
//
// Each send half returns a ticket ([2] int32: the op's 64-bit sequence number), which
// is also its ordering token; its receive half takes the ticket (the op it serves)
// and the group's current ordering token (docs/protocol.md, "Ordering and lifetime").
// No handler allocates, synchronises (except the "_sync" twins) or keeps host state
// per call, so the plain ones enter CUDA graphs.
#include <string>
#include <utility>

#include "low_latency/params.h"
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/handlers.h"

namespace jax_ep::ffi_layer {

struct LlDispatchSendAttrs {
  std::string_view group;
  int64_t num_experts;
  bool fp8;
  bool round_scale;
};

struct LlDispatchRecvAttrs {
  std::string_view group;
  int64_t num_experts;
  bool fp8;
};

struct LlCombineAttrs {  // both halves
  std::string_view group;
  int64_t num_experts;
};

}  // namespace jax_ep::ffi_layer

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::ffi_layer::LlDispatchSendAttrs,
                                      xla::ffi::StructMember<std::string_view>("group"),
                                      xla::ffi::StructMember<int64_t>("num_experts"),
                                      xla::ffi::StructMember<bool>("fp8"), xla::ffi::StructMember<bool>("round_scale"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::ffi_layer::LlDispatchRecvAttrs,
                                      xla::ffi::StructMember<std::string_view>("group"),
                                      xla::ffi::StructMember<int64_t>("num_experts"),
                                      xla::ffi::StructMember<bool>("fp8"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::ffi_layer::LlCombineAttrs,
                                      xla::ffi::StructMember<std::string_view>("group"),
                                      xla::ffi::StructMember<int64_t>("num_experts"));

namespace jax_ep::ffi_layer {
namespace {

constexpr ffi::DataType kS32 = ffi::DataType::S32;

// Facts of the group every low-latency call relies on.
ffi::Error check_group(const DeviceState* state, int64_t num_experts) {
  const BufferSizes& sizes = state->layout.sizes;
  if (!sizes.low_latency)
    return invalid("the group was created without low_latency=True, so it has no low-latency buffers");
  JAX_EP_CHECK(check_num_experts(state, num_experts));
  if (num_experts > kLlMaxExperts)
    return invalid("num_experts=" + std::to_string(num_experts) + " exceeds the low-latency kernels' limit of " +
                   std::to_string(kLlMaxExperts));
  return ffi::Error::Success();
}

// Rows per local expert of the receive layout: R * T_ll.
int64_t recv_rows(const DeviceState* state) {
  return int64_t(state->num_ranks) * state->layout.sizes.ll_max_tokens;
}

// The start of the handlers that take a dispatch's results (everything but the
// dispatch send, which checks its routing first): the call is open, the group has
// low-latency buffers for this expert count, and the ordering tokens have their shape.
ffi::Error open_after_dispatch(GroupCall& call, ExecState* exec, int32_t device, cudaStream_t stream,
                               int64_t num_experts, const ffi::AnyBuffer& order_in, const ffi::AnyBuffer& order_out) {
  JAX_EP_CHECK(call.open(exec, device, stream, order_in, order_out));
  return check_group(call.state(), num_experts);
}

// The dispatch send's operands checked and its launch parameters filled (`ticket`: where
// the send writes the op's sequence number).
ffi::Error dispatch_send_args(const DeviceState* state, const LlDispatchSendAttrs& attrs, const ffi::AnyBuffer& x,
                              const ffi::AnyBuffer& topk_idx, const ffi::AnyBuffer& active_ranks,
                              const ffi::AnyBuffer& num_dropped, void* ticket, LlDispatchSendArgs* a) {
  const int num_local = state->num_local_ranks, R = state->num_ranks;
  ffi::Span<const int64_t> xd, id;
  JAX_EP_CHECK(per_rank_dims(x, "x", 2, num_local, &xd));
  JAX_EP_CHECK(per_rank_dims(topk_idx, "topk_idx", 2, num_local, &id));
  const int64_t T = xd[0], H = xd[1], K = id[1];
  int dtype;
  JAX_EP_CHECK(payload_dtype(x.element_type(), "x", &dtype));
  JAX_EP_CHECK(expect(topk_idx, "topk_idx", {T, K}, kS32, num_local));
  JAX_EP_CHECK(expect(active_ranks, "active_ranks", {R}, kS32, num_local));
  JAX_EP_CHECK(expect(num_dropped, "num_dropped", {}, kS32, num_local));
  JAX_EP_CHECK(check_group(state, attrs.num_experts));
  JAX_EP_CHECK(check_routing_shape(state, T, K, true));
  JAX_EP_CHECK(check_row(state, H, element_bytes(x.element_type()), attrs.fp8, true));

  set_sizes(*a, state, H, K, attrs.num_experts, dtype);
  a->num_tokens = int(T);
  a->fp8 = int(attrs.fp8);
  a->round_scale = int(attrs.round_scale);
  a->x = x.untyped_data();
  a->topk_idx = topk_idx.typed_data<int32_t>();
  a->active_ranks = active_ranks.typed_data<int32_t>();
  a->num_dropped = static_cast<int*>(num_dropped.untyped_data());
  a->ticket = static_cast<int*>(ticket);
  return ffi::Error::Success();
}

// The dispatch receive's outputs checked and its launch parameters filled (`ticket`:
// the op's sequence number, `order`: where its ordering token goes).
ffi::Error dispatch_recv_args(const DeviceState* state, int64_t num_experts, bool fp8,
                              const ffi::AnyBuffer& active_ranks, const ffi::AnyBuffer& out_x,
                              const ffi::AnyBuffer& out_scales, const ffi::AnyBuffer& out_counts,
                              const ffi::AnyBuffer& src_info, const ffi::AnyBuffer& topk_slot,
                              const ffi::AnyBuffer& layout_range, const void* ticket, void* order,
                              LlDispatchRecvArgs* a) {
  const int num_local = state->num_local_ranks, R = state->num_ranks;
  const int64_t e_loc = num_experts / R, RT = recv_rows(state);
  JAX_EP_CHECK(expect(active_ranks, "active_ranks", {R}, kS32, num_local));
  ffi::Span<const int64_t> xd;
  JAX_EP_CHECK(per_rank_dims(out_x, "x", 3, num_local, &xd));
  const int64_t H = xd[2];
  int dtype = kBF16;
  if (fp8) {
    JAX_EP_CHECK(expect(out_x, "x (fp8)", {e_loc, RT, H}, ffi::DataType::F8E4M3FN, num_local));
    JAX_EP_CHECK(expect(out_scales, "scales", {e_loc, RT, H / kFp8Group}, ffi::DataType::F32, num_local));
  } else {
    JAX_EP_CHECK(payload_dtype(out_x.element_type(), "x", &dtype, " without fp8"));
    JAX_EP_CHECK(expect(out_x, "x", {e_loc, RT, H}, out_x.element_type(), num_local));
  }
  JAX_EP_CHECK(check_row(state, H, element_bytes(out_x.element_type()), fp8, true));
  JAX_EP_CHECK(expect(out_counts, "counts", {e_loc}, kS32, num_local));
  JAX_EP_CHECK(expect(src_info, "recv_src_info", {e_loc, RT}, kS32, num_local));
  JAX_EP_CHECK(expect(topk_slot, "recv_topk_slot", {e_loc, RT}, kS32, num_local));
  JAX_EP_CHECK(expect(layout_range, "layout_range", {e_loc, R, 2}, kS32, num_local));

  set_sizes(*a, state, H, state->layout.sizes.num_topk, num_experts, dtype);
  a->fp8 = int(fp8);
  a->ticket = static_cast<const int*>(ticket);
  a->active_ranks = active_ranks.typed_data<int32_t>();
  a->out_x = out_x.untyped_data();
  a->out_scales = fp8 ? static_cast<float*>(out_scales.untyped_data()) : nullptr;
  a->out_counts = static_cast<int*>(out_counts.untyped_data());
  a->src_info = static_cast<int*>(src_info.untyped_data());
  a->topk_slot = static_cast<int*>(topk_slot.untyped_data());
  a->layout_range = static_cast<int*>(layout_range.untyped_data());
  a->order = static_cast<int*>(order);
  return ffi::Error::Success();
}

// The combine send's operands checked and its launch parameters filled.
ffi::Error combine_send_args(const DeviceState* state, int64_t num_experts, const ffi::AnyBuffer& y,
                             const ffi::AnyBuffer& src_info, const ffi::AnyBuffer& topk_slot,
                             const ffi::AnyBuffer& recv_count, const ffi::AnyBuffer& active_ranks, void* ticket,
                             LlCombineSendArgs* a) {
  const int num_local = state->num_local_ranks, R = state->num_ranks;
  const int64_t e_loc = num_experts / R, RT = recv_rows(state);
  ffi::Span<const int64_t> yd;
  JAX_EP_CHECK(per_rank_dims(y, "y", 3, num_local, &yd));
  const int64_t H = yd[2];
  int dtype;
  JAX_EP_CHECK(payload_dtype(y.element_type(), "y", &dtype));
  JAX_EP_CHECK(expect(y, "y", {e_loc, RT, H}, y.element_type(), num_local));
  JAX_EP_CHECK(check_row(state, H, element_bytes(y.element_type()), false, false));
  JAX_EP_CHECK(expect(src_info, "recv_src_info", {e_loc, RT}, kS32, num_local));
  JAX_EP_CHECK(expect(topk_slot, "recv_topk_slot", {e_loc, RT}, kS32, num_local));
  JAX_EP_CHECK(expect(recv_count, "recv_count", {e_loc}, kS32, num_local));
  JAX_EP_CHECK(expect(active_ranks, "active_ranks", {R}, kS32, num_local));

  set_sizes(*a, state, H, state->layout.sizes.num_topk, num_experts, dtype);
  a->y = y.untyped_data();
  a->src_info = src_info.typed_data<int32_t>();
  a->topk_slot = topk_slot.typed_data<int32_t>();
  a->recv_count = recv_count.typed_data<int32_t>();
  a->active_ranks = active_ranks.typed_data<int32_t>();
  a->ticket = static_cast<int*>(ticket);
  return ffi::Error::Success();
}

// The combine receive's operands checked and its launch parameters filled.
ffi::Error combine_recv_args(const DeviceState* state, int64_t num_experts, const ffi::AnyBuffer& topk_idx,
                             const ffi::AnyBuffer& topk_weights, const ffi::AnyBuffer& active_ranks,
                             const ffi::AnyBuffer& out, const void* ticket, void* order, LlCombineRecvArgs* a) {
  const int num_local = state->num_local_ranks, R = state->num_ranks;
  ffi::Span<const int64_t> id, od;
  JAX_EP_CHECK(per_rank_dims(topk_idx, "topk_idx", 2, num_local, &id));
  const int64_t T = id[0], K = id[1];
  JAX_EP_CHECK(expect(topk_idx, "topk_idx", {T, K}, kS32, num_local));
  JAX_EP_CHECK(expect(topk_weights, "topk_weights", {T, K}, ffi::DataType::F32, num_local));
  JAX_EP_CHECK(expect(active_ranks, "active_ranks", {R}, kS32, num_local));
  JAX_EP_CHECK(per_rank_dims(out, "out", 2, num_local, &od));
  const int64_t H = od[1];
  int dtype;
  JAX_EP_CHECK(payload_dtype(out.element_type(), "out", &dtype));
  JAX_EP_CHECK(check_routing_shape(state, T, K, true));
  JAX_EP_CHECK(check_row(state, H, element_bytes(out.element_type()), false, false));

  set_sizes(*a, state, H, K, num_experts, dtype);
  a->num_tokens = int(T);
  a->ticket = static_cast<const int*>(ticket);
  a->topk_idx = topk_idx.typed_data<int32_t>();
  a->topk_weights = topk_weights.typed_data<float>();
  a->active_ranks = active_ranks.typed_data<int32_t>();
  a->out = out.untyped_data();
  a->order = static_cast<int*>(order);
  return ffi::Error::Success();
}

// A one-call op's input and output rows must agree (the halves check them apart).
ffi::Error same_rows(const char* in, int hidden_in, int dtype_in, const char* out, int hidden_out, int dtype_out) {
  if (hidden_in == hidden_out && dtype_in == dtype_out) return ffi::Error::Success();
  return invalid(std::string(in) + " has rows of " + std::to_string(hidden_in) + " elements of dtype " +
                 std::to_string(dtype_in) + " but " + out + " has " + std::to_string(hidden_out) + " of dtype " +
                 std::to_string(dtype_out));
}

template <bool kSync>
ffi::Error LlDispatchSend(cudaStream_t stream, int32_t device, ExecState* exec, LlDispatchSendAttrs attrs,
                          ffi::AnyBuffer x, ffi::AnyBuffer topk_idx, ffi::AnyBuffer active_ranks,
                          ffi::AnyBuffer order_in, ffi::Result<ffi::AnyBuffer> ticket,
                          ffi::Result<ffi::AnyBuffer> num_dropped) {
  GroupCall call;
  JAX_EP_CHECK(call.open(exec, device, stream, order_in, *ticket));
  DeviceState* state = call.state();
  LlDispatchSendArgs a;
  JAX_EP_CHECK(dispatch_send_args(state, attrs, x, topk_idx, active_ranks, *num_dropped, ticket->untyped_data(), &a));
  return finish(stream, state, launch_ll_dispatch_send(a, stream), kSync);
}

template <bool kSync>
ffi::Error LlDispatchRecv(cudaStream_t stream, int32_t device, ExecState* exec, LlDispatchRecvAttrs attrs,
                          ffi::AnyBuffer ticket, ffi::AnyBuffer active_ranks, ffi::AnyBuffer order_in,
                          ffi::Result<ffi::AnyBuffer> out_x, ffi::Result<ffi::AnyBuffer> out_scales,
                          ffi::Result<ffi::AnyBuffer> out_counts, ffi::Result<ffi::AnyBuffer> src_info,
                          ffi::Result<ffi::AnyBuffer> topk_slot, ffi::Result<ffi::AnyBuffer> layout_range,
                          ffi::Result<ffi::AnyBuffer> order_out) {
  GroupCall call;
  JAX_EP_CHECK(open_after_dispatch(call, exec, device, stream, attrs.num_experts, order_in, *order_out));
  DeviceState* state = call.state();
  JAX_EP_CHECK(expect(ticket, "ticket", {2}, kS32, state->num_local_ranks));
  LlDispatchRecvArgs a;
  JAX_EP_CHECK(dispatch_recv_args(state, attrs.num_experts, attrs.fp8, active_ranks, *out_x, *out_scales, *out_counts,
                                  *src_info, *topk_slot, *layout_range, ticket.untyped_data(),
                                  order_out->untyped_data(), &a));
  return finish(stream, state, launch_ll_dispatch_recv(a, stream), kSync);
}

// Both halves in one call: the op's ordering token is also the ticket the receive
// phase reads (the send phase writes it first; docs/protocol.md).
template <bool kSync>
ffi::Error LlDispatch(cudaStream_t stream, int32_t device, ExecState* exec, LlDispatchSendAttrs attrs, ffi::AnyBuffer x,
                      ffi::AnyBuffer topk_idx, ffi::AnyBuffer active_ranks, ffi::AnyBuffer order_in,
                      ffi::Result<ffi::AnyBuffer> out_x, ffi::Result<ffi::AnyBuffer> out_scales,
                      ffi::Result<ffi::AnyBuffer> out_counts, ffi::Result<ffi::AnyBuffer> src_info,
                      ffi::Result<ffi::AnyBuffer> topk_slot, ffi::Result<ffi::AnyBuffer> layout_range,
                      ffi::Result<ffi::AnyBuffer> num_dropped, ffi::Result<ffi::AnyBuffer> order_out) {
  GroupCall call;
  JAX_EP_CHECK(call.open(exec, device, stream, order_in, *order_out));
  DeviceState* state = call.state();
  void* order = order_out->untyped_data();
  LlDispatchSendArgs send;
  JAX_EP_CHECK(dispatch_send_args(state, attrs, x, topk_idx, active_ranks, *num_dropped, order, &send));
  LlDispatchRecvArgs recv;
  JAX_EP_CHECK(dispatch_recv_args(state, attrs.num_experts, attrs.fp8, active_ranks, *out_x, *out_scales, *out_counts,
                                  *src_info, *topk_slot, *layout_range, order, order, &recv));
  JAX_EP_CHECK(
      same_rows("x", send.hidden, send.dtype, "the received rows", recv.hidden, attrs.fp8 ? send.dtype : recv.dtype));
  return finish(stream, state, launch_ll_dispatch(send, recv, stream), kSync);
}

template <bool kSync>
ffi::Error LlCombineSend(cudaStream_t stream, int32_t device, ExecState* exec, LlCombineAttrs attrs, ffi::AnyBuffer y,
                         ffi::AnyBuffer src_info, ffi::AnyBuffer topk_slot, ffi::AnyBuffer recv_count,
                         ffi::AnyBuffer active_ranks, ffi::AnyBuffer order_in, ffi::Result<ffi::AnyBuffer> ticket) {
  GroupCall call;
  JAX_EP_CHECK(open_after_dispatch(call, exec, device, stream, attrs.num_experts, order_in, *ticket));
  LlCombineSendArgs a;
  JAX_EP_CHECK(combine_send_args(call.state(), attrs.num_experts, y, src_info, topk_slot, recv_count, active_ranks,
                                 ticket->untyped_data(), &a));
  return finish(stream, call.state(), launch_ll_combine_send(a, stream), kSync);
}

template <bool kSync>
ffi::Error LlCombineRecv(cudaStream_t stream, int32_t device, ExecState* exec, LlCombineAttrs attrs,
                         ffi::AnyBuffer ticket, ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights,
                         ffi::AnyBuffer active_ranks, ffi::AnyBuffer order_in, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::AnyBuffer> order_out) {
  GroupCall call;
  JAX_EP_CHECK(open_after_dispatch(call, exec, device, stream, attrs.num_experts, order_in, *order_out));
  DeviceState* state = call.state();
  JAX_EP_CHECK(expect(ticket, "ticket", {2}, kS32, state->num_local_ranks));
  LlCombineRecvArgs a;
  JAX_EP_CHECK(combine_recv_args(state, attrs.num_experts, topk_idx, topk_weights, active_ranks, *out,
                                 ticket.untyped_data(), order_out->untyped_data(), &a));
  return finish(stream, state, launch_ll_combine_recv(a, stream), kSync);
}

// Both halves in one call (as LlDispatch).
template <bool kSync>
ffi::Error LlCombine(cudaStream_t stream, int32_t device, ExecState* exec, LlCombineAttrs attrs, ffi::AnyBuffer y,
                     ffi::AnyBuffer src_info, ffi::AnyBuffer topk_slot, ffi::AnyBuffer recv_count,
                     ffi::AnyBuffer active_ranks, ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights,
                     ffi::AnyBuffer order_in, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> order_out) {
  GroupCall call;
  JAX_EP_CHECK(open_after_dispatch(call, exec, device, stream, attrs.num_experts, order_in, *order_out));
  DeviceState* state = call.state();
  void* order = order_out->untyped_data();
  LlCombineSendArgs send;
  JAX_EP_CHECK(
      combine_send_args(state, attrs.num_experts, y, src_info, topk_slot, recv_count, active_ranks, order, &send));
  LlCombineRecvArgs recv;
  JAX_EP_CHECK(
      combine_recv_args(state, attrs.num_experts, topk_idx, topk_weights, active_ranks, *out, order, order, &recv));
  JAX_EP_CHECK(same_rows("y", send.hidden, send.dtype, "out", recv.hidden, recv.dtype));
  return finish(stream, state, launch_ll_combine(send, recv, stream), kSync);
}

// Operands of a dispatch send (and of the one-call dispatch).
template <typename Binding>
auto dispatch_send_operands(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()   // x
      .template Arg<ffi::AnyBuffer>()   // topk_idx
      .template Arg<ffi::AnyBuffer>()   // active_ranks
      .template Arg<ffi::AnyBuffer>();  // order token
}

// What a dispatch receive delivers (and the one-call dispatch).
template <typename Binding>
auto received_rows(Binding b) {
  return std::move(b)
      .template Ret<ffi::AnyBuffer>()   // x
      .template Ret<ffi::AnyBuffer>()   // scales
      .template Ret<ffi::AnyBuffer>()   // counts
      .template Ret<ffi::AnyBuffer>()   // recv_src_info
      .template Ret<ffi::AnyBuffer>()   // recv_topk_slot
      .template Ret<ffi::AnyBuffer>();  // layout_range
}

// The expert side's operands of a combine send (and of the one-call combine).
template <typename Binding>
auto expert_rows(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()   // y
      .template Arg<ffi::AnyBuffer>()   // recv_src_info
      .template Arg<ffi::AnyBuffer>()   // recv_topk_slot
      .template Arg<ffi::AnyBuffer>()   // recv_count
      .template Arg<ffi::AnyBuffer>();  // active_ranks
}

auto dispatch_send_binding() {
  return dispatch_send_operands(group_op_binding<LlDispatchSendAttrs>())
      .Ret<ffi::AnyBuffer>()   // ticket (= order token)
      .Ret<ffi::AnyBuffer>();  // num_dropped
}

auto dispatch_recv_binding() {
  return received_rows(group_op_binding<LlDispatchRecvAttrs>()
                           .Arg<ffi::AnyBuffer>()   // ticket
                           .Arg<ffi::AnyBuffer>()   // active_ranks
                           .Arg<ffi::AnyBuffer>())  // order token
      .Ret<ffi::AnyBuffer>();                       // order token
}

auto dispatch_binding() {
  return received_rows(dispatch_send_operands(group_op_binding<LlDispatchSendAttrs>()))
      .Ret<ffi::AnyBuffer>()   // num_dropped
      .Ret<ffi::AnyBuffer>();  // order token
}

auto combine_send_binding() {
  return expert_rows(group_op_binding<LlCombineAttrs>())
      .Arg<ffi::AnyBuffer>()   // order token
      .Ret<ffi::AnyBuffer>();  // ticket (= order token)
}

auto combine_recv_binding() {
  return group_op_binding<LlCombineAttrs>()
      .Arg<ffi::AnyBuffer>()   // ticket
      .Arg<ffi::AnyBuffer>()   // topk_idx
      .Arg<ffi::AnyBuffer>()   // topk_weights
      .Arg<ffi::AnyBuffer>()   // active_ranks
      .Arg<ffi::AnyBuffer>()   // order token
      .Ret<ffi::AnyBuffer>()   // out
      .Ret<ffi::AnyBuffer>();  // order token
}

auto combine_binding() {
  return expert_rows(group_op_binding<LlCombineAttrs>())
      .Arg<ffi::AnyBuffer>()   // topk_idx
      .Arg<ffi::AnyBuffer>()   // topk_weights
      .Arg<ffi::AnyBuffer>()   // order token
      .Ret<ffi::AnyBuffer>()   // out
      .Ret<ffi::AnyBuffer>();  // order token
}

JAX_EP_DEFINE_OP_HANDLERS(kLlDispatchSend, LlDispatchSend, dispatch_send_binding());
JAX_EP_DEFINE_OP_HANDLERS(kLlDispatch, LlDispatch, dispatch_binding());
JAX_EP_DEFINE_OP_HANDLERS(kLlCombine, LlCombine, combine_binding());
JAX_EP_DEFINE_OP_HANDLERS(kLlDispatchRecv, LlDispatchRecv, dispatch_recv_binding());
JAX_EP_DEFINE_OP_HANDLERS(kLlCombineSend, LlCombineSend, combine_send_binding());
JAX_EP_DEFINE_OP_HANDLERS(kLlCombineRecv, LlCombineRecv, combine_recv_binding());

}  // namespace

void add_low_latency_handlers(HandlerTable& table) {
  add_group_op(table, "low_latency_dispatch_send", kLlDispatchSend, kLlDispatchSendSync);
  add_group_op(table, "low_latency_dispatch_recv", kLlDispatchRecv, kLlDispatchRecvSync);
  add_group_op(table, "low_latency_combine_send", kLlCombineSend, kLlCombineSendSync);
  add_group_op(table, "low_latency_combine_recv", kLlCombineRecv, kLlCombineRecvSync);
  add_group_op(table, "low_latency_dispatch", kLlDispatch, kLlDispatchSync);
  add_group_op(table, "low_latency_combine", kLlCombine, kLlCombineSync);
}

}  // namespace jax_ep::ffi_layer
