#include "xla_ffi/ffi_common.h"

#include <initializer_list>

#include "xla_ffi/handlers.h"

namespace jax_ep::ffi_layer {

ffi::TypeId ExecState::id = {};

namespace {

std::string live_keys_text() {
  std::string out;
  for (const std::string& key : live_group_keys()) out += (out.empty() ? "'" : ", '") + key + "'";
  return out.empty() ? "none" : out;
}

std::string shape_text(ffi::Span<const int64_t> dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "]";
}

// A device-side error recorded by an earlier call (timeout, bad input) is returned
// first; then the error claim is re-armed, ordered before this call's kernels.
ffi::Error take_pending(DeviceState* state, cudaStream_t stream) {
  count_call(state, stream);
  std::string pending = take_error(state);
  if (!pending.empty()) return ffi::Error::Internal(pending + " [reported by a later jax_ep call]");
  if (cudaError_t err = rearm_error_claim(state, stream); err != cudaSuccess)
    return cuda_error(err, "re-arm error claim");
  return ffi::Error::Success();
}

ffi::Error closed_error(const GroupControl& group) {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    "jax_ep: the Group '" + group.key() +
                        "' this program was compiled for has been closed. Create a new Group and trace the "
                        "program again (jit caches traced programs per function: make a new jitted function, "
                        "or call jax.clear_caches()).");
}

}  // namespace

ffi::ErrorOr<std::unique_ptr<ExecState>> bind_group(ffi::Dictionary attrs) {
  ffi::ErrorOr<std::string_view> key = attrs.get<std::string_view>("group");
  if (key.has_error()) return ffi::Unexpected(invalid("a group op needs a string attribute 'group' (the Group's key)"));
  auto exec = std::make_unique<ExecState>();
  exec->group = find_group(std::string(*key));
  if (!exec->group)
    return ffi::Unexpected(
        invalid("this program uses the jax_ep.Group '" + std::string(*key) +
                "', but no live group with that key exists in this process (live groups: " + live_keys_text() +
                "). Create the Group (same name, mesh axis and sizes) before compiling or loading the program."));
  return exec;
}

ffi::Error refuse_closed(ExecState* exec) {
  if (exec->group->closed()) return closed_error(*exec->group);
  return ffi::Error::Success();
}

ffi::Error GroupCall::open(ExecState* exec, int32_t device, cudaStream_t stream, const ffi::AnyBuffer& order_in,
                           const ffi::AnyBuffer& order_out) {
  GroupControl& group = *exec->group;
  lock_ = std::shared_lock<std::shared_mutex>(group.launch_mutex());
  if (group.closed()) return closed_error(group);
  state_ = group.on(device);
  if (state_ == nullptr)
    return invalid("the Group '" + group.key() + "' has no rank on device " + std::to_string(device) +
                   " (create it with a mesh that contains this device)");
  JAX_EP_CHECK(take_pending(state_, stream));
  return check_order(order_in, order_out, state_->num_local_ranks);
}

ffi::Error open_default(int32_t device, cudaStream_t stream, DeviceState** out) {
  *out = default_state(device);
  return take_pending(*out, stream);
}

ffi::Error finish(cudaStream_t stream, DeviceState* state, cudaError_t launch, bool sync) {
  if (launch != cudaSuccess) return cuda_error(launch, "kernel launch");
  if (!sync) return ffi::Error::Success();
  cudaError_t err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return cuda_error(err, "cudaStreamSynchronize");
  std::string msg = take_error(state);
  if (!msg.empty()) {
    rearm_error_claim(state, stream);  // ordered before the next call's kernels
    return ffi::Error::Internal(msg);
  }
  return ffi::Error::Success();
}

CommContext comm_of(const DeviceState* state) {
  CommContext c;
  std::copy(state->peers.begin(), state->peers.end(), c.peers);
  c.layout = state->layout;
  c.err = state->sink();
  c.closed = state->closed_flag();
  c.timeout_ns = state->timeout_ns;
  c.num_ranks = state->num_ranks;
  c.first_rank = state->first_rank;
  c.num_local_ranks = state->num_local_ranks;
  c.send_blocks = state->send_blocks;
  c.copy_blocks = state->copy_blocks;
  c.fault_inject_rank = state->fault_inject_rank;
  c.sys_scope = state->num_local_ranks < state->num_ranks;
  c.ll_one_launch = state->ll_one_launch;
  c.num_sms = state->num_sms;
  c.cooperative = state->cooperative;
  c.net = state->net;
  return c;
}

ffi::Error payload_dtype(ffi::DataType type, const char* name, int* dtype, const char* when) {
  switch (type) {
    case ffi::DataType::F32:
      *dtype = kF32;
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      *dtype = kBF16;
      return ffi::Error::Success();
    case ffi::DataType::F16:
      *dtype = kF16;
      return ffi::Error::Success();
    default:
      return invalid(std::string(name) + " must be float32, bfloat16 or float16" + when);
  }
}

int element_bytes(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32:
    case ffi::DataType::S32:
      return 4;
    case ffi::DataType::BF16:
    case ffi::DataType::F16:
      return 2;
    default:
      return 1;
  }
}

