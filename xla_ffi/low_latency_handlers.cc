// FFI handlers of the low-latency (decode) dispatch and combine halves: read shapes
// from the buffers (shape-polymorphic), check them against the group's low-latency
// buffers, fill the launch parameters. Semantics live in jax_ep/reference.py
// (low_latency_dispatch / low_latency_combine), kernels in csrc/low_latency.
//
// Each send half returns a ticket ([2] int32: the op's 64-bit sequence number) that
// its receive half takes as an operand: XLA orders the receive after the send and may
// schedule other work between them, and the receive serves exactly that op. No handler allocates, synchronises (except
// the
// "_sync" twins) or keeps host state per call, so the plain ones enter CUDA graphs.
#include <initializer_list>
#include <string>
#include <utility>

#include "low_latency/params.h"
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/handlers.h"

namespace jax_ep::ffi_layer {
namespace {

std::string shape_text(ffi::Span<const int64_t> dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "]";
}

// Per-rank dims of `b` (loopback: without the leading rank axis), which must equal `want`.
ffi::Error expect_dims(const ffi::AnyBuffer& b, const char* name, std::initializer_list<int64_t> want, int L) {
  ffi::Span<const int64_t> dims;
  if (ffi::Error e = per_rank_dims(b, name, int(want.size()), L, &dims); e.failure()) return e;
  size_t i = 0;
  for (int64_t w : want) {
    if (dims[i++] != w) {
      std::string expected = "[";
      for (int64_t v : want) expected += (expected.size() > 1 ? ", " : "") + std::to_string(v);
      return invalid(std::string(name) + " has per-rank shape " + shape_text(dims) + ", expected " + expected + "]");
    }
  }
  return ffi::Error::Success();
}

ffi::Error expect_type(const ffi::AnyBuffer& b, const char* name, ffi::DataType t, const char* type_name) {
  if (b.element_type() != t) return invalid(std::string(name) + " must be " + type_name);
  return ffi::Error::Success();
}

// Facts of the group every low-latency call relies on.
ffi::Error check_group(const DeviceState* s, int64_t num_experts) {
  const BufferSizes& z = s->layout.sizes;
  if (!z.low_latency)
    return invalid("the group was created without low_latency=True, so it has no low-latency buffers");
  if (ffi::Error e = check_num_experts(s, num_experts); e.failure()) return e;
  if (num_experts > kLlMaxExperts)
    return invalid("num_experts=" + std::to_string(num_experts) + " exceeds the low-latency kernels' limit of " +
                   std::to_string(kLlMaxExperts));
  return ffi::Error::Success();
}

// Returns the error of a check that failed.
#define JAX_EP_CHECK(expr)                            \
  do {                                                \
    if (ffi::Error e = (expr); e.failure()) return e; \
  } while (0)

template <bool kSync>
ffi::Error LlDispatchSend(cudaStream_t stream, int32_t device, int64_t group_id, int64_t num_experts, int64_t fp8,
                          int64_t round_scale, ffi::AnyBuffer x, ffi::AnyBuffer topk_idx, ffi::AnyBuffer active_ranks,
                          ffi::Result<ffi::AnyBuffer> ticket, ffi::Result<ffi::AnyBuffer> num_dropped) {
  DeviceState* s = nullptr;
  JAX_EP_CHECK(lookup(group_id, device, stream, &s));
  const int L = s->num_local_ranks, R = s->num_ranks;
  ffi::Span<const int64_t> xd, id;
  JAX_EP_CHECK(per_rank_dims(x, "x", 2, L, &xd));
  JAX_EP_CHECK(per_rank_dims(topk_idx, "topk_idx", 2, L, &id));
  const int64_t T = xd[0], H = xd[1], K = id[1];
  const int dtype = dtype_code(x.element_type());
  if (dtype < 0) return invalid("x must be float32, bfloat16 or float16");
  JAX_EP_CHECK(expect_type(topk_idx, "topk_idx", ffi::DataType::S32, "int32"));
  if (id[0] != T) return invalid("topk_idx has " + std::to_string(id[0]) + " tokens but x has " + std::to_string(T));
  JAX_EP_CHECK(expect_dims(active_ranks, "active_ranks", {R}, L));
  JAX_EP_CHECK(expect_type(active_ranks, "active_ranks", ffi::DataType::S32, "int32"));
  JAX_EP_CHECK(expect_dims(*ticket, "ticket", {2}, L));
  JAX_EP_CHECK(expect_type(*ticket, "ticket", ffi::DataType::S32, "int32"));
  JAX_EP_CHECK(expect_dims(*num_dropped, "num_dropped", {}, L));
  JAX_EP_CHECK(expect_type(*num_dropped, "num_dropped", ffi::DataType::S32, "int32"));
  JAX_EP_CHECK(check_group(s, num_experts));
  JAX_EP_CHECK(check_routing_shape(s, T, K));
  JAX_EP_CHECK(check_row(s, H, element_bytes(x.element_type()), fp8 != 0, true));

  LlDispatchSendArgs a;
  a.c = comm_of(s);
  a.num_tokens = int(T);
  a.hidden = int(H);
  a.num_topk = int(K);
  a.num_experts = int(num_experts);
  a.dtype = dtype;
  a.fp8 = int(fp8 != 0);
  a.round_scale = int(round_scale != 0);
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.typed_data<int32_t>();
  a.active_ranks = active_ranks.typed_data<int32_t>();
  a.num_dropped = static_cast<int*>(num_dropped->untyped_data());
  a.ticket = static_cast<int*>(ticket->untyped_data());
  return finish(stream, s, launch_ll_dispatch_send(a, stream), kSync);
}

template <bool kSync>
ffi::Error LlDispatchRecv(cudaStream_t stream, int32_t device, int64_t group_id, int64_t num_experts, int64_t fp8,
                          ffi::AnyBuffer ticket, ffi::AnyBuffer active_ranks, ffi::Result<ffi::AnyBuffer> out_x,
                          ffi::Result<ffi::AnyBuffer> out_scales, ffi::Result<ffi::AnyBuffer> out_counts,
                          ffi::Result<ffi::AnyBuffer> src_info, ffi::Result<ffi::AnyBuffer> topk_slot,
                          ffi::Result<ffi::AnyBuffer> layout_range) {
  DeviceState* s = nullptr;
  JAX_EP_CHECK(lookup(group_id, device, stream, &s));
  JAX_EP_CHECK(check_group(s, num_experts));
  const int L = s->num_local_ranks, R = s->num_ranks;
  const int64_t e_loc = num_experts / R, RT = int64_t(R) * s->layout.sizes.max_tokens;
  JAX_EP_CHECK(expect_dims(ticket, "ticket", {2}, L));
  JAX_EP_CHECK(expect_type(ticket, "ticket", ffi::DataType::S32, "int32"));
  JAX_EP_CHECK(expect_dims(active_ranks, "active_ranks", {R}, L));
  JAX_EP_CHECK(expect_type(active_ranks, "active_ranks", ffi::DataType::S32, "int32"));
  ffi::Span<const int64_t> xd;
  JAX_EP_CHECK(per_rank_dims(*out_x, "x", 3, L, &xd));
  const int64_t H = xd[2];
  JAX_EP_CHECK(expect_dims(*out_x, "x", {e_loc, RT, H}, L));
  int dtype = kBF16;
  if (fp8) {
    JAX_EP_CHECK(expect_type(*out_x, "x", ffi::DataType::F8E4M3FN, "float8_e4m3fn with fp8"));
    JAX_EP_CHECK(expect_dims(*out_scales, "scales", {e_loc, RT, H / kFp8Group}, L));
    JAX_EP_CHECK(expect_type(*out_scales, "scales", ffi::DataType::F32, "float32"));
  } else {
    dtype = dtype_code(out_x->element_type());
    if (dtype < 0) return invalid("x must be float32, bfloat16 or float16 without fp8");
  }
  JAX_EP_CHECK(check_row(s, H, element_bytes(out_x->element_type()), fp8 != 0, true));
  JAX_EP_CHECK(expect_dims(*out_counts, "counts", {e_loc}, L));
  JAX_EP_CHECK(expect_dims(*src_info, "recv_src_info", {e_loc, RT}, L));
  JAX_EP_CHECK(expect_dims(*topk_slot, "recv_topk_slot", {e_loc, RT}, L));
  JAX_EP_CHECK(expect_dims(*layout_range, "layout_range", {e_loc, R, 2}, L));
  for (auto [b, name] : {std::pair{&*out_counts, "counts"}, std::pair{&*src_info, "recv_src_info"},
                         std::pair{&*topk_slot, "recv_topk_slot"}, std::pair{&*layout_range, "layout_range"}})
    JAX_EP_CHECK(expect_type(*b, name, ffi::DataType::S32, "int32"));

  LlDispatchRecvArgs a;
  a.c = comm_of(s);
  a.hidden = int(H);
  a.num_topk = s->layout.sizes.num_topk;
  a.num_experts = int(num_experts);
  a.dtype = dtype;
  a.fp8 = int(fp8 != 0);
  a.ticket = ticket.typed_data<int32_t>();
  a.active_ranks = active_ranks.typed_data<int32_t>();
  a.out_x = out_x->untyped_data();
  a.out_scales = fp8 ? static_cast<float*>(out_scales->untyped_data()) : nullptr;
  a.out_counts = static_cast<int*>(out_counts->untyped_data());
  a.src_info = static_cast<int*>(src_info->untyped_data());
  a.topk_slot = static_cast<int*>(topk_slot->untyped_data());
  a.layout_range = static_cast<int*>(layout_range->untyped_data());
  return finish(stream, s, launch_ll_dispatch_recv(a, stream), kSync);
}

template <bool kSync>
ffi::Error LlCombineSend(cudaStream_t stream, int32_t device, int64_t group_id, int64_t num_experts, ffi::AnyBuffer y,
                         ffi::AnyBuffer src_info, ffi::AnyBuffer topk_slot, ffi::AnyBuffer recv_count,
                         ffi::AnyBuffer active_ranks, ffi::Result<ffi::AnyBuffer> ticket) {
  DeviceState* s = nullptr;
  JAX_EP_CHECK(lookup(group_id, device, stream, &s));
  JAX_EP_CHECK(check_group(s, num_experts));
  const int L = s->num_local_ranks, R = s->num_ranks;
  const int64_t e_loc = num_experts / R, RT = int64_t(R) * s->layout.sizes.max_tokens;
  ffi::Span<const int64_t> yd;
  JAX_EP_CHECK(per_rank_dims(y, "y", 3, L, &yd));
  const int64_t H = yd[2];
  JAX_EP_CHECK(expect_dims(y, "y", {e_loc, RT, H}, L));
  const int dtype = dtype_code(y.element_type());
  if (dtype < 0) return invalid("y must be float32, bfloat16 or float16");
  JAX_EP_CHECK(check_row(s, H, element_bytes(y.element_type()), false, false));
  JAX_EP_CHECK(expect_dims(src_info, "recv_src_info", {e_loc, RT}, L));
  JAX_EP_CHECK(expect_dims(topk_slot, "recv_topk_slot", {e_loc, RT}, L));
  JAX_EP_CHECK(expect_dims(recv_count, "recv_count", {e_loc}, L));
  JAX_EP_CHECK(expect_dims(active_ranks, "active_ranks", {R}, L));
  for (auto [b, name] : {std::pair{&src_info, "recv_src_info"}, std::pair{&topk_slot, "recv_topk_slot"},
                         std::pair{&recv_count, "recv_count"}, std::pair{&active_ranks, "active_ranks"}})
    JAX_EP_CHECK(expect_type(*b, name, ffi::DataType::S32, "int32"));
  JAX_EP_CHECK(expect_dims(*ticket, "ticket", {2}, L));
  JAX_EP_CHECK(expect_type(*ticket, "ticket", ffi::DataType::S32, "int32"));

  LlCombineSendArgs a;
  a.c = comm_of(s);
  a.hidden = int(H);
  a.num_topk = s->layout.sizes.num_topk;
  a.num_experts = int(num_experts);
  a.dtype = dtype;
  a.y = y.untyped_data();
  a.src_info = src_info.typed_data<int32_t>();
  a.topk_slot = topk_slot.typed_data<int32_t>();
  a.recv_count = recv_count.typed_data<int32_t>();
  a.active_ranks = active_ranks.typed_data<int32_t>();
  a.ticket = static_cast<int*>(ticket->untyped_data());
  return finish(stream, s, launch_ll_combine_send(a, stream), kSync);
}

template <bool kSync>
ffi::Error LlCombineRecv(cudaStream_t stream, int32_t device, int64_t group_id, int64_t num_experts,
                         ffi::AnyBuffer ticket, ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights,
                         ffi::AnyBuffer active_ranks, ffi::Result<ffi::AnyBuffer> out) {
  DeviceState* s = nullptr;
  JAX_EP_CHECK(lookup(group_id, device, stream, &s));
  JAX_EP_CHECK(check_group(s, num_experts));
  const int L = s->num_local_ranks, R = s->num_ranks;
  JAX_EP_CHECK(expect_dims(ticket, "ticket", {2}, L));
  JAX_EP_CHECK(expect_type(ticket, "ticket", ffi::DataType::S32, "int32"));
  ffi::Span<const int64_t> id, od;
  JAX_EP_CHECK(per_rank_dims(topk_idx, "topk_idx", 2, L, &id));
  const int64_t T = id[0], K = id[1];
  JAX_EP_CHECK(expect_type(topk_idx, "topk_idx", ffi::DataType::S32, "int32"));
  JAX_EP_CHECK(expect_dims(topk_weights, "topk_weights", {T, K}, L));
  JAX_EP_CHECK(expect_type(topk_weights, "topk_weights", ffi::DataType::F32, "float32"));
  JAX_EP_CHECK(expect_dims(active_ranks, "active_ranks", {R}, L));
  JAX_EP_CHECK(expect_type(active_ranks, "active_ranks", ffi::DataType::S32, "int32"));
  JAX_EP_CHECK(per_rank_dims(*out, "out", 2, L, &od));
  const int64_t H = od[1];
  JAX_EP_CHECK(expect_dims(*out, "out", {T, H}, L));
  const int dtype = dtype_code(out->element_type());
  if (dtype < 0) return invalid("out must be float32, bfloat16 or float16");
  JAX_EP_CHECK(check_routing_shape(s, T, K));
  JAX_EP_CHECK(check_row(s, H, element_bytes(out->element_type()), false, false));

  LlCombineRecvArgs a;
  a.c = comm_of(s);
  a.num_tokens = int(T);
  a.hidden = int(H);
  a.num_topk = int(K);
  a.num_experts = int(num_experts);
  a.dtype = dtype;
  a.ticket = ticket.typed_data<int32_t>();
  a.topk_idx = topk_idx.typed_data<int32_t>();
  a.topk_weights = topk_weights.typed_data<float>();
  a.active_ranks = active_ranks.typed_data<int32_t>();
  a.out = out->untyped_data();
  return finish(stream, s, launch_ll_combine_recv(a, stream), kSync);
}

#undef JAX_EP_CHECK

auto dispatch_send_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Attr<int64_t>("group_id")
      .Attr<int64_t>("num_experts")
      .Attr<int64_t>("fp8")
      .Attr<int64_t>("round_scale")
      .Arg<ffi::AnyBuffer>()   // x
      .Arg<ffi::AnyBuffer>()   // topk_idx
      .Arg<ffi::AnyBuffer>()   // active_ranks
      .Ret<ffi::AnyBuffer>()   // ticket
      .Ret<ffi::AnyBuffer>();  // num_dropped
}

auto dispatch_recv_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Attr<int64_t>("group_id")
      .Attr<int64_t>("num_experts")
      .Attr<int64_t>("fp8")
      .Arg<ffi::AnyBuffer>()   // ticket
      .Arg<ffi::AnyBuffer>()   // active_ranks
      .Ret<ffi::AnyBuffer>()   // x
      .Ret<ffi::AnyBuffer>()   // scales
      .Ret<ffi::AnyBuffer>()   // counts
      .Ret<ffi::AnyBuffer>()   // recv_src_info
      .Ret<ffi::AnyBuffer>()   // recv_topk_slot
      .Ret<ffi::AnyBuffer>();  // layout_range
}

