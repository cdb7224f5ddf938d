// get_dispatch_layout: per-rank and per-expert token counts and the token-in-rank mask.
#pragma once

#include <cuda_runtime.h>

#include "common/error_record.h"

namespace jax_ep {

struct LayoutArgs {
  int batch = 1;  // independent routing matrices (loopback ranks)
  int num_tokens = 0, num_topk = 0, num_experts = 0, num_ranks = 1;
  int num_sms = 0;                       // SMs of the device: at most a block per SM and routing matrix
  const int* topk_idx = nullptr;         // [batch, T, K]
  int* num_tokens_per_rank = nullptr;    // [batch, R]
  int* num_tokens_per_expert = nullptr;  // [batch, E]
  bool* is_token_in_rank = nullptr;      // [batch, T, R]
  ErrorSink err;                         // bad expert ids are recorded here
};

// Largest expert count the kernel's shared-memory counters hold.
constexpr int kLayoutMaxExperts = 8192;

cudaError_t launch_dispatch_layout(const LayoutArgs& args, cudaStream_t stream);
cudaError_t prepare_layout_kernels();

}  // namespace jax_ep
