// The send half of the low-latency combine (docs/protocol.md, "Low-latency
// dispatch/combine"), a template on the transport (low_latency/transport.cuh): every
// received row goes back unreduced to its home rank's [token][first k] slot (the
// handle says which); then the rank's last block sets a flag in every live home rank.
// Home ranks on other nodes get the row staged here and put there.
#pragma once

#include "low_latency/common.cuh"

namespace jax_ep {
namespace {

// The send phase, run by block `block` of rank `local` (c.send_blocks per rank): the
// ll_combine_send kernel, or the first half of the one-launch ll_combine. `peers` and
// `active` are the kernel's shared tables (filled here); `*rank` gets the op's
// context; `*self_here`: see run_both_phases. False when the group is closed: nothing
// was touched.
template <class Net>
__device__ __forceinline__ bool combine_send_phase(const LlCombineSendArgs& a, int local, int block, uint8_t** peers,
                                                   int* active, RankCtx* rank, bool* self_here) {
  extern __shared__ int smem[];
  const CommContext& c = a.c;
  const BufferLayout& layout = c.layout;
  const int R = c.num_ranks, e_loc = a.num_experts / R, T_max = layout.sizes.ll_max_tokens;
  const size_t RT = size_t(R) * T_max;
  int* counts = smem;           // [E_loc] rows per local expert
  int* offsets = smem + e_loc;  // [E_loc + 1] flat exclusive prefix

  // XLA operands before the closed check, whose barrier publishes them (one round trip)
  for (int e = threadIdx.x; e < e_loc; e += kLlSendThreads)
    counts[e] = min(max(a.recv_count[size_t(local) * e_loc + e], 0), int(RT));
  load_peer_table(c, a.active_ranks, local, peers, active);
  if (returns_closed(c)) return false;  // docs/protocol.md, "Ordering and lifetime"
  bool sends;
  bool ok =
      begin_send<Net>(c, local, kLlCombineSendSeq, kLlCombineRecvDone, kPhaseLlCombineReuse, active, rank, &sends);
  const RankCtx r = *rank;
  block_exclusive_scan(counts, offsets, e_loc);
  ok = __syncthreads_and(ok);
  if (block == 0 && threadIdx.x == 0) write_seq(a.ticket, r.local, r.seq);

  if (sends && ok) {
    const size_t row_bytes = size_t(a.hidden) * dtype_bytes(a.dtype);
    const uint8_t* y = static_cast<const uint8_t*>(a.y) + size_t(local) * e_loc * RT * row_bytes;
    const int* src_info = a.src_info + size_t(local) * e_loc * RT;
    const int* topk_slot = a.topk_slot + size_t(local) * e_loc * RT;
    const int units = row_units(row_bytes, kCopyUnitBytes);
    const int worker = block * kLlSendWarps + warp_id();
    for_each_piece(offsets[e_loc], units, worker, c.send_blocks * kLlSendWarps, [&](int flat, int u0, int u1) {
      const int e = segment_of(offsets, e_loc, flat);
      const size_t row = size_t(e) * RT + (flat - offsets[e]);
      const int src = __ldg(src_info + row), k = __ldg(topk_slot + row);
      const int s = src / T_max, t = src - s * T_max;
      // a handle that did not come from this group's dispatch: skip rather than scribble
      if (src < 0 || s >= R || !active[s] || k < 0 || k >= layout.sizes.num_topk) return;
      const ByteRange b = unit_range(row_bytes, units, kCopyUnitBytes, u0, u1);
      // a home rank on another node: staged here (row `flat` of the staging region), put there
      const bool far = is_far<Net>(c, r, s);
      if (far && size_t(flat) >= ll_max_recv_rows(layout)) return;  // staging holds what a dispatch delivers
      uint8_t* dst = far ? r.self + layout.ll_stage_combine + size_t(flat) * layout.combine_row_bytes
                         : ll_combine_row(layout, peers[s], r.parity, t, k);
      copy_row_any(y + row * row_bytes + b.begin, false, b.end - b.begin, dst + b.begin, 1);
      if (far) {
        __syncwarp();
        Net::put_warp(ll_combine_row(layout, r.self, r.parity, t, k) + b.begin, dst + b.begin, b.end - b.begin, s);
      }
    });
  }

  // --- one flag per live home rank, after every block's rows (and puts)
  Net::quiet();
  const bool publish = finish_send(c, r, kLlCombineSendSeq, c.send_blocks, sends, ok);
  const int peer = threadIdx.x;
  if (publish && peer < R && active[peer] && !(*self_here && peer == r.rank))
    publish_signal<Net>(
        c, r, peers, peer, [&](uint8_t* base) { return ll_combine_signal(layout, base, r.parity, r.rank); },
        ll_signal(r.seq, 1));
  *self_here = *self_here && publish;
  return true;
}

template <class Net>
__global__ void __launch_bounds__(kLlSendThreads, 1) ll_combine_send(LlCombineSendArgs a) {
  run_send_kernel(a, [](auto&&... p) { return combine_send_phase<Net>(p...); });
}

// Blocks per rank of a combine send: the most rows a dispatch can deliver here (of
// `tokens` per source when known: ll_max_recv_rows), spread over every warp (as the
// dispatch send: launch_ll_dispatch_send_with says why).
inline int ll_combine_send_blocks(const LlCombineSendArgs& a, long long tokens = -1) {
  const size_t row_bytes = size_t(a.hidden) * dtype_bytes(a.dtype);
  return blocks_for(ll_max_recv_rows(a.c.layout, tokens) * row_units(row_bytes, kCopyUnitBytes), kLlSendWarps,
                    ll_block_limit(a.c));
}

inline size_t ll_combine_send_smem(const LlCombineSendArgs& a) {
  return (size_t(2) * (a.num_experts / a.c.num_ranks) + 1) * sizeof(int);
}

template <class Net>
cudaError_t launch_ll_combine_send_with(const LlCombineSendArgs& args, cudaStream_t stream) {
  LlCombineSendArgs a = args;
  a.c.send_blocks = ll_combine_send_blocks(a);
  ll_combine_send<Net><<<a.c.num_local_ranks * a.c.send_blocks, kLlSendThreads, ll_combine_send_smem(a), stream>>>(a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace jax_ep
