// Parameter structs and launchers of the high-throughput kernels.
// Plain C++: the FFI layer fills these from XLA buffers; no XLA types here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/comm.h"

namespace jax_ep {

// Dispatch output layouts (jax_ep/handles.py LAYOUTS); the nanobind module exports
// kLayoutNames to Python, so the ids are written only here.
enum LayoutKind : int32_t { kPerRank = 0, kExpertMajor = 1, kRagged = 2 };
constexpr const char* kLayoutNames[] = {"per_rank", "expert_major", "ragged"};  // indexed by LayoutKind

// One dispatch call. Inputs/outputs are [num_local_ranks, ...] contiguous.
struct HtDispatchArgs {
  CommContext c;
  int num_tokens = 0, hidden = 0, num_topk = 0, num_experts = 0;
  int layout_kind = kExpertMajor;
  int capacity = 0;
  int dtype = 1;  // DType of x
  int fp8 = 0, round_scale = 0;
  const void* x = nullptr;
  const int* topk_idx = nullptr;
  const float* topk_weights = nullptr;  // may be null (cached token dispatch)
  void* out_x = nullptr;
  float* out_scales = nullptr;        // fp8 only
  int* out_topk_idx = nullptr;        // per_rank only
  float* out_topk_weights = nullptr;  // per_rank only
  int* out_counts = nullptr;          // per_rank [1], else [E_loc]
  int* out_dropped = nullptr;         // [1]
  int* recv_src = nullptr;            // [R*T]
  int* recv_topk_idx = nullptr;       // [R*T, K]
  int* recv_rows = nullptr;           // [R*T, K] (per_rank: [R*T, 1])
  float* recv_weights = nullptr;      // [R*T, K]
  int* num_recv = nullptr;            // [1]
  int* order = nullptr;               // [2] the op's sequence number: its ordering token
};

// One combine call: expert-side rows back to the tokens' home ranks.
struct HtCombineArgs {
  CommContext c;
  int num_tokens = 0, hidden = 0, num_topk = 0, num_experts = 0;
  int dtype = 1;                   // DType of y and out
  int rows_per_token = 1;          // Kr: columns of recv_rows / weights
  int num_y_rows = 0;              // rows of y (flattened)
  const void* y = nullptr;         // [num_y_rows, hidden]
  const int* recv_src = nullptr;   // [R*T]
  const int* recv_rows = nullptr;  // [R*T, Kr]
  const float* weights = nullptr;  // [R*T, Kr] or null (= 1)
  const int* num_recv = nullptr;   // [1]
  const int* topk_idx = nullptr;   // home routing [T, K]
  // Optional float columns sent with each partial and summed at home like the rows
  // (the router weights' cotangents in the backward of dispatch): one exchange for both.
  int num_extra = 0;             // X <= the group's num_topk; 0 = none
  const float* extra = nullptr;  // [R*T, X] per received token
  float* out_extra = nullptr;    // [T, X]
  void* out = nullptr;           // [T, hidden]
  int* order = nullptr;          // [2] the op's sequence number: its ordering token
};

cudaError_t launch_ht_dispatch(const HtDispatchArgs& args, cudaStream_t stream);
// The dispatch of a group that runs whole in this launch (EP=1, loopback) as one
// kernel (dispatch_here.cu: which kernel, and where); false where none applies (the
// caller launches the bitmap form), `*err` the launch's error otherwise.
bool launch_ht_dispatch_whole(const HtDispatchArgs& args, cudaStream_t stream, cudaError_t* err);
// The send phase alone: token rows into the destinations' [source][token] slots,
// arrival words bumped (intranode send, or the two internode hops).
cudaError_t launch_ht_dispatch_send(const HtDispatchArgs& args, cudaStream_t stream);
// A dispatch whose routing is known (the backward of combine): the send phase, then
// received token i's row copied to out_x[i] by the handle's recv_src (an input here),
// zeros past the received tokens. Uses x, topk_idx, recv_src, out_x, order.
cudaError_t launch_ht_cached_dispatch(const HtDispatchArgs& args, cudaStream_t stream);
cudaError_t launch_ht_combine(const HtCombineArgs& args, cudaStream_t stream);
// Groups spanning nodes: the relay's NVLink forwarding of tokens that arrived through
// NVSHMEM (relay_forward.cu); the NVSHMEM hops themselves are in nvshmem/launchers.h.
cudaError_t launch_ht_dispatch_forward(const HtDispatchArgs& args, cudaStream_t stream);
// Loads the kernels on the current device (see runtime.h, preload_kernels).
cudaError_t prepare_ht_dispatch_kernels();
cudaError_t prepare_ht_combine_kernels();
cudaError_t prepare_ht_forward_kernels();
cudaError_t prepare_ht_cached_dispatch_kernels();
cudaError_t prepare_ht_dispatch_here_kernels();

}  // namespace jax_ep
