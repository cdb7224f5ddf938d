// Parameter structs and launchers of the low-latency (decode) kernels.
// Semantics: jax_ep/reference.py, low_latency_dispatch / low_latency_combine.
// Protocol: docs/protocol.md, "Low-latency dispatch/combine".
#pragma once

#include <cuda_runtime.h>

#include "common/comm.h"

namespace jax_ep {

// Largest expert count: the send kernel keeps two per-expert counters in shared memory.
constexpr int kLlMaxExperts = 4096;

// Send half of a dispatch: quantise (optionally) and write each (token, distinct
// expert) message into the destination's fixed slot, then signal per-expert counts.
struct LlDispatchSendArgs {
  CommContext c;
  int num_tokens = 0, hidden = 0, num_topk = 0, num_experts = 0;
  int dtype = 1;  // DType of x
  int fp8 = 0, round_scale = 0;
  const void* x = nullptr;            // [L, T, H]
  const int* topk_idx = nullptr;      // [L, T, K]
  const int* active_ranks = nullptr;  // [L, R] (1 alive, 0 failed)
  int* num_dropped = nullptr;         // [L] selections not sent: destination marked failed
  int* ticket = nullptr;              // [L, 2] the op's sequence number (lo, hi): its receive's operand
                                      // and its ordering token
};

// Receive half: wait for every live source's counts, then copy the messages into the
// expert-major output in (source rank, source token) order.
struct LlDispatchRecvArgs {
  CommContext c;
  int hidden = 0, num_topk = 0, num_experts = 0;
  int dtype = 1;  // DType of the bf16/f16/f32 payload when fp8 == 0
  int fp8 = 0;
  const int* ticket = nullptr;        // [L, 2] the send's sequence number: the op this receive serves
  const int* active_ranks = nullptr;  // [L, R]
  void* out_x = nullptr;              // [L, E_loc, R*T_max, H] fp8 or dtype
  float* out_scales = nullptr;        // [L, E_loc, R*T_max, H/128] (fp8 only)
  int* out_counts = nullptr;          // [L, E_loc]
  int* src_info = nullptr;            // [L, E_loc, R*T_max] s*T_max + t, -1 past the count
  int* topk_slot = nullptr;           // [L, E_loc, R*T_max] first k choosing the expert, -1 past the count
  int* layout_range = nullptr;        // [L, E_loc, R, 2] (begin, count)
  int* order = nullptr;               // [L, 2] the op's sequence number: its ordering token
};

// Send half of a combine: each expert-output row goes to its home rank's
// [token][k] slot; then one signal per home rank.
struct LlCombineSendArgs {
  CommContext c;
  int hidden = 0, num_topk = 0, num_experts = 0;
  int dtype = 1;                      // DType of y
  const void* y = nullptr;            // [L, E_loc, R*T_max, H]
  const int* src_info = nullptr;      // [L, E_loc, R*T_max]
  const int* topk_slot = nullptr;     // [L, E_loc, R*T_max]
  const int* recv_count = nullptr;    // [L, E_loc]
  const int* active_ranks = nullptr;  // [L, R]
  int* ticket = nullptr;              // [L, 2] the op's sequence number (lo, hi): its receive's operand
};

// Receive half: wait for every live rank, then out[t] = Σ_k w[t,k] * row(t, k) in k order.
struct LlCombineRecvArgs {
  CommContext c;
  int num_tokens = 0, hidden = 0, num_topk = 0, num_experts = 0;
  int dtype = 1;
  const int* ticket = nullptr;    // [L, 2] the send's sequence number: the op this receive serves
  const int* topk_idx = nullptr;  // [L, T, K]
  const float* topk_weights = nullptr;
  const int* active_ranks = nullptr;  // [L, R]
  void* out = nullptr;                // [L, T, H]
  int* order = nullptr;               // [L, 2] the op's sequence number: its ordering token
};

cudaError_t launch_ll_dispatch_send(const LlDispatchSendArgs& args, cudaStream_t stream);
cudaError_t launch_ll_dispatch_recv(const LlDispatchRecvArgs& args, cudaStream_t stream);
cudaError_t launch_ll_combine_send(const LlCombineSendArgs& args, cudaStream_t stream);
cudaError_t launch_ll_combine_recv(const LlCombineRecvArgs& args, cudaStream_t stream);
// The one-call forms: both halves, in one launch where the group allows it
// (low_latency/common.cuh, one_launch), else the two launches above. The send's
// ticket and the receive's ticket and order may all be the op's ordering token.
cudaError_t launch_ll_dispatch(const LlDispatchSendArgs& send, const LlDispatchRecvArgs& recv, cudaStream_t stream);
cudaError_t launch_ll_combine(const LlCombineSendArgs& send, const LlCombineRecvArgs& recv, cudaStream_t stream);
// Loads the kernels on the current device (see runtime.h, preload_kernels).
cudaError_t prepare_ll_kernels();

}  // namespace jax_ep
