// Slot addressing shared by the high-throughput dispatch and combine kernels.
#pragma once

#include "common/rank.cuh"
#include "high_throughput/params.h"

namespace jax_ep {

// Slot addresses inside a buffer (see common/buffer_layout.h).
__device__ inline uint8_t* dispatch_row(const BufferLayout& layout, uint8_t* base, int parity, int src, int t) {
  return base + layout.ht_dispatch_data +
         ((size_t(parity) * layout.sizes.num_ranks + src) * layout.sizes.max_tokens + t) * layout.row_bytes;
}

__device__ inline uint8_t* dispatch_meta(const BufferLayout& layout, uint8_t* base, int parity, int src, int t) {
  return base + layout.ht_dispatch_meta +
         ((size_t(parity) * layout.sizes.num_ranks + src) * layout.sizes.max_tokens + t) *
             layout.meta_bytes_per_token();
}

__device__ inline uint8_t* combine_row(const BufferLayout& layout, uint8_t* base, int parity, int src, int t) {
  return base + layout.ht_combine_data +
         ((size_t(parity) * layout.sizes.num_ranks + src) * layout.sizes.max_tokens + t) * layout.combine_row_bytes;
}

// The extra float columns that travel with combine_row(.., src, t) (num_topk of them).
__device__ inline float* combine_extra(const BufferLayout& layout, uint8_t* base, int parity, int src, int t) {
  return reinterpret_cast<float*>(base + layout.ht_combine_extra) +
         ((size_t(parity) * layout.sizes.num_ranks + src) * layout.sizes.max_tokens + t) * layout.sizes.num_topk;
}

}  // namespace jax_ep