auto combine_send_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Attr<int64_t>("group_id")
      .Attr<int64_t>("num_experts")
      .Arg<ffi::AnyBuffer>()   // y
      .Arg<ffi::AnyBuffer>()   // recv_src_info
      .Arg<ffi::AnyBuffer>()   // recv_topk_slot
      .Arg<ffi::AnyBuffer>()   // recv_count
      .Arg<ffi::AnyBuffer>()   // active_ranks
      .Ret<ffi::AnyBuffer>();  // ticket
}

auto combine_recv_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Attr<int64_t>("group_id")
      .Attr<int64_t>("num_experts")
      .Arg<ffi::AnyBuffer>()   // ticket
      .Arg<ffi::AnyBuffer>()   // topk_idx
      .Arg<ffi::AnyBuffer>()   // topk_weights
      .Arg<ffi::AnyBuffer>()   // active_ranks
      .Ret<ffi::AnyBuffer>();  // out
}

XLA_FFI_DEFINE_HANDLER(kLlDispatchSend, LlDispatchSend<false>, dispatch_send_binding(),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kLlDispatchSendSync, LlDispatchSend<true>, dispatch_send_binding());
XLA_FFI_DEFINE_HANDLER(kLlDispatchRecv, LlDispatchRecv<false>, dispatch_recv_binding(),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kLlDispatchRecvSync, LlDispatchRecv<true>, dispatch_recv_binding());
XLA_FFI_DEFINE_HANDLER(kLlCombineSend, LlCombineSend<false>, combine_send_binding(),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kLlCombineSendSync, LlCombineSend<true>, combine_send_binding());
XLA_FFI_DEFINE_HANDLER(kLlCombineRecv, LlCombineRecv<false>, combine_recv_binding(),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kLlCombineRecvSync, LlCombineRecv<true>, combine_recv_binding());

}  // namespace

void add_low_latency_handlers(HandlerTable& table) {
  table.push_back({"jax_ep_ll_dispatch_send", reinterpret_cast<void*>(kLlDispatchSend)});
  table.push_back({"jax_ep_ll_dispatch_send_sync", reinterpret_cast<void*>(kLlDispatchSendSync)});
  table.push_back({"jax_ep_ll_dispatch_recv", reinterpret_cast<void*>(kLlDispatchRecv)});
  table.push_back({"jax_ep_ll_dispatch_recv_sync", reinterpret_cast<void*>(kLlDispatchRecvSync)});
  table.push_back({"jax_ep_ll_combine_send", reinterpret_cast<void*>(kLlCombineSend)});
  table.push_back({"jax_ep_ll_combine_send_sync", reinterpret_cast<void*>(kLlCombineSendSync)});
  table.push_back({"jax_ep_ll_combine_recv", reinterpret_cast<void*>(kLlCombineRecv)});
  table.push_back({"jax_ep_ll_combine_recv_sync", reinterpret_cast<void*>(kLlCombineRecvSync)});
}

}  // namespace jax_ep::ffi_layer
