// FFI handlers of get_dispatch_layout. Local to each rank: any leading axes are
// independent routing matrices (loopback ranks).
#include "layout/layout.h"
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/handlers.h"

namespace jax_ep::ffi_layer {
namespace {

template <bool kSync>
ffi::Error DispatchLayout(cudaStream_t stream, int32_t device, int64_t num_experts, int64_t num_ranks,
                          ffi::AnyBuffer topk_idx, ffi::Result<ffi::AnyBuffer> per_rank,
                          ffi::Result<ffi::AnyBuffer> per_expert, ffi::Result<ffi::AnyBuffer> in_rank) {
  DeviceState* state = nullptr;
  JAX_EP_CHECK(open_default(device, stream, &state));
  auto dims = topk_idx.dimensions();
  if (dims.size() < 2) return invalid("topk_idx must be [num_tokens, num_topk]");
  if (topk_idx.element_type() != ffi::DataType::S32) return invalid("topk_idx must be int32");
  if (num_ranks < 1 || num_ranks > kMaxRanks)
    return invalid("num_ranks=" + std::to_string(num_ranks) + " not in [1, 64]");
  if (num_experts % num_ranks) return invalid("num_experts not divisible by num_ranks");
  if (num_experts > kLayoutMaxExperts)
    return invalid("num_experts=" + std::to_string(num_experts) + " > " + std::to_string(kLayoutMaxExperts));
  const int64_t K = dims[dims.size() - 1];
  if (K > kMaxTopk) return invalid("num_topk=" + std::to_string(K) + " > 32");
  LayoutArgs a;
  a.num_tokens = int(dims[dims.size() - 2]);
  a.num_topk = int(K);
  a.batch = int(topk_idx.element_count() / std::max<int64_t>(1, a.num_tokens * K));
  a.num_experts = int(num_experts);
  a.num_ranks = int(num_ranks);
  a.topk_idx = topk_idx.typed_data<int32_t>();
  a.num_tokens_per_rank = static_cast<int*>(per_rank->untyped_data());
  a.num_tokens_per_expert = static_cast<int*>(per_expert->untyped_data());
  a.is_token_in_rank = static_cast<bool*>(in_rank->untyped_data());
  a.err = state->sink();
  a.num_sms = state->num_sms;
  if (a.num_tokens * K == 0) a.batch = int(per_rank->element_count() / num_ranks);
  return finish(stream, state, launch_dispatch_layout(a, stream), kSync);
}

auto layout_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Attr<int64_t>("num_experts")
      .Attr<int64_t>("num_ranks")
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>();
}

JAX_EP_DEFINE_OP_HANDLERS(kLayout, DispatchLayout, layout_binding());

}  // namespace

void add_layout_handlers(HandlerTable& table) {
  // a layout needs no group: no instantiate/initialize stages
  table.push_back({"jax_ep_dispatch_layout", reinterpret_cast<void*>(kLayout)});
  table.push_back({"jax_ep_dispatch_layout_sync", reinterpret_cast<void*>(kLayoutSync)});
}

}  // namespace jax_ep::ffi_layer
