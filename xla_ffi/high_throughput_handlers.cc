// FFI handlers of the high-throughput dispatch and combine: read shapes from the
// buffers (shape-polymorphic), check them against the group's buffers, fill the
// launch parameters. Semantics live in jax_ep/reference.py, kernels in csrc/intranode.

#include "high_throughput/params.h"
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/handlers.h"

namespace jax_ep::ffi_layer {
namespace {

// Checks that one call fits the buffers the group allocated: routing, the wire row of
// the payload (raw or FP8), the combine row of a raw payload, the expert count.
ffi::Error check_fits(const DeviceState* s, int64_t T, int64_t K, int64_t H, int esize, bool fp8, int64_t E) {
  if (ffi::Error e = check_routing_shape(s, T, K); e.failure()) return e;
  if (ffi::Error e = check_row(s, H, esize, fp8, true); e.failure()) return e;
  if (ffi::Error e = check_row(s, H, esize, false, false); e.failure()) return e;
  return check_num_experts(s, E);
}

template <bool kSync>
ffi::Error HtDispatch(cudaStream_t stream, int32_t device, int64_t group_id, int64_t layout_kind, int64_t num_experts,
                      int64_t fp8, int64_t round_scale, ffi::AnyBuffer x, ffi::AnyBuffer topk_idx,
                      ffi::AnyBuffer topk_weights, ffi::Result<ffi::AnyBuffer> out_x,
                      ffi::Result<ffi::AnyBuffer> out_scales, ffi::Result<ffi::AnyBuffer> out_topk_idx,
                      ffi::Result<ffi::AnyBuffer> out_topk_weights, ffi::Result<ffi::AnyBuffer> out_counts,
                      ffi::Result<ffi::AnyBuffer> out_dropped, ffi::Result<ffi::AnyBuffer> recv_src,
                      ffi::Result<ffi::AnyBuffer> recv_topk_idx, ffi::Result<ffi::AnyBuffer> recv_rows,
                      ffi::Result<ffi::AnyBuffer> recv_weights, ffi::Result<ffi::AnyBuffer> num_recv) {
  DeviceState* s = nullptr;
  if (ffi::Error e = lookup(group_id, device, stream, &s); e.failure()) return e;
  const int L = s->num_local_ranks;
  ffi::Span<const int64_t> xd, id, wd;
  if (ffi::Error e = per_rank_dims(x, "x", 2, L, &xd); e.failure()) return e;
  if (ffi::Error e = per_rank_dims(topk_idx, "topk_idx", 2, L, &id); e.failure()) return e;
  if (ffi::Error e = per_rank_dims(topk_weights, "topk_weights", 2, L, &wd); e.failure()) return e;
  const int dtype = dtype_code(x.element_type());
  if (dtype < 0) return invalid("x must be float32, bfloat16 or float16");
  if (topk_idx.element_type() != ffi::DataType::S32) return invalid("topk_idx must be int32");
  if (topk_weights.element_type() != ffi::DataType::F32) return invalid("topk_weights must be float32");
  const int64_t T = xd[0], H = xd[1], K = id[1];
  if (id[0] != T || wd[0] != T || wd[1] != K) return invalid("x, topk_idx and topk_weights disagree on shapes");
  if (layout_kind < kPerRank || layout_kind > kRagged) return invalid("unknown layout " + std::to_string(layout_kind));
  // capacity is read from the output's shape: it may be symbolic in the exported program
  ffi::Span<const int64_t> od;
  const int out_ndim = layout_kind == kExpertMajor ? 3 : 2;
  if (ffi::Error e = per_rank_dims(*out_x, "output x", out_ndim, L, &od); e.failure()) return e;
  const int64_t capacity = od[out_ndim - 2];
  if (capacity <= 0) return invalid("capacity must be positive, got " + std::to_string(capacity));
  if (ffi::Error e = check_fits(s, T, K, H, element_bytes(x.element_type()), fp8 != 0, num_experts); e.failure())
    return e;
  const int64_t e_loc = num_experts / s->num_ranks;
  const int64_t rows_out = layout_kind == kExpertMajor ? e_loc * capacity : capacity;
  const int64_t payload = fp8 ? H : H * element_bytes(x.element_type());
  if (int64_t(out_x->size_bytes()) != L * rows_out * payload)
    return invalid("output x has " + std::to_string(out_x->size_bytes()) + " bytes, expected " +
                   std::to_string(L * rows_out * payload));
  if (int64_t(recv_src->element_count()) != L * s->num_ranks * T)
    return invalid("recv_src must have num_ranks * num_tokens entries per rank");

  HtDispatchArgs a;
  a.c = comm_of(s);
  a.num_tokens = int(T);
  a.hidden = int(H);
  a.num_topk = int(K);
  a.num_experts = int(num_experts);
  a.layout_kind = int(layout_kind);
  a.capacity = int(capacity);
  a.dtype = dtype;
  a.fp8 = int(fp8 != 0);
  a.round_scale = int(round_scale != 0);
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.typed_data<int32_t>();
  a.topk_weights = topk_weights.typed_data<float>();
  a.out_x = out_x->untyped_data();
  a.out_scales = fp8 ? static_cast<float*>(out_scales->untyped_data()) : nullptr;
  a.out_topk_idx = static_cast<int*>(out_topk_idx->untyped_data());
  a.out_topk_weights = static_cast<float*>(out_topk_weights->untyped_data());
  a.out_counts = static_cast<int*>(out_counts->untyped_data());
  a.out_dropped = static_cast<int*>(out_dropped->untyped_data());
  a.recv_src = static_cast<int*>(recv_src->untyped_data());
  a.recv_topk_idx = static_cast<int*>(recv_topk_idx->untyped_data());
  a.recv_rows = static_cast<int*>(recv_rows->untyped_data());
  a.recv_weights = static_cast<float*>(recv_weights->untyped_data());
  a.num_recv = static_cast<int*>(num_recv->untyped_data());
  return finish(stream, s, launch_ht_dispatch(a, stream), kSync);
}

template <bool kSync>
ffi::Error HtCombine(cudaStream_t stream, int32_t device, int64_t group_id, int64_t num_experts, ffi::AnyBuffer y,
                     ffi::AnyBuffer recv_src, ffi::AnyBuffer recv_rows, ffi::AnyBuffer weights, ffi::AnyBuffer num_recv,
                     ffi::AnyBuffer topk_idx, ffi::Result<ffi::AnyBuffer> out) {
  DeviceState* s = nullptr;
  if (ffi::Error e = lookup(group_id, device, stream, &s); e.failure()) return e;
  const int L = s->num_local_ranks;
  ffi::Span<const int64_t> yd, sd, rd, wd, nd, id;
  if (ffi::Error e = per_rank_dims(y, "y", 2, L, &yd); e.failure()) return e;
  if (ffi::Error e = per_rank_dims(recv_src, "recv_src", 1, L, &sd); e.failure()) return e;
  if (ffi::Error e = per_rank_dims(recv_rows, "recv_rows", 2, L, &rd); e.failure()) return e;
  if (ffi::Error e = per_rank_dims(weights, "weights", 2, L, &wd); e.failure()) return e;
  if (ffi::Error e = per_rank_dims(num_recv, "num_recv", 0, L, &nd); e.failure()) return e;
  if (ffi::Error e = per_rank_dims(topk_idx, "topk_idx", 2, L, &id); e.failure()) return e;
  const int dtype = dtype_code(y.element_type());
  if (dtype < 0) return invalid("y must be float32, bfloat16 or float16");
  if (weights.element_type() != ffi::DataType::F32) return invalid("weights must be float32");
  const int64_t T = id[0], K = id[1], H = yd[1], RT = sd[0];
  if (RT != int64_t(s->num_ranks) * T) return invalid("recv_src must have num_ranks * num_tokens entries");
  if (rd[0] != RT || wd[0] != RT || wd[1] != rd[1] || rd[1] > kMaxTopk)
    return invalid("recv_rows / weights must be [num_ranks * num_tokens, <=32]");
  if (ffi::Error e = check_fits(s, T, K, H, element_bytes(y.element_type()), false, num_experts); e.failure()) return e;
  HtCombineArgs a;
  a.c = comm_of(s);
  a.num_tokens = int(T);
  a.hidden = int(H);
  a.num_topk = int(K);
  a.num_experts = int(num_experts);
  a.dtype = dtype;
  a.rows_per_token = int(rd[1]);
  a.num_y_rows = int(yd[0]);
  a.y = y.untyped_data();
  a.recv_src = recv_src.typed_data<int32_t>();
  a.recv_rows = recv_rows.typed_data<int32_t>();
  a.weights = weights.typed_data<float>();
  a.num_recv = num_recv.typed_data<int32_t>();
  a.topk_idx = topk_idx.typed_data<int32_t>();
  a.out = out->untyped_data();
  return finish(stream, s, launch_ht_combine(a, stream), kSync);
}

auto dispatch_binding() {
  auto b = ffi::Ffi::Bind()
               .Ctx<ffi::PlatformStream<cudaStream_t>>()
               .Ctx<ffi::DeviceOrdinal>()
               .Attr<int64_t>("group_id")
               .Attr<int64_t>("layout_kind")
               .Attr<int64_t>("num_experts")
               .Attr<int64_t>("fp8")
               .Attr<int64_t>("round_scale")
               .Arg<ffi::AnyBuffer>()
               .Arg<ffi::AnyBuffer>()
               .Arg<ffi::AnyBuffer>();
  return std::move(b)
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>();
}

auto combine_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Attr<int64_t>("group_id")
      .Attr<int64_t>("num_experts")
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>();
}

XLA_FFI_DEFINE_HANDLER(kHtDispatch, HtDispatch<false>, dispatch_binding(), {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kHtDispatchSync, HtDispatch<true>, dispatch_binding());
XLA_FFI_DEFINE_HANDLER(kHtCombine, HtCombine<false>, combine_binding(), {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kHtCombineSync, HtCombine<true>, combine_binding());

}  // namespace

void add_high_throughput_handlers(HandlerTable& table) {
  table.push_back({"jax_ep_ht_dispatch", reinterpret_cast<void*>(kHtDispatch)});
  table.push_back({"jax_ep_ht_dispatch_sync", reinterpret_cast<void*>(kHtDispatchSync)});
  table.push_back({"jax_ep_ht_combine", reinterpret_cast<void*>(kHtCombine)});
  table.push_back({"jax_ep_ht_combine_sync", reinterpret_cast<void*>(kHtCombineSync)});
}

}  // namespace jax_ep::ffi_layer
