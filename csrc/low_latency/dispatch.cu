// Low-latency dispatch over NVLink peer memory (docs/protocol.md, "Low-latency
// dispatch/combine"). Two launches, each serving all ranks of this launch, so XLA can
// schedule work between them:
//   send  per (token, distinct expert on a live rank): write a message (header +
//         raw or FP8 row) into the destination's fixed slot [expert][me][j], where
//         j = number of our earlier tokens that chose the expert; then the rank's last
//         block publishes one count per (expert, source) word with a release store.
//   recv  wait for every live source's count of every local expert, then copy the
//         messages out in (source rank, j) order: exactly the reference's row order.
// No atomics choose slots or rows, so outputs are deterministic.
#include "low_latency/common.cuh"

namespace jax_ep {
namespace {

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

__global__ void __launch_bounds__(kLlSendThreads, 1) ll_dispatch_send(LlDispatchSendArgs a) {
  extern __shared__ int expert_counts[];  // [2][E]: before this block's tokens, in all tokens
  __shared__ uint8_t* peers[kMaxRanks];
  __shared__ int active[kMaxRanks];
  __shared__ int chunk_expert[kChunkEntries];  // [token][k] expert id, -1 when invalid
  __shared__ int chunk_slot[kChunkEntries];    // [token][k] slot j, -1 when nothing is sent
  __shared__ int dropped;
  const CommContext& c = a.c;
  const BufferLayout& L = c.layout;
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
  bool ok = !sends || peer_received(c, r, active, kLlDispatchRecvSeq, kPhaseLlDispatchReuse);

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
    write_ticket(a.ticket, r);
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
        if (j >= 0) {
          const int dest = e / e_loc;
          msg = ll_dispatch_message(L, peers[dest], r.parity, e - dest * e_loc, r.rank, j);
          // header: source token, first k choosing the expert, sequence number (debugging)
          if (u0 == 0) *reinterpret_cast<int4*>(msg) = make_int4(t, lane, int(r.seq), 0);
        }
        const unsigned writers = __ballot_sync(kFullMask, msg != nullptr);
        if (writers == 0) return;
        const int ndst = __popc(writers);
        uint8_t* payload = compact_lanes(msg, writers);
        if (payload) payload += kLowLatencyHeaderBytes;
        const uint8_t* x_row = x + size_t(t) * raw_bytes;
        if (a.fp8) {
          const int h0 = u0 * kQuantUnitChannels, h1 = min(H, u1 * kQuantUnitChannels);
          quantize_row_multi(x_row + size_t(h0) * esize, a.dtype, h1 - h0, a.round_scale,
                             payload ? payload + h0 : nullptr,
                             payload ? reinterpret_cast<float*>(payload + H) + h0 / kFp8Group : nullptr, ndst);
        } else {
          const ByteRange b = unit_range(raw_bytes, units, kCopyUnitBytes, u0, u1);
          copy_row_any(x_row + b.begin, false, b.end - b.begin, payload ? payload + b.begin : nullptr, ndst);
        }
      });
      __syncthreads();  // the chunk buffers are reused
    }
  }

  // --- counts to every live destination, after every block's messages
  if (finish_send(c, r, kLlDispatchSendSeq, c.send_blocks) && sends && !aborted(c, r)) {
    for (int e = threadIdx.x; e < E; e += kLlSendThreads) {
      const int dest = e / e_loc;
      if (active[dest])
        st_release(ll_dispatch_signal(L, peers[dest], r.parity, e - dest * e_loc, r.rank),
                   ll_signal(r.seq, uint32_t(total[e])), c.sys_scope != 0);
    }
  }
}

// ---------------------------------------------------------------------------
// recv
// ---------------------------------------------------------------------------