ffi::Error per_rank_dims(const ffi::AnyBuffer& buffer, const char* name, int per_rank_ndim, int num_local_ranks,
                         ffi::Span<const int64_t>* dims) {
  auto all = buffer.dimensions();
  const int nd = int(all.size());
  if (nd == per_rank_ndim && num_local_ranks == 1) {
    *dims = all;
    return ffi::Error::Success();
  }
  if (nd == per_rank_ndim + 1 && all[0] == num_local_ranks) {
    *dims = ffi::Span<const int64_t>(all.begin() + 1, all.size() - 1);
    return ffi::Error::Success();
  }
  return invalid(std::string(name) + " has rank " + std::to_string(nd) + " (leading size " +
                 (nd ? std::to_string(all[0]) : std::string("-")) + ") but this device runs " +
                 std::to_string(num_local_ranks) +
                 " rank(s): loopback groups must be called under jax.vmap over the EP axis, others "
                 "per device inside shard_map");
}

ffi::Error expect(const ffi::AnyBuffer& buffer, const char* name, std::initializer_list<int64_t> want,
                  ffi::DataType type, int num_local_ranks) {
  ffi::Span<const int64_t> dims;
  JAX_EP_CHECK(per_rank_dims(buffer, name, int(want.size()), num_local_ranks, &dims));
  size_t i = 0;
  for (int64_t want_dim : want) {
    if (dims[i++] != want_dim) {
      std::string expected = "[";
      for (int64_t v : want) expected += (expected.size() > 1 ? ", " : "") + std::to_string(v);
      return invalid(std::string(name) + " has per-rank shape " + shape_text(dims) + ", expected " + expected + "]");
    }
  }
  if (buffer.element_type() != type)
    return invalid(std::string(name) + " has element type " + std::to_string(int(buffer.element_type())) +
                   ", expected " + std::to_string(int(type)));
  return ffi::Error::Success();
}

ffi::Error check_order(const ffi::AnyBuffer& in, const ffi::AnyBuffer& out, int num_local_ranks) {
  JAX_EP_CHECK(expect(in, "order token", {2}, ffi::DataType::S32, num_local_ranks));
  return expect(out, "order token (result)", {2}, ffi::DataType::S32, num_local_ranks);
}

ffi::Error check_num_experts(const DeviceState* state, int64_t num_experts) {
  const int64_t have = int64_t(state->layout.sizes.num_local_experts) * state->num_ranks;
  if (num_experts != have)
    return invalid("num_experts=" + std::to_string(num_experts) + " but the group has " + std::to_string(have));
  return ffi::Error::Success();
}

ffi::Error check_routing_shape(const DeviceState* state, int64_t T, int64_t K, bool low_latency) {
  const BufferSizes& sizes = state->layout.sizes;
  const int64_t bound = low_latency ? sizes.ll_max_tokens : sizes.max_tokens;
  if (T > bound)
    return invalid("num_tokens=" + std::to_string(T) + " exceeds the group's " +
                   (low_latency ? "num_max_dispatch_tokens_per_rank=" : "num_max_tokens_per_rank=") +
                   std::to_string(bound));
  if (K < 1 || K > sizes.num_topk || K > kMaxTopk)
    return invalid("num_topk=" + std::to_string(K) + " not in [1, " +
                   std::to_string(std::min(sizes.num_topk, kMaxTopk)) + "] (the group's num_topk)");
  return ffi::Error::Success();
}

ffi::Error check_row(const DeviceState* state, int64_t H, int esize, bool fp8, bool dispatch) {
  if (H < 1) return invalid("hidden must be positive, got " + std::to_string(H));
  if (fp8 && H % kFp8Group) return invalid("fp8 needs hidden % 128 == 0, got hidden=" + std::to_string(H));
  const size_t need = wire_payload_bytes(H, esize, fp8);
  const size_t have = dispatch ? state->layout.row_bytes : state->layout.combine_row_bytes;
  if (need > have)
    return invalid(std::string(dispatch ? "dispatch" : "combine") + " rows of hidden=" + std::to_string(H) +
                   (fp8 ? " (fp8 + scales)" : " x " + std::to_string(esize) + " bytes") + " need " +
                   std::to_string(need) + " bytes but the group's buffers hold " + std::to_string(have) +
                   " (hidden=" + std::to_string(state->layout.sizes.hidden) + ")");
  return ffi::Error::Success();
}

namespace {

XLA_FFI_DEFINE_HANDLER(kBindGroup, bind_group, ffi::Ffi::BindInstantiate().Attrs());
XLA_FFI_DEFINE_HANDLER(kRefuseClosed, refuse_closed, ffi::Ffi::BindInitialize().Ctx<ffi::State<ExecState>>());

}  // namespace

void add_group_op(HandlerTable& table, const std::string& op, XLA_FFI_Handler* plain, XLA_FFI_Handler* sync) {
  for (auto [suffix, execute] : {std::pair{"", plain}, std::pair{"_sync", sync}})
    table.push_back({"jax_ep_" + op + suffix, reinterpret_cast<void*>(execute), reinterpret_cast<void*>(kBindGroup),
                     reinterpret_cast<void*>(kRefuseClosed)});
}

}  // namespace jax_ep::ffi_layer
