// The send half of the low-latency dispatch (docs/protocol.md, "Low-latency
// dispatch/combine"), a template on the transport (low_latency/transport.cuh):
// per (token, distinct expert on a live rank), write a message (header + raw or FP8
// row) into the destination's fixed slot [expert][me][j], where j = number of our
// earlier tokens that chose the expert; then the rank's last block publishes one
// count per (expert, source) word. No atomics choose slots, so outputs are
// deterministic. Ranks on other nodes get the message staged here and put there.
#pragma once

#include "low_latency/common.cuh"

namespace jax_ep {
namespace {

// Staging slot of message (t, k) for a rank on another node (NVSHMEM's source buffer).
__device__ inline uint8_t* ll_stage_message(const BufferLayout& layout, uint8_t* base, int t, int k) {
  return base + layout.ll_stage_dispatch + (size_t(t) * layout.sizes.num_topk + k) * layout.ll_message_bytes();
}

// (token, k) entries of a block's tokens whose expert and slot are staged at a time.
constexpr int kChunkEntries = 1024;

// ---------------------------------------------------------------------------
// send
// ---------------------------------------------------------------------------

// Slots of the staged tokens: a token's slot for expert e is the count of earlier
// tokens that chose e (`before`, advanced here in token order). One warp, lane k;
// entries that send nothing (masked, repeated expert, failed rank) get slot -1.
__device__ inline void assign_slots(const int* chunk_expert, int* chunk_slot, int* before, const int* active,
                                    int num_tokens, int K, int e_loc) {
  const int lane = lane_id();
  for (int i = 0; i < num_tokens; ++i) {
    const int e = lane < K ? chunk_expert[i * K + lane] : -1;
    const unsigned same = __match_any_sync(kFullMask, e);
    const bool sends = e >= 0 && (same & lanemask_lt()) == 0 && active[e / e_loc];
    int j = -1;
    if (sends) {
      j = before[e];
      before[e] = j + 1;  // distinct experts in a row: no two lanes share e
    }
    if (lane < K) chunk_slot[i * K + lane] = j;
    __syncwarp();
  }
}

template <class Net>
__global__ void __launch_bounds__(kLlSendThreads, 1) ll_dispatch_send(LlDispatchSendArgs a) {
  if (returns_closed(a.c)) return;        // docs/protocol.md, "Ordering and lifetime"
  extern __shared__ int expert_counts[];  // [2][E]: before this block's tokens, in all tokens
  __shared__ uint8_t* peers[kMaxRanks];
  __shared__ int active[kMaxRanks];
  __shared__ int chunk_expert[kChunkEntries];  // [token][k] expert id, -1 when invalid
  __shared__ int chunk_slot[kChunkEntries];    // [token][k] slot j, -1 when nothing is sent
  __shared__ int dropped;
  const CommContext& c = a.c;
  const BufferLayout& layout = c.layout;
  const int local = blockIdx.x / c.send_blocks, block = blockIdx.x % c.send_blocks;
  const RankCtx r = rank_ctx(c, local, kLlDispatchSendSeq);
  const int T = a.num_tokens, K = a.num_topk, H = a.hidden, E = a.num_experts, R = c.num_ranks;
  const int e_loc = E / R, esize = a.dtype == kF32 ? 4 : 2;
  const int lane = lane_id(), warp = warp_id();
  int* before = expert_counts;
  int* total = expert_counts + E;
  const int* topk = a.topk_idx + size_t(local) * T * K;

  for (int e = threadIdx.x; e < 2 * E; e += kLlSendThreads) expert_counts[e] = 0;
  if (threadIdx.x < R) {
    peers[threadIdx.x] = c.peers[threadIdx.x];
    active[threadIdx.x] = a.active_ranks[size_t(local) * R + threadIdx.x] != 0;
  }
  if (threadIdx.x == 0) dropped = 0;
  __syncthreads();
  // a failed rank sends nothing; fault injection (testing) makes a peer that never arrives
  const bool sends = active[r.rank] && r.rank != c.fault_inject_rank;
  bool ok = !sends || peer_received<Net>(c, r, active, kLlDispatchRecvSeq, kPhaseLlDispatchReuse);

  // --- counts: every block scans all tokens (T*K entries: cheap), so each knows the
  // slots before its own tokens and the last one knows the totals to publish.
  // Warp = 32/K whole rows; lane = (row, k).
  const int per_block = (T + c.send_blocks - 1) / c.send_blocks;
  const int t_begin = min(T, block * per_block), t_end = min(T, t_begin + per_block);
  const int chunk_tokens = kChunkEntries / K;
  const int rows_per_warp = 32 / K, row_in_warp = lane / K, k = lane - row_in_warp * K;
  int my_dropped = 0;
  for (int t0 = warp * rows_per_warp; t0 < T; t0 += kLlSendWarps * rows_per_warp) {
    const int t = t0 + row_in_warp;
    const bool in = row_in_warp < rows_per_warp && t < T;
    const int e = in ? __ldg(topk + size_t(t) * K + k) : -1;
    if (in && (e < -1 || e >= E) && block == 0) record_error(c.err, kErrBadExpert, r.rank, t, k, E, e, 0);
    const bool valid = in && e >= 0 && e < E;
    // a token counts once per expert: the first k choosing it (rows are whole in the warp).
    // Every lane must take part in the match (masked entries and rows past T included):
    // computing it under `valid &&` left part of the warp out and hung it.
    const uint64_t key = valid ? (uint64_t(t) << 32) | uint32_t(e) : ~uint64_t(0);
    const unsigned same = __match_any_sync(kFullMask, key);
    const bool first = valid && (same & lanemask_lt()) == 0;
    if (first) {
      atomicAdd(&total[e], 1);
      if (t < t_begin) atomicAdd(&before[e], 1);
    }
    if (valid && !active[e / e_loc]) ++my_dropped;  // per selection, as the reference counts
    if (in && t >= t_begin && t < min(t_end, t_begin + chunk_tokens))
      chunk_expert[(t - t_begin) * K + k] = valid ? e : -1;
  }
  my_dropped = warp_sum(my_dropped);
  if (lane == 0 && my_dropped) atomicAdd(&dropped, my_dropped);
  ok = __syncthreads_and(ok);  // also publishes the counts and the first chunk
  if (block == 0 && threadIdx.x == 0) {
    a.num_dropped[local] = dropped;
    write_seq(a.ticket, r.local, r.seq);
  }

  // --- messages, one chunk of this block's tokens at a time
  if (sends && ok) {
    const uint8_t* x = static_cast<const uint8_t*>(a.x) + size_t(local) * T * H * esize;
    const size_t raw_bytes = size_t(H) * esize;
    const int units = a.fp8 ? (H + kQuantUnitChannels - 1) / kQuantUnitChannels : row_units(raw_bytes, kCopyUnitBytes);
    for (int c0 = t_begin; c0 < t_end; c0 += chunk_tokens) {
      const int n = min(chunk_tokens, t_end - c0);
      if (c0 != t_begin) {
        for (int i = threadIdx.x; i < n * K; i += kLlSendThreads) {
          const int e = __ldg(topk + size_t(c0) * K + i);
          chunk_expert[i] = e >= 0 && e < E ? e : -1;
        }
        __syncthreads();
      }
      if (warp == 0) assign_slots(chunk_expert, chunk_slot, before, active, n, K, e_loc);
      __syncthreads();
      for_each_piece(n, units, warp, kLlSendWarps, [&](int i, int u0, int u1) {
        const int t = c0 + i;
        const int e = lane < K ? chunk_expert[i * K + lane] : -1;
        const int j = lane < K ? chunk_slot[i * K + lane] : -1;
        uint8_t* msg = nullptr;
        bool far = false;
        if (j >= 0) {
          const int dest = e / e_loc;
          // a rank on another node: the message is staged here and put there below
          far = is_far<Net>(c, r, dest);
          msg = far ? ll_stage_message(layout, r.self, t, lane)
                    : ll_dispatch_message(layout, peers[dest], r.parity, e - dest * e_loc, r.rank, j);
          // header: source token, first k choosing the expert, sequence number (debugging)
          if (u0 == 0) *reinterpret_cast<int4*>(msg) = make_int4(t, lane, int(r.seq), 0);
        }
        const unsigned writers = __ballot_sync(kFullMask, msg != nullptr);
        if (writers == 0) return;
        const int ndst = __popc(writers);
        uint8_t* payload = compact_lanes(msg, writers);
        if (payload) payload += kLowLatencyHeaderBytes;
        const uint8_t* x_row = x + size_t(t) * raw_bytes;
        // the piece's bytes of the message: [begin, end), and the FP8 scales' [sbegin, send)
        size_t begin, end, sbegin = 0, send = 0;
        if (a.fp8) {
          const int h0 = u0 * kQuantUnitChannels, h1 = min(H, u1 * kQuantUnitChannels);
          quantize_row_multi(x_row + size_t(h0) * esize, a.dtype, h1 - h0, a.round_scale,
                             payload ? payload + h0 : nullptr,
                             payload ? reinterpret_cast<float*>(payload + H) + h0 / kFp8Group : nullptr, ndst);
          begin = h0, end = h1;
          sbegin = H + size_t(h0 / kFp8Group) * 4, send = H + size_t(h1 / kFp8Group) * 4;
        } else {
          const ByteRange b = unit_range(raw_bytes, units, kCopyUnitBytes, u0, u1);
          copy_row_any(x_row + b.begin, false, b.end - b.begin, payload ? payload + b.begin : nullptr, ndst);
          begin = b.begin, end = b.end;
        }
        if constexpr (Net::kNet) {
          unsigned far_lanes = __ballot_sync(kFullMask, far);
          if (!far_lanes) return;
          __syncwarp();  // the staged piece is complete
          const size_t head = u0 == 0 ? 0 : kLowLatencyHeaderBytes + begin;
          for (; far_lanes; far_lanes &= far_lanes - 1) {
            const int k = __ffs(far_lanes) - 1;
            const int ek = __shfl_sync(kFullMask, e, k), jk = __shfl_sync(kFullMask, j, k), dest = ek / e_loc;
            const uint8_t* staged = ll_stage_message(layout, r.self, t, k);
            uint8_t* remote = ll_dispatch_message(layout, r.self, r.parity, ek - dest * e_loc, r.rank, jk);
            Net::put_warp(remote + head, staged + head, kLowLatencyHeaderBytes + end - head, dest);
            if (send > sbegin)
              Net::put_warp(remote + kLowLatencyHeaderBytes + sbegin, staged + kLowLatencyHeaderBytes + sbegin,
                            send - sbegin, dest);
          }
        }
      });
      __syncthreads();  // the chunk buffers are reused
    }
  }

  // --- counts to every live destination, after every block's messages (and puts)
  Net::quiet();
  if (finish_send(c, r, kLlDispatchSendSeq, c.send_blocks) && sends && !aborted(c, r)) {
    for (int e = threadIdx.x; e < E; e += kLlSendThreads) {
      const int dest = e / e_loc;
      if (active[dest])
        publish_signal<Net>(
            c, r, peers, dest,
            [&](uint8_t* base) { return ll_dispatch_signal(layout, base, r.parity, e - dest * e_loc, r.rank); },
            ll_signal(r.seq, uint32_t(total[e])));
    }
  }
}

// Every SM, like the receive (a decode step has no compute to leave SMs to, and a
// block's share of rows is moved with little memory parallelism per warp, so time
// falls with blocks); blocks split the tokens: no more blocks than tokens.
template <class Net>
cudaError_t launch_ll_dispatch_send_with(const LlDispatchSendArgs& args, cudaStream_t stream) {
  LlDispatchSendArgs a = args;
  a.c.send_blocks = blocks_for(a.num_tokens, 1, ll_block_limit(a.c));
  const size_t smem = size_t(2) * a.num_experts * sizeof(int);
  ll_dispatch_send<Net><<<a.c.num_local_ranks * a.c.send_blocks, kLlSendThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace jax_ep
