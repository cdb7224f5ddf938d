// Slot addressing of the internode regions (common/buffer_layout.h) and the rank
// arithmetic of the two-level exchange (docs/protocol.md, "Internode").
//
// Rank r sits on node r / P at local index r % P (P = ranks_per_node). A token goes
// once to each destination node, to its *relay*: the rank of the source's local
// index there. The relay forwards it over NVLink; combine runs the same way back.
#pragma once

#include "common/rank.cuh"
#include "high_throughput/common.cuh"

namespace jax_ep {

struct NodeCtx {
  int N, P;   // nodes, ranks per node
  int node;   // this rank's node
  int local;  // this rank's index inside its node
};

__device__ inline NodeCtx node_ctx(const CommContext& c, const RankCtx& r) {
  const int P = c.layout.ranks_per_node();
  return NodeCtx{c.layout.sizes.num_nodes, P, r.rank / P, r.rank % P};
}

__device__ inline uint8_t* net_dispatch_meta(const BufferLayout& layout, uint8_t* base, int parity, int node, int t) {
  return base + layout.net_dispatch_meta +
         ht_slot(layout, parity, layout.sizes.num_nodes, node, t) * layout.meta_bytes_per_token();
}

__device__ inline uint8_t* net_dispatch_row(const BufferLayout& layout, uint8_t* base, int parity, int node, int t) {
  return base + layout.net_dispatch_data + ht_slot(layout, parity, layout.sizes.num_nodes, node, t) * layout.row_bytes;
}

__device__ inline uint8_t* net_combine_row(const BufferLayout& layout, uint8_t* base, int parity, int node, int t) {
  return base + layout.net_combine_data +
         ht_slot(layout, parity, layout.sizes.num_nodes, node, t) * layout.combine_row_bytes;
}

// This rank's staging (private; NVSHMEM's put sources, single-buffered: the puts
// complete before the kernel ends) of its token t: routing row and wire row ...
__device__ inline uint8_t* net_stage_meta(const BufferLayout& layout, uint8_t* base, int t) {
  return base + layout.net_stage_meta + size_t(t) * layout.meta_bytes_per_token();
}

__device__ inline uint8_t* net_stage_row(const BufferLayout& layout, uint8_t* base, int t) {
  return base + layout.net_stage_data + size_t(t) * layout.row_bytes;
}

// ... and, at a relay, its sum of node m's partials of token t.
__device__ inline uint8_t* net_stage_combine(const BufferLayout& layout, uint8_t* base, int m, int t) {
  return base + layout.net_stage_combine + (size_t(m) * layout.sizes.max_tokens + t) * layout.combine_row_bytes;
}

// Row of ht_combine_data (and tag) at the relay where writer `writer` leaves its
// partial of token t of source `src`: one row per (writer's local index, source's
// node). With one node this is [writer][t], the intranode slot.
__device__ inline int relay_slot(const CommContext& c, int writer, int src) {
  const int P = c.layout.ranks_per_node();
  return (writer % P) * c.layout.sizes.num_nodes + src / P;
}

// The relay of `src`'s tokens on `writer`'s node (`src` itself with one node).
__device__ inline int relay_rank(const CommContext& c, int writer, int src) {
  const int P = c.layout.ranks_per_node();
  return (writer / P) * P + src % P;
}

__device__ inline uint32_t* net_combine_tag(const BufferLayout& layout, uint8_t* base, int parity, int slot, int t) {
  return reinterpret_cast<uint32_t*>(base + layout.net_combine_tag) +
         ht_slot(layout, parity, layout.sizes.num_ranks, slot, t);
}

__device__ inline uint64_t* net_signal(uint8_t* base, size_t region, int node) {
  return reinterpret_cast<uint64_t*>(base + region) + node;
}

// The start of every internode kernel (one rank per process under NVSHMEM, so local
// rank 0): false in every thread of the block when it must return at once, because
// the group is closed (docs/protocol.md, "Ordering and lifetime") or this is the
// fault-injected rank (testing: a peer that never arrives). Else this rank's context
// for op counter `counter` and its node's.
__device__ __forceinline__ bool start_internode(const CommContext& c, int counter, RankCtx* r, NodeCtx* nd) {
  if (returns_closed(c)) return false;
  *r = rank_ctx(c, 0, counter);
  if (r->rank == c.fault_inject_rank) return false;
  *nd = node_ctx(c, *r);
  return true;
}

// The nodes of the ranks in `ranks` (bit n set when a rank of node n is in it).
__device__ inline uint64_t nodes_of(uint64_t ranks, int P) {
  uint64_t nodes = 0;
  while (ranks) {
    nodes |= 1ull << ((__ffsll(ranks) - 1) / P);
    ranks &= ranks - 1;
  }
  return nodes;
}

// Lane j (< popc(units)) gets at(u) of the j-th unit set in `units` (warp-uniform);
// returns the count. The row lists of the reductions, built in ascending unit order.
template <typename Ptr, typename At>
__device__ inline int lanes_of_units(uint64_t units, At at, Ptr* mine) {
  int n = 0;
  *mine = nullptr;
  while (units) {
    const int u = __ffsll(units) - 1;
    units &= units - 1;
    if (lane_id() == n) *mine = at(u);
    ++n;
  }
  return n;
}

// A token's block of its source's token range: every rank splits its tokens in the
// same contiguous ranges, so the relay knows which block's signal covers a token.
__device__ inline void block_tokens(int T, int blocks, int block, int* t_begin, int* t_end) {
  const int per = (T + blocks - 1) / blocks;
  *t_begin = min(T, block * per);
  *t_end = min(T, *t_begin + per);
}

// Waits until `region`[n] of this rank reaches `target` for every node n but `skip`;
// false on timeout/abort. `peer_of(n)` names the waited-for rank in the error record.
template <typename PeerOf>
__device__ inline bool wait_nodes(const CommContext& c, const RankCtx& r, size_t region, int skip, uint64_t target,
                                  int phase, PeerOf peer_of) {
  return wait_each(
      c, r, c.layout.sizes.num_nodes, [&](int n) { return n != skip; },
      [&](int n) { return net_signal(r.self, region, n); }, peer_of, target, phase);
}

}  // namespace jax_ep
