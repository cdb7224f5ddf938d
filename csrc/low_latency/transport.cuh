// How the low-latency send kernels reach a destination rank. They are templates on a
// transport `Net`: PeerStores (every peer on this node: loads and stores through
// NVLink peer mappings) is what the main module builds; the NVSHMEM module builds them
// again with NvshmemNet (nvshmem/ll_send.cu), which stages what goes to ranks on
// other nodes in this rank's symmetric buffer and puts it there.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/rank.cuh"

namespace jax_ep {

struct PeerStores {
  static constexpr bool kNet = false;
  __device__ static void put_warp(uint8_t*, const uint8_t*, size_t, int) {}
  __device__ static void quiet() {}
  __device__ static void signal_set(uint64_t*, uint64_t, int) {}
  __device__ static uint64_t get_u64(const uint64_t*, int) { return 0; }
};

// True when `rank` is reached through the transport's puts rather than stores.
template <class Net>
__device__ inline bool is_far(const CommContext& c, const RankCtx& r, int rank) {
  return Net::kNet && !((node_peers(c, r.rank) >> rank) & 1);
}

// Publishes a signal word `word_at(base)` in rank `dest`'s buffer: a release store
// through the peer mapping, or (another node) a signal put after this rank's puts.
template <class Net, typename WordAt>
__device__ inline void publish_signal(const CommContext& c, const RankCtx& r, const uint8_t* const* peers, int dest,
                                      WordAt word_at, uint64_t value) {
  if (is_far<Net>(c, r, dest))
    Net::signal_set(word_at(r.self), value, dest);
  else
    st_release(word_at(const_cast<uint8_t*>(peers[dest])), value, c.sys_scope != 0);
}

}  // namespace jax_ep
