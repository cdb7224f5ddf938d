// The NVSHMEM device calls the internode kernels make, in one place. Only sources of
// the NVSHMEM module (compiled as relocatable device code, device-linked against
// libnvshmem_device.a) include this. Destinations are symmetric addresses: this
// rank's own buffer base plus the region offset, which names the same bytes on `pe`.
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "high_throughput/internode.cuh"

namespace jax_ep {

// Non-blocking put by the whole warp; complete after net_quiet().
__device__ __forceinline__ void net_put_warp(uint8_t* dst, const uint8_t* src, size_t bytes, int pe) {
  nvshmemx_putmem_nbi_warp(dst, src, bytes, pe);
}

// Every put this thread (and its warp) issued has landed at its destination.
__device__ __forceinline__ void net_quiet() {
  nvshmem_quiet();
}

__device__ __forceinline__ void net_signal_add(uint64_t* word, uint64_t value, int pe) {
  nvshmemx_signal_op(word, value, NVSHMEM_SIGNAL_ADD, pe);
}

__device__ __forceinline__ void net_signal_set(uint64_t* word, uint64_t value, int pe) {
  nvshmemx_signal_op(word, value, NVSHMEM_SIGNAL_SET, pe);
}

// A word of `pe`'s copy of a symmetric object (a remote read: microseconds over RDMA).
__device__ __forceinline__ uint64_t net_get_u64(const uint64_t* word, int pe) {
  return nvshmem_uint64_g(word, pe);
}

// End of a block of an NVSHMEM hop: once the block's puts have landed, +1 on our
// node's word of `region` at the rank of our local index on every other node.
__device__ inline void signal_other_nodes(uint8_t* self, size_t region, const NodeCtx& nd) {
  net_quiet();
  __syncthreads();
  const int m = threadIdx.x;
  if (m < nd.N && m != nd.node) net_signal_add(net_signal(self, region, nd.node), 1, m * nd.P + nd.local);
}

}  // namespace jax_ep
