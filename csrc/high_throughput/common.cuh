// Block shape and slot addressing shared by the high-throughput dispatch and combine kernels.
#pragma once

#include "common/rank.cuh"
#include "high_throughput/params.h"

namespace jax_ep {

// Threads per block of every high-throughput kernel that moves token rows, a warp per
// row at a time (dispatch's bitmap and scan kernels size their own blocks).
constexpr int kHtThreads = 512;
constexpr int kHtWarps = kHtThreads / 32;

// Slot addresses inside a buffer (see common/buffer_layout.h). Every high-throughput
// region written by others is [2][senders][T_max] rows: the half of the op's parity,
// the sender's (rank's or node's) block, the token.
__device__ __forceinline__ size_t ht_slot(const BufferLayout& layout, int parity, int senders, int sender, int t) {
  return (size_t(parity) * senders + sender) * layout.sizes.max_tokens + t;
}

__device__ inline uint8_t* dispatch_row(const BufferLayout& layout, uint8_t* base, int parity, int src, int t) {
  return base + layout.ht_dispatch_data + ht_slot(layout, parity, layout.sizes.num_ranks, src, t) * layout.row_bytes;
}

__device__ inline uint8_t* dispatch_meta(const BufferLayout& layout, uint8_t* base, int parity, int src, int t) {
  return base + layout.ht_dispatch_meta +
         ht_slot(layout, parity, layout.sizes.num_ranks, src, t) * layout.meta_bytes_per_token();
}

__device__ inline uint8_t* combine_row(const BufferLayout& layout, uint8_t* base, int parity, int src, int t) {
  return base + layout.ht_combine_data +
         ht_slot(layout, parity, layout.sizes.num_ranks, src, t) * layout.combine_row_bytes;
}

// The extra float columns that travel with combine_row(.., src, t) (num_topk of them).
__device__ inline float* combine_extra(const BufferLayout& layout, uint8_t* base, int parity, int src, int t) {
  return reinterpret_cast<float*>(base + layout.ht_combine_extra) +
         ht_slot(layout, parity, layout.sizes.num_ranks, src, t) * layout.sizes.num_topk;
}

// Every rank of the group runs in this launch (EP=1, or loopback with all its virtual
// ranks): each source's routing and rows are XLA operands of the launch ([L, T, ...],
// index src - first_rank), so the receive side reads them there and nothing is sent,
// staged or waited for; each token row moves once (x to the output), as in the local
// path, instead of twice through the wire slots. Not with fault injection, whose
// tests need a sender that never arrives.
__host__ __device__ inline bool whole_group_here(const CommContext& c) {
  return c.num_local_ranks == c.num_ranks && c.fault_inject_rank < 0;
}

// Whether source rank `src`'s operands are in this launch (its index: src - first_rank):
// always for the rank itself, for every source when the whole group is.
__device__ inline bool reads_operands(const CommContext& c, int rank, int src) {
  return src == rank || whole_group_here(c);
}

}  // namespace jax_ep