__global__ void __launch_bounds__(kLlRecvThreads) ll_dispatch_recv(LlDispatchRecvArgs a) {
  extern __shared__ int smem[];
  const CommContext& c = a.c;
  const BufferLayout& L = c.layout;
  const int R = c.num_ranks, E = a.num_experts, e_loc = E / R, H = a.hidden;
  const int T_max = L.sizes.max_tokens;
  int* counts = smem;     // [E_loc][R] messages of (local expert, source)
  int* start = smem + E;  // [E_loc * R + 1] flat exclusive prefix: expert-major, then source
  const int local = blockIdx.x / c.copy_blocks, block = blockIdx.x % c.copy_blocks;
  const RankCtx r = ll_recv_ctx(c, local, a.ticket);
  const int* active = a.active_ranks + size_t(local) * R;
  // nobody sends to a failed rank: it waits for no one and receives nothing
  const bool me_active = active[r.rank] != 0;

  bool ok = true;
  for (int i = threadIdx.x; i < E; i += kLlRecvThreads) {
    const int s = i % R;
    uint32_t n = 0;
    if (ok && me_active && active[s]) {
      uint64_t v = 0;
      ok = wait_tag(ll_dispatch_signal(L, r.self, r.parity, i / R, s), uint32_t(r.seq), s,
                    wait_ctx(c, r, kPhaseLlDispatchSignal), &v);
      n = min(uint32_t(v), uint32_t(T_max));
    }
    counts[i] = int(n);
  }
  ok = __syncthreads_and(ok);
  if (ok) {
    block_exclusive_scan(counts, start, E);
    const size_t RT = size_t(R) * T_max;
    const int scale_cols = H / kFp8Group;
    const size_t payload_bytes = a.fp8 ? size_t(H) : size_t(H) * (a.dtype == kF32 ? 4 : 2);
    uint8_t* out_x = static_cast<uint8_t*>(a.out_x) + size_t(local) * e_loc * RT * payload_bytes;
    float* out_scales = a.fp8 ? a.out_scales + size_t(local) * e_loc * RT * scale_cols : nullptr;
    int* src_info = a.src_info + size_t(local) * e_loc * RT;
    int* topk_slot = a.topk_slot + size_t(local) * e_loc * RT;

    // counts and per-source ranges; begin of source s = rows of lower sources (also for
    // failed sources, which have 0 rows), as the reference defines layout_range
    if (block == 0) {
      for (int i = threadIdx.x; i < E; i += kLlRecvThreads) {
        const int e = i / R, first = start[e * R];
        a.layout_range[(size_t(local) * E + i) * 2] = start[i] - first;
        a.layout_range[(size_t(local) * E + i) * 2 + 1] = counts[i];
        if (i % R == 0) a.out_counts[size_t(local) * e_loc + e] = start[(e + 1) * R] - first;
      }
    }
    // handle entries past each expert's rows (the data rows there stay undefined)
    const size_t stride = size_t(c.copy_blocks) * kLlRecvThreads;
    for (size_t p = size_t(block) * kLlRecvThreads + threadIdx.x; p < size_t(e_loc) * RT; p += stride) {
      const int e = int(p / RT);
      if (int(p % RT) >= start[(e + 1) * R] - start[e * R]) src_info[p] = topk_slot[p] = -1;
    }

    // rows: flat index g over (expert, source, j), cut into units over every warp of the rank
    const int units = row_units(payload_bytes, kCopyUnitBytes);
    const int worker = block * kLlRecvWarps + warp_id();
    for_each_piece(start[E], units, worker, c.copy_blocks * kLlRecvWarps, [&](int g, int u0, int u1) {
      const int es = segment_of(start, E, g), e = es / R, s = es % R;
      const int j = g - start[es], row = start[es] - start[e * R] + j;
      const uint8_t* msg = ll_dispatch_message(L, r.self, r.parity, e, s, j);
      const size_t out_row = size_t(e) * RT + row;
      if (u0 == 0) {
        if (lane_id() == 0) {
          const int4 header = ld_peer16(msg);
          src_info[out_row] = s * T_max + header.x;
          topk_slot[out_row] = header.y;
        }
        if (a.fp8)  // H / 128 floats: 4-byte vectors fit every H
          copy_row_multi<int>(msg + kLowLatencyHeaderBytes + H, true, size_t(scale_cols) * 4,
                              reinterpret_cast<uint8_t*>(out_scales + out_row * scale_cols), 1);
      }
      const ByteRange b = unit_range(payload_bytes, units, kCopyUnitBytes, u0, u1);
      copy_row_any(msg + kLowLatencyHeaderBytes + b.begin, true, b.end - b.begin,
                   out_x + out_row * payload_bytes + b.begin, 1);
    });
  }
  finish_recv(c, r, kLlDispatchRecvSeq, c.copy_blocks);
}

}  // namespace

cudaError_t prepare_ll_dispatch_kernels() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, ll_dispatch_send);
  return err != cudaSuccess ? err : cudaFuncGetAttributes(&attr, ll_dispatch_recv);
}

cudaError_t launch_ll_dispatch_send(const LlDispatchSendArgs& args, cudaStream_t stream) {
  // Every SM, like the receive (a decode step has no compute to leave SMs to, and a
  // block's share of rows is moved with little memory parallelism per warp, so time
  // falls with blocks); blocks split the tokens: no more blocks than tokens.
  LlDispatchSendArgs a = args;
  a.c.send_blocks = blocks_for(a.num_tokens, 1, a.c.copy_blocks);
  const size_t smem = size_t(2) * a.num_experts * sizeof(int);
  ll_dispatch_send<<<a.c.num_local_ranks * a.c.send_blocks, kLlSendThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_ll_dispatch_recv(const LlDispatchRecvArgs& args, cudaStream_t stream) {
  LlDispatchRecvArgs a = args;
  const size_t payload = a.fp8 ? size_t(a.hidden) : size_t(a.hidden) * (a.dtype == kF32 ? 4 : 2);
  a.c.copy_blocks = blocks_for(ll_max_recv_rows(a.c.layout) * row_units(payload, kCopyUnitBytes), kLlRecvWarps,
                               a.c.copy_blocks);
  const size_t smem = (size_t(2) * a.num_experts + 1) * sizeof(int);
  ll_dispatch_recv<<<a.c.num_local_ranks * a.c.copy_blocks, kLlRecvThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep
