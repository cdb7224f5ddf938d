// High-throughput combine over NVLink peer memory (docs/protocol.md, "HT combine").
//
//   send  expert side: for each received token, reduce its rows over the local
//         experts in float32 and k order (one partial per token and rank: fewer
//         link bytes than one row per expert), cast to the payload dtype and store
//         it in the home rank's [source rank][token] slot; add to arrival words.
//   recv  home side: wait for every peer, then add the partials of the ranks each
//         token went to, in ascending rank order, in float32. Not launched when the
//         group has one rank: every token is home-only (below) and the send ends the op.
// Both orders are fixed, so results are deterministic and match the reference.
// Internode groups (docs/protocol.md, "Internode") send partials to the relay of the
// home rank's local index on the writer's node instead, tagged with the op's sequence
// number; the relay sums its node's partials and puts one row per node home
// (ht_net_combine_relay), and the receive adds the nodes' rows in ascending order.
#include "common/load_kernels.h"
#include "common/rows.cuh"
#include "high_throughput/internode.cuh"
#include "nvshmem/launchers.h"

namespace jax_ep {
namespace {

// Ranks a home token went to (lane k < K reads its k-th expert).
__device__ inline uint64_t token_ranks(const HtCombineArgs& a, int local, int t) {
  const int lane = lane_id(), K = a.num_topk, E = a.num_experts, e_loc = E / a.c.num_ranks;
  const int e = lane < K ? a.topk_idx[(size_t(local) * a.num_tokens + t) * K + lane] : -1;
  const bool valid = lane < K && e >= 0 && e < E;
  return dest_mask(valid, valid ? e / e_loc : 0);
}

// A token whose experts all live on its home rank needs no exchange: the send kernel
// writes its sum straight to the output and the receive kernel leaves it alone.
__device__ inline bool home_only(const HtCombineArgs& a, const RankCtx& r, int t) {
  return token_ranks(a, r.local, t) == (1ull << r.rank);
}

// Zeros for the tokens that chose no expert at all (every k masked): their sum is
// empty. The receive kernel writes them; a one-rank group has no receive kernel, so
// its send writes them.
__device__ inline void zero_unrouted_tokens(const HtCombineArgs& a, int local, int block, int blocks, uint8_t* out,
                                            size_t row_bytes) {
  for (int t = block * kHtWarps + warp_id(); t < a.num_tokens; t += blocks * kHtWarps) {
    if (token_ranks(a, local, t) != 0) continue;
    zero_row(out + size_t(t) * row_bytes, row_bytes);
    if (lane_id() < a.num_extra) a.out_extra[(size_t(local) * a.num_tokens + t) * a.num_extra + lane_id()] = 0.f;
  }
}

__global__ void __launch_bounds__(kHtThreads) ht_combine_send(HtCombineArgs a) {
  if (returns_closed(a.c)) return;  // docs/protocol.md, "Ordering and lifetime"
  const CommContext& c = a.c;
  const int blocks = gridDim.x / c.num_local_ranks;  // see launch_ht_combine
  const int local = blockIdx.x / blocks, block = blockIdx.x % blocks;
  const RankCtx r = rank_ctx(c, local, kHtCombineSeq);
  // testing: a peer that never arrives (a group of one rank has no peer to wait for it)
  if (c.num_ranks > 1 && r.rank == c.fault_inject_rank) return;
  const int lane = lane_id();
  const int T = a.num_tokens, R = c.num_ranks, kr = a.rows_per_token;
  const size_t RT = size_t(R) * T;
  const int esize = dtype_bytes(a.dtype);
  const size_t row_bytes = size_t(a.hidden) * esize;
  const uint8_t* y = static_cast<const uint8_t*>(a.y) + size_t(local) * a.num_y_rows * row_bytes;
  const int* recv_src = a.recv_src + local * RT;
  const int* recv_rows = a.recv_rows + local * RT * kr;
  const float* weights = a.weights ? a.weights + local * RT * kr : nullptr;
  const int n = a.num_recv[local];
  const bool net = c.layout.sizes.num_nodes > 1;
  uint8_t* out = static_cast<uint8_t*>(a.out) + size_t(local) * T * row_bytes;
  // fewer received tokens than warps (1024 tokens on 132 SMs x 16 warps): each token's
  // row is cut into parts of whole units, one warp each, so every warp has loads in
  // flight; the arithmetic per element is the same
  const int warps = blocks * kHtWarps;
  const int units = row_units(row_bytes, kSumUnitBytes);
  const int parts = min(units, max(1, n > 0 ? warps / n : 1));
  for (long long piece = block * kHtWarps + warp_id(); piece < (long long)n * parts; piece += warps) {
    const int i = int(piece / parts), part = int(piece % parts);
    const ByteRange b = unit_range(row_bytes, units, kSumUnitBytes, units * part / parts, units * (part + 1) / parts);
    const int p = recv_src[i], src = p / T, t = p % T;
    const int row = lane < kr ? recv_rows[size_t(i) * kr + lane] : -1;
    const float w = lane < kr ? (weights ? weights[size_t(i) * kr + lane] : 1.f) : 0.f;
    const uint8_t* my_row = row >= 0 ? y + size_t(row) * row_bytes + b.begin : nullptr;
    uint8_t* dst;
    float* extra_dst = nullptr;
    if (src == r.rank && home_only(a, r, t)) {
      dst = out + size_t(t) * row_bytes;
      if (a.num_extra) extra_dst = a.out_extra + (size_t(local) * T + t) * a.num_extra;
    } else {
      const int relay = relay_rank(c, r.rank, src), slot = relay_slot(c, r.rank, src);
      dst = combine_row(c.layout, c.peers[relay], r.parity, slot, t);
      if (a.num_extra) extra_dst = combine_extra(c.layout, c.peers[relay], r.parity, slot, t);
      if (net && lane == 0 && part == 0)
        *net_combine_tag(c.layout, c.peers[relay], r.parity, slot, t) = uint32_t(r.seq);
    }
    weighted_sum_rows(my_row, w, kr, false, a.dtype, int((b.end - b.begin) / esize), dst + b.begin);
    if (part == 0 && lane < a.num_extra) extra_dst[lane] = a.extra[(local * RT + i) * a.num_extra + lane];
  }
  if (R == 1) {  // every routed token is home-only: this kernel writes the whole output, and ends the op
    zero_unrouted_tokens(a, local, block, blocks, out, row_bytes);
    finish_op(c, r, kHtCombineSeq, blocks, a.order);
  } else {
    publish_arrival(c, r, c.layout.ht_combine_arrival);
  }
}

__global__ void __launch_bounds__(kHtThreads) ht_combine_recv(HtCombineArgs a) {
  if (returns_closed(a.c)) return;  // docs/protocol.md, "Ordering and lifetime"
  const CommContext& c = a.c;
  const BufferLayout& layout = c.layout;
  const int local = blockIdx.x / c.copy_blocks, block = blockIdx.x % c.copy_blocks;
  const RankCtx r = rank_ctx(c, local, kHtCombineSeq);
  const uint64_t target = r.seq * uint64_t(c.copy_blocks);  // one arrival per send (or relay) block
  const bool net = layout.sizes.num_nodes > 1;
  const int P = layout.ranks_per_node(), me_local = r.rank % P;
  // one node: every peer's partials; several: every other node's summed row (our own
  // node's relay is this rank, whose relay kernel ran before this one)
  const bool ok = net ? wait_nodes(c, r, layout.net_combine_signal, r.rank / P, target, kPhaseNetCombineArrival,
                                   [&](int m) { return m * P + me_local; })
                      : wait_all_peers(c, r, layout.ht_combine_arrival, target, kPhaseHtCombineArrival);
  if (ok) {
    const int T = a.num_tokens;
    const int esize = dtype_bytes(a.dtype);
    uint8_t* out = static_cast<uint8_t*>(a.out) + size_t(local) * T * a.hidden * esize;
    for (int t = block * kHtWarps + warp_id(); t < T; t += c.copy_blocks * kHtWarps) {
      const uint64_t ranks = token_ranks(a, local, t);
      if (ranks == (1ull << r.rank)) continue;  // written by the send kernel
      // lane j holds the j-th contributing rank's (or node's) row, in ascending order
      const uint8_t* my_row;
      const int n =
          net ? lanes_of_units(
                    nodes_of(ranks, P), [&](int m) { return net_combine_row(layout, r.self, r.parity, m, t); }, &my_row)
              : lanes_of_units(ranks, [&](int d) { return combine_row(layout, r.self, r.parity, d, t); }, &my_row);
      weighted_sum_rows(my_row, 1.f, n, true, a.dtype, a.hidden, out + size_t(t) * a.hidden * esize);
      if (a.num_extra) {  // the extra columns: the same ranks, ascending, in float32
        float acc = 0.f;
        for (uint64_t rest = ranks; rest; rest &= rest - 1) {
          const int d = __ffsll(rest) - 1;
          if (lane_id() < a.num_extra) acc += __ldcg(combine_extra(layout, r.self, r.parity, d, t) + lane_id());
        }
        if (lane_id() < a.num_extra) a.out_extra[(size_t(local) * T + t) * a.num_extra + lane_id()] = acc;
      }
    }
  }
  finish_op(c, r, kHtCombineSeq, c.copy_blocks, a.order);
}

}  // namespace

cudaError_t prepare_ht_combine_kernels() {
  return load_kernels(ht_combine_send, ht_combine_recv);
}

cudaError_t launch_ht_combine(const HtCombineArgs& a, cudaStream_t stream) {
  const CommContext& c = a.c;
  const int L = c.num_local_ranks;
  // The send kernel's main work is the expert-side reduction, which reads every expert
  // row from local memory: it gets the copy kernels' blocks, not the NVLink budget.
  ht_combine_send<<<L * c.copy_blocks, kHtThreads, 0, stream>>>(a);
  if (c.layout.sizes.num_nodes > 1) {
    if (cudaError_t err = c.net->ht_combine_relay(a, stream); err != cudaSuccess) return err;
  }
  if (c.num_ranks > 1) ht_combine_recv<<<L * c.copy_blocks, kHtThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep
