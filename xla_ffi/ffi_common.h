// Helpers every jax_ep FFI handler uses: state lookup, error conversion,
// dtype mapping and the loopback (leading rank axis) convention.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common/comm.h"
#include "common/device_types.h"
#include "runtime/runtime.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ep::ffi_layer {

namespace ffi = xla::ffi;

inline ffi::Error invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("jax_ep: " + msg);
}

inline ffi::Error cuda_error(cudaError_t err, const char* what) {
  return ffi::Error::Internal(std::string("jax_ep: ") + what + ": " + cudaGetErrorString(err));
}

// The group's state on this device, or an error naming what is missing. A pending
// device-side error from an earlier call (timeout, bad input) is returned first.
inline ffi::Error lookup(int64_t group_id, int32_t device, cudaStream_t stream, DeviceState** out) {
  DeviceState* s = group_id == 0 ? default_state(device) : find_state(group_id, device);
  if (s == nullptr) {
    return invalid("group " + std::to_string(group_id) + " has no buffers on device " + std::to_string(device) +
                   " (create the jax_ep.Group with a mesh that contains this device, before jit)");
  }
  count_call(s, stream);
  std::string pending = take_error(s);
  if (!pending.empty()) return ffi::Error::Internal(pending + " [reported by a later jax_ep call]");
  if (cudaError_t err = rearm_error_claim(s, stream); err != cudaSuccess) return cuda_error(err, "re-arm error claim");
  *out = s;
  return ffi::Error::Success();
}

// After the launches: surface launch errors; with `sync`, wait and report device errors now.
inline ffi::Error finish(cudaStream_t stream, DeviceState* s, cudaError_t launch, bool sync) {
  if (launch != cudaSuccess) return cuda_error(launch, "kernel launch");
  if (!sync) return ffi::Error::Success();
  cudaError_t err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return cuda_error(err, "cudaStreamSynchronize");
  std::string msg = take_error(s);
  if (!msg.empty()) {
    rearm_error_claim(s, stream);  // ordered before the next call's kernels
    return ffi::Error::Internal(msg);
  }
  return ffi::Error::Success();
}

inline CommContext comm_of(const DeviceState* s) {
  CommContext c;
  std::copy(s->peers.begin(), s->peers.end(), c.peers);
  c.layout = s->layout;
  c.err = s->sink();
  c.timeout_ns = s->timeout_ns;
  c.num_ranks = s->num_ranks;
  c.first_rank = s->first_rank;
  c.num_local_ranks = s->num_local_ranks;
  c.send_blocks = s->send_blocks;
  c.copy_blocks = s->copy_blocks;
  c.fault_inject_rank = s->fault_inject_rank;
  c.sys_scope = s->num_local_ranks < s->num_ranks;
  c.net = s->net;
  return c;
}

// Payload dtype code for kernels; -1 when unsupported.
inline int dtype_code(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32:
      return kF32;
    case ffi::DataType::BF16:
      return kBF16;
    case ffi::DataType::F16:
      return kF16;
    default:
      return -1;
  }
}

inline int element_bytes(ffi::DataType t) {
  switch (t) {
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

// Loopback convention: under jax.vmap (vmap_method="expand_dims") every operand
// gains a leading axis of the virtual ranks; inside shard_map it has none.
// Returns the per-rank dims (without that axis), checking the leading size.
inline ffi::Error per_rank_dims(const ffi::AnyBuffer& b, const char* name, int per_rank_ndim, int num_local_ranks,
                                ffi::Span<const int64_t>* dims) {
  auto all = b.dimensions();
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

// --- checks of one call against the group's buffers (shared by every handler) ---

inline ffi::Error check_num_experts(const DeviceState* s, int64_t num_experts) {
  const int64_t have = int64_t(s->layout.sizes.num_local_experts) * s->num_ranks;
  if (num_experts != have)
    return invalid("num_experts=" + std::to_string(num_experts) + " but the group has " + std::to_string(have));
  return ffi::Error::Success();
}

inline ffi::Error check_routing_shape(const DeviceState* s, int64_t T, int64_t K) {
  const BufferSizes& z = s->layout.sizes;
  if (T > z.max_tokens)
    return invalid("num_tokens=" + std::to_string(T) +
                   " exceeds the group's num_max_tokens_per_rank=" + std::to_string(z.max_tokens));
  if (K < 1 || K > z.num_topk || K > kMaxTopk)
    return invalid("num_topk=" + std::to_string(K) + " not in [1, " + std::to_string(std::min(z.num_topk, kMaxTopk)) +
                   "] (the group's num_topk)");
  return ffi::Error::Success();
}

// A dispatch message's row (raw, or FP8 + one float per 128 channels) must fit the
// group's wire rows; a combine row must fit its combine rows.
inline ffi::Error check_row(const DeviceState* s, int64_t H, int esize, bool fp8, bool dispatch) {
  if (H < 1) return invalid("hidden must be positive, got " + std::to_string(H));
  if (fp8 && H % kFp8Group) return invalid("fp8 needs hidden % 128 == 0, got hidden=" + std::to_string(H));
  const size_t need = fp8 ? size_t(H) + size_t(H / kFp8Group) * 4 : size_t(H) * esize;
  const size_t have = dispatch ? s->layout.row_bytes : s->layout.combine_row_bytes;
  if (need > have)
    return invalid(std::string(dispatch ? "dispatch" : "combine") + " rows of hidden=" + std::to_string(H) +
                   (fp8 ? " (fp8 + scales)" : " x " + std::to_string(esize) + " bytes") + " need " +
                   std::to_string(need) + " bytes but the group's buffers hold " + std::to_string(have) +
                   " (hidden=" + std::to_string(s->layout.sizes.hidden) + ")");
  return ffi::Error::Success();
}

}  // namespace jax_ep::ffi_layer
