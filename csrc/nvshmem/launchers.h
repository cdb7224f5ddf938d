// The launchers that move data between nodes with NVSHMEM. They live in a separate
// extension module (_jax_ep_nvshmem, linked against NVSHMEM's device library), which
// hands this table to the main module; groups of one node never need it.
#pragma once

#include <cuda_runtime.h>

#include "high_throughput/params.h"
#include "low_latency/params.h"

namespace jax_ep {

// Bumped whenever a parameter struct, the buffer layout (common/buffer_layout.h, its
// counters included) or this table changes: both modules must agree.
constexpr int kNetOpsAbi = 3;

struct NetOps {
  int abi = kNetOpsAbi;
  // HT dispatch, first hop: stage every token (FP8-quantised if asked) and its routing
  // row, put them to the rank of this local index on every destination node.
  cudaError_t (*ht_dispatch_send)(const HtDispatchArgs&, cudaStream_t) = nullptr;
  // HT combine, middle hop: sum the node's partials of every token and put one row
  // per token and node to its home rank.
  cudaError_t (*ht_combine_relay)(const HtCombineArgs&, cudaStream_t) = nullptr;
  // Low-latency sends with NVSHMEM puts for peers on other nodes.
  cudaError_t (*ll_dispatch_send)(const LlDispatchSendArgs&, cudaStream_t) = nullptr;
  cudaError_t (*ll_combine_send)(const LlCombineSendArgs&, cudaStream_t) = nullptr;
};

}  // namespace jax_ep
