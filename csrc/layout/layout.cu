// One warp per token: lane k holds the token's k-th expert. Counts go to shared
// memory first and to global memory once per block, so the result is exact and
// independent of scheduling. A token counts once per rank and once per distinct
// expert (jax_ep/reference.py, get_dispatch_layout).
#include "common/device.cuh"
#include "common/load_kernels.h"
#include "common/rank.cuh"
#include "layout/layout.h"

namespace jax_ep {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads) dispatch_layout_kernel(LayoutArgs a) {
  extern __shared__ int counts[];  // [R] ranks, then [E] experts
  int* rank_counts = counts;
  int* expert_counts = counts + a.num_ranks;
  const int batch_idx = blockIdx.y;
  const int T = a.num_tokens, K = a.num_topk, E = a.num_experts, R = a.num_ranks, e_loc = E / R;
  for (int i = threadIdx.x; i < R + E; i += kThreads) counts[i] = 0;
  __syncthreads();
  const int lane = lane_id();
  const int* idx = a.topk_idx + size_t(batch_idx) * T * K;
  for (int t = blockIdx.x * kWarps + warp_id(); t < T; t += gridDim.x * kWarps) {
    int e = lane < K ? idx[size_t(t) * K + lane] : -1;
    if (lane < K && (e < -1 || e >= E)) record_error(a.err, kErrBadExpert, -1, t, lane, E, e, 0);
    const bool valid = lane < K && e >= 0 && e < E;
    bool first = valid;
    for (int k2 = 0; k2 < K; ++k2) {
      const int other = __shfl_sync(kFullMask, e, k2);
      if (k2 < lane && other == e) first = false;
    }
    if (first) atomicAdd(&expert_counts[e], 1);
    const uint64_t ranks = dest_mask(valid, valid ? e / e_loc : 0);
    bool* row = a.is_token_in_rank + (size_t(batch_idx) * T + t) * R;
    for (int rank = lane; rank < R; rank += 32) {
      const bool in = (ranks >> rank) & 1;
      row[rank] = in;
      if (in) atomicAdd(&rank_counts[rank], 1);
    }
  }
  __syncthreads();
  for (int rank = threadIdx.x; rank < R; rank += kThreads)
    if (rank_counts[rank]) atomicAdd(&a.num_tokens_per_rank[size_t(batch_idx) * R + rank], rank_counts[rank]);
  for (int e = threadIdx.x; e < E; e += kThreads)
    if (expert_counts[e]) atomicAdd(&a.num_tokens_per_expert[size_t(batch_idx) * E + e], expert_counts[e]);
}

}  // namespace

cudaError_t prepare_layout_kernels() {
  return load_kernels(dispatch_layout_kernel);
}

cudaError_t launch_dispatch_layout(const LayoutArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(a.num_tokens_per_rank, 0, sizeof(int) * a.batch * a.num_ranks, stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(a.num_tokens_per_expert, 0, sizeof(int) * a.batch * a.num_experts, stream);
  if (err != cudaSuccess) return err;
  if (a.num_tokens == 0) return cudaSuccess;
  // a warp per token, at most one block per SM (the loop strides over the rest): every
  // block ends by adding its R + E shared counters to global memory, one flush per SM
  const int blocks = min((a.num_tokens + kWarps - 1) / kWarps, a.num_sms);
  const size_t smem = sizeof(int) * (a.num_ranks + a.num_experts);
  dispatch_layout_kernel<<<dim3(blocks, a.batch), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep
