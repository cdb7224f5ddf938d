// What every jax_ep FFI handler shares: the per-executable group binding and its
// stages, the one check macro, attribute and dtype decoding, the loopback (leading
// rank axis) convention and the size checks against a group's buffers.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>

#include "common/comm.h"
#include "common/device_types.h"
#include "runtime/runtime.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ep::ffi_layer {

namespace ffi = xla::ffi;

// Returns the error of a check that failed: the one way handlers propagate errors.
#define JAX_EP_CHECK(expr)                                                           \
  do {                                                                               \
    if (::xla::ffi::Error jax_ep_e_ = (expr); jax_ep_e_.failure()) return jax_ep_e_; \
  } while (0)

inline ffi::Error invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("jax_ep: " + msg);
}

inline ffi::Error cuda_error(cudaError_t err, const char* what) {
  return ffi::Error::Internal(std::string("jax_ep: ") + what + ": " + cudaGetErrorString(err));
}

// --- the group a program was compiled for (docs/protocol.md, "Ordering and lifetime") ---

// Per-executable state (ffi::State): shared ownership of the group's control, so the
// program never reaches a freed one, and a closed group is refused, not mistaken for
// a newer group with the same key.
struct ExecState {
  static ffi::TypeId id;
  std::shared_ptr<GroupControl> group;
};

// INSTANTIATE (once per executable, when it is compiled or loaded): bind to the live
// group named by the `group` attribute (the key Python's Group builds).
ffi::ErrorOr<std::unique_ptr<ExecState>> bind_group(ffi::Dictionary attrs);
// INITIALIZE (before every execution, a replayed CUDA graph included): refuse a
// closed group before anything is launched.
ffi::Error refuse_closed(ExecState* exec);

// One execute-stage call of a group op: the group is open and has ranks on this
// device, and the op's ordering token in (`order_in`) and out (`order_out`) is
// well-formed (check_order); holds the group's launch lock (shared) until the
// launches are enqueued.
class GroupCall {
 public:
  ffi::Error open(ExecState* exec, int32_t device, cudaStream_t stream, const ffi::AnyBuffer& order_in,
                  const ffi::AnyBuffer& order_out);
  DeviceState* state() const { return state_; }

 private:
  std::shared_lock<std::shared_mutex> lock_;
  DeviceState* state_ = nullptr;
};

// The error record of an op without a group (dispatch_layout): a pending device-side
// error from an earlier call is returned first.
ffi::Error open_default(int32_t device, cudaStream_t stream, DeviceState** out);

// After the launches: surface launch errors; with `sync`, wait and report device errors now.
ffi::Error finish(cudaStream_t stream, DeviceState* state, cudaError_t launch, bool sync);

CommContext comm_of(const DeviceState* state);

// The sizes and payload type of one call, which every launch-parameter struct
// carries under these names (num_tokens, where the kernels read it, is set apart).
template <typename Args>
void set_sizes(Args& a, const DeviceState* state, int64_t H, int64_t K, int64_t num_experts, int dtype) {
  a.c = comm_of(state);
  a.hidden = int(H);
  a.num_topk = int(K);
  a.num_experts = int(num_experts);
  a.dtype = dtype;
}

// The kernels' code (DType) of a payload of element type `type`, or the error
// "<name> must be float32, bfloat16 or float16<when>".
ffi::Error payload_dtype(ffi::DataType type, const char* name, int* dtype, const char* when = "");
int element_bytes(ffi::DataType type);

// Loopback convention: under jax.vmap (vmap_method="expand_dims") every operand
// gains a leading axis of the virtual ranks; inside shard_map it has none.
// Returns the per-rank dims (without that axis), checking the leading size.
ffi::Error per_rank_dims(const ffi::AnyBuffer& buffer, const char* name, int per_rank_ndim, int num_local_ranks,
                         ffi::Span<const int64_t>* dims);
// Per-rank dims of `b`, which must equal `want`, and its element type.
ffi::Error expect(const ffi::AnyBuffer& buffer, const char* name, std::initializer_list<int64_t> want,
                  ffi::DataType type, int num_local_ranks);
// The ordering token every group op takes and returns: [2] int32 per rank (the op's
// sequence number, written by its last kernel).
ffi::Error check_order(const ffi::AnyBuffer& in, const ffi::AnyBuffer& out, int num_local_ranks);

// --- checks of one call against the group's buffers (shared by every handler) ---
ffi::Error check_num_experts(const DeviceState* state, int64_t num_experts);
// T tokens (at most the group's bound for the op family) and top-k K.
ffi::Error check_routing_shape(const DeviceState* state, int64_t T, int64_t K, bool low_latency);
// A dispatch message's row (raw, or FP8 + one float per 128 channels) must fit the
// group's wire rows; a combine row must fit its combine rows.
ffi::Error check_row(const DeviceState* state, int64_t H, int esize, bool fp8, bool dispatch);

}  // namespace jax_ep::ffi_layer
