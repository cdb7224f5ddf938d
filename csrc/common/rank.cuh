// Per-rank context of a launch and the cross-rank synchronisation every kernel
// family uses: sequence numbers, arrival words, bounded waits, op completion.
#pragma once

#include "common/comm.h"
#include "common/device.cuh"

namespace jax_ep {

// One local rank's view of a launch: which rank it is, its buffer, and the
// sequence number of the op (previous ops of this type + 1). Odd/even sequence
// numbers alternate between the two halves of each double-buffered region.
struct RankCtx {
  int local;      // index among the ranks of this launch
  int rank;       // global EP rank
  uint8_t* self;  // this rank's buffer
  uint64_t seq;
  int parity;
};

// True in every thread of the block once the group is closed: every kernel of a group
// op returns at its first instruction then, before touching a buffer (a CUDA graph
// replayed after Group.close(); docs/protocol.md, "Ordering and lifetime"). One thread
// reads the flag and the barrier hands its answer to all, so no thread of a block can
// see a different value and wait alone at a later barrier.
__device__ inline bool returns_closed(const CommContext& c) {
  return __syncthreads_or(threadIdx.x == 0 && *reinterpret_cast<const volatile int*>(c.closed) != 0);
}

// Writes the op's sequence number (lo, hi) for local rank `local` into an [L, 2]
// int32 output: the ordering token of the op, and a low-latency send's ticket.
__device__ inline void write_seq(int* out, int local, uint64_t seq) {
  out[2 * local] = int(uint32_t(seq));
  out[2 * local + 1] = int(uint32_t(seq >> 32));
}

__device__ inline uint64_t* counters_of(const CommContext& c, uint8_t* base) {
  return reinterpret_cast<uint64_t*>(base + c.layout.counters);
}

__device__ inline RankCtx rank_ctx(const CommContext& c, int local, int counter) {
  RankCtx r;
  r.local = local;
  r.rank = c.first_rank + local;
  r.self = c.peers[r.rank];
  r.seq = *reinterpret_cast<volatile uint64_t*>(counters_of(c, r.self) + counter) + 1;
  r.parity = int(r.seq & 1);
  return r;
}

__device__ inline WaitContext wait_ctx(const CommContext& c, const RankCtx& r, int phase) {
  return WaitContext{c.err, counters_of(c, r.self) + kAbortFlag, c.timeout_ns, r.rank, phase, c.sys_scope != 0};
}

__device__ inline bool aborted(const CommContext& c, const RankCtx& r) {
  return *reinterpret_cast<volatile uint64_t*>(counters_of(c, r.self) + kAbortFlag) != 0;
}

// Nodes (internode groups): ranks [n * P, (n + 1) * P) form node n, P = ranks_per_node.
__host__ __device__ inline int node_of(const CommContext& c, int rank) {
  return rank / c.layout.ranks_per_node();
}

// The ranks of `rank`'s node, as a mask (every rank when there is one node).
__host__ __device__ inline uint64_t node_peers(const CommContext& c, int rank) {
  const int P = c.layout.ranks_per_node();
  const uint64_t block = P >= 64 ? ~0ull : (1ull << P) - 1;
  return block << (node_of(c, rank) * P);
}

// Threads i < count of the block each wait, where waits(i), until *word_of(i) >= target
// (bounded); false in every thread on timeout/abort of any. peer_of(i) is the rank the
// error record names.
template <typename Waits, typename WordOf, typename PeerOf>
__device__ inline bool wait_each(const CommContext& c, const RankCtx& r, int count, Waits waits, WordOf word_of,
                                 PeerOf peer_of, uint64_t target, int phase) {
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  const int i = threadIdx.x;
  if (i < count && waits(i) && !wait_geq(word_of(i), target, peer_of(i), wait_ctx(c, r, phase))) failed = 1;
  __syncthreads();
  return failed == 0;
}

// Waits until every peer in `peers` but this rank has added `target` to this rank's
// arrival word; returns false on timeout/abort.
__device__ inline bool wait_all_peers(const CommContext& c, const RankCtx& r, size_t arrival_offset, uint64_t target,
                                      int phase, uint64_t peers = ~0ull) {
  const uint64_t* words = reinterpret_cast<const uint64_t*>(r.self + arrival_offset);
  return wait_each(
      c, r, c.num_ranks, [&](int peer) { return peer != r.rank && ((peers >> peer) & 1); },
      [&](int peer) { return words + peer; }, [](int peer) { return peer; }, target, phase);
}

// Every block of a send kernel ends here: make its stores visible at the group's
// scope (fence(sys_scope): system scope when a peer is another GPU), then add one to the arrival word of this rank in
// every peer's buffer of its node (all peers when there is one node; other nodes hear through NVSHMEM signals).
__device__ inline void publish_arrival(const CommContext& c, const RankCtx& r, size_t arrival_offset) {
  fence(c.sys_scope);
  __syncthreads();
  const int peer = threadIdx.x;
  if (peer < c.num_ranks && peer != r.rank && ((node_peers(c, r.rank) >> peer) & 1)) {
    uint64_t* word = reinterpret_cast<uint64_t*>(c.peers[peer] + arrival_offset) + r.rank;
    add_release(word, 1, c.sys_scope);
  }
}

// True in every thread of the rank's last block to get here (the blocks' earlier work
// is ordered before what that block does next: fence + arrival, arrival + fence).
// `done` is the counter of arrivals: a kernel that elects a last block twice (the two
// phases of a one-launch low-latency op) uses one per election, since a block can
// reach the second while others are still on their way to the first.
__device__ inline bool last_block(const CommContext& c, const RankCtx& r, int blocks_per_rank, int done = kDoneBlocks) {
  __shared__ int last;
  __syncthreads();
  // a rank served by one block (a small decode batch) is its own last block: the
  // barrier orders its work, and the fence and counter round trip would be pure latency
  if (blocks_per_rank == 1) return true;
  if (threadIdx.x == 0) {
    uint64_t* ctr = counters_of(c, r.self);
    __threadfence();
    const unsigned long long arrived = atomicAdd(reinterpret_cast<unsigned long long*>(ctr + done), 1ull);
    last = arrived + 1 == uint64_t(blocks_per_rank);
    if (last) {
      ctr[done] = 0;  // the next kernel starts after this one ends
      __threadfence();
    }
  }
  __syncthreads();
  return last != 0;
}

// The last block of a rank to finish bumps the op's sequence number (no block may
// bump it while another still reads it at its start) and writes the op's ordering
// token `order` ([L, 2] int32).
__device__ inline void finish_op(const CommContext& c, const RankCtx& r, int counter, int blocks_per_rank, int* order) {
  if (last_block(c, r, blocks_per_rank) && threadIdx.x == 0) {
    counters_of(c, r.self)[counter] = r.seq;
    write_seq(order, r.local, r.seq);
    __threadfence();
  }
}

// Destination ranks of a token: lane k < K holds expert `e` (or -1).
__device__ inline uint64_t dest_mask(bool valid, int dest) {
  const uint32_t lo = __reduce_or_sync(kFullMask, valid && dest < 32 ? 1u << dest : 0u);
  const uint32_t hi = __reduce_or_sync(kFullMask, valid && dest >= 32 ? 1u << (dest - 32) : 0u);
  return uint64_t(lo) | (uint64_t(hi) << 32);
}

}  // namespace jax_ep
