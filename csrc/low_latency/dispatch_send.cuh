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
// send: the phases of ll_dispatch_send, in the order it runs them
// ---------------------------------------------------------------------------

// The send phase's per-expert counts in dynamic shared memory, [2][E]: before this
// block's tokens, then in all tokens (the totals it publishes). The one-launch receive
// phase reads its own rank's totals here (dispatch_recv_phase, self_here).
__device__ __forceinline__ int* send_counts_before(int* smem) {
  return smem;
}
__device__ __forceinline__ int* send_counts_total(int* smem, int E) {
  return smem + E;
}

// The sizes of one dispatch send, as every phase reads them.
struct LlDispatchShape {
  int T, K, H, E, e_loc, esize;
};

__device__ __forceinline__ LlDispatchShape dispatch_send_shape(const LlDispatchSendArgs& a) {
  const int E = a.num_experts;
  return LlDispatchShape{a.num_tokens, a.num_topk, a.hidden, E, E / a.c.num_ranks, dtype_bytes(a.dtype)};
}

// The expert of routing entry (row, k) for lane row * K + k of a warp that covers the
// 32 / K whole rows from t0; -1 for lanes past T or past the whole rows.
__device__ __forceinline__ int routing_entry(const int* topk, int T, int K, int t0) {
  const int row = lane_id() / K, t = t0 + row;
  return row < 32 / K && t < T ? __ldg(topk + size_t(t) * K + lane_id() - row * K) : -1;
}

// The first rows a warp of count_routing takes.
__device__ __forceinline__ int first_routed_row(int K) {
  return warp_id() * (32 / K);
}

// Counts: every block scans all T*K routing entries (cheap), so each knows the slots
// before its own tokens [t_begin, ...) (`before`) and the last one knows the totals to
// publish (`total`). On the way it records bad expert ids (block 0 only, so once),
// adds the selections of failed ranks to `dropped` (per selection, as the reference
// counts) and stages the experts of its first chunk of tokens ([t_begin, chunk_end)).
// Warp = 32/K whole rows, lane = (row, k); every thread of the block calls it. `first_e`:
// the thread's entry of its warp's first rows (routing_entry at first_routed_row),
// loaded by the caller before the closed check so that both reads share a round trip.
__device__ __forceinline__ void count_routing(const CommContext& c, const RankCtx& r, const LlDispatchShape& shape,
                                              const int* topk, const int* active, int block, int t_begin, int chunk_end,
                                              int first_e, int* before, int* total, int* chunk_expert, int* dropped) {
  const int T = shape.T, K = shape.K, E = shape.E;
  const int lane = lane_id(), warp = warp_id();
  const int rows_per_warp = 32 / K, row_in_warp = lane / K, k = lane - row_in_warp * K;
  int my_dropped = 0;
  for (int t0 = first_routed_row(K); t0 < T; t0 += kLlSendWarps * rows_per_warp) {
    const int t = t0 + row_in_warp;
    const bool in = row_in_warp < rows_per_warp && t < T;
    const int e = t0 == first_routed_row(K) ? first_e : routing_entry(topk, T, K, t0);
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
    if (valid && !active[e / shape.e_loc]) ++my_dropped;
    if (in && t >= t_begin && t < chunk_end) chunk_expert[(t - t_begin) * K + k] = valid ? e : -1;
  }
  my_dropped = warp_sum(my_dropped);
  if (lane == 0 && my_dropped) atomicAdd(dropped, my_dropped);
}

// Experts of tokens [t0, t0 + n) into the chunk buffer (-1 when masked or out of
// range: count_routing already recorded those); the later chunks of a block.
__device__ __forceinline__ void stage_chunk_experts(const LlDispatchShape& shape, const int* topk, int t0, int n,
                                                    int* chunk_expert) {
  for (int i = threadIdx.x; i < n * shape.K; i += kLlSendThreads) {
    const int e = __ldg(topk + size_t(t0) * shape.K + i);
    chunk_expert[i] = e >= 0 && e < shape.E ? e : -1;
  }
}

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

// Where lane k writes message (t, k) for expert e, slot j: the destination's slot, or
// (a rank on another node, `*far`) this rank's staging slot, put there by
// put_far_piece. The piece that starts the row (`header`) writes the header: source
// token, first k choosing the expert, sequence number (debugging).
template <class Net>
__device__ __forceinline__ uint8_t* message_slot(const CommContext& c, const RankCtx& r, uint8_t* const* peers,
                                                 int e_loc, int t, int k, int e, int j, bool header, bool* far) {
  const int dest = e / e_loc;
  *far = is_far<Net>(c, r, dest);
  uint8_t* msg = *far ? ll_stage_message(c.layout, r.self, t, k)
                      : ll_dispatch_message(c.layout, peers[dest], r.parity, e - dest * e_loc, r.rank, j);
  if (header) *reinterpret_cast<int4*>(msg) = make_int4(t, k, int(r.seq), 0);
  return msg;
}

// The bytes of a message one piece covers, after the header: [begin, end) of the
// row, and (FP8) the scales' [sbegin, send).
struct PieceBytes {
  size_t begin, end, sbegin, send;
};

// Writes units [u0, u1) of token row x_row, quantised to FP8 or raw, into the messages
// of the lanes in `writers` (lane j's `msg` if its bit is set) with one read of the
// row. Warp-uniform: every lane calls it with the same writers, u0 and u1.
__device__ __forceinline__ PieceBytes write_piece(const LlDispatchSendArgs& a, const LlDispatchShape& shape,
                                                  const uint8_t* x_row, uint8_t* msg, unsigned writers,
                                                  size_t raw_bytes, int units, int u0, int u1) {
  const int H = shape.H, ndst = __popc(writers);
  uint8_t* payload = compact_lanes(msg, writers);
  if (payload) payload += kLowLatencyHeaderBytes;
  PieceBytes bytes{0, 0, 0, 0};
  if (a.fp8) {
    const int h0 = u0 * kQuantUnitChannels, h1 = min(H, u1 * kQuantUnitChannels);
    quantize_row_multi<16, 1>(x_row + size_t(h0) * shape.esize, a.dtype, h1 - h0, a.round_scale,
                              payload ? payload + h0 : nullptr,
                              payload ? reinterpret_cast<float*>(payload + H) + h0 / kFp8Group : nullptr, ndst);
    bytes.begin = h0, bytes.end = h1;
    bytes.sbegin = H + size_t(h0 / kFp8Group) * 4, bytes.send = H + size_t(h1 / kFp8Group) * 4;
  } else {
    const ByteRange b = unit_range(raw_bytes, units, kCopyUnitBytes, u0, u1);
    copy_row_any(x_row + b.begin, false, b.end - b.begin, payload ? payload + b.begin : nullptr, ndst);
    bytes.begin = b.begin, bytes.end = b.end;
  }
  return bytes;
}

// Puts the piece of every staged message of token t (lanes with `far`) to the same
// slot at its destination on another node: the header with the first piece, then
// the row's bytes and (FP8) its scales' bytes. Warp-uniform.
template <class Net>
__device__ __forceinline__ void put_far_piece(const CommContext& c, const RankCtx& r, int e_loc, int t, int e, int j,
                                              bool far, int u0, const PieceBytes& bytes) {
  unsigned far_lanes = __ballot_sync(kFullMask, far);
  if (!far_lanes) return;
  __syncwarp();  // the staged piece is complete
  const size_t head = u0 == 0 ? 0 : kLowLatencyHeaderBytes + bytes.begin;
  for (; far_lanes; far_lanes &= far_lanes - 1) {
    const int k = __ffs(far_lanes) - 1;
    const int ek = __shfl_sync(kFullMask, e, k), jk = __shfl_sync(kFullMask, j, k), dest = ek / e_loc;
    const uint8_t* staged = ll_stage_message(c.layout, r.self, t, k);
    uint8_t* remote = ll_dispatch_message(c.layout, r.self, r.parity, ek - dest * e_loc, r.rank, jk);
    Net::put_warp(remote + head, staged + head, kLowLatencyHeaderBytes + bytes.end - head, dest);
    if (bytes.send > bytes.sbegin)
      Net::put_warp(remote + kLowLatencyHeaderBytes + bytes.sbegin, staged + kLowLatencyHeaderBytes + bytes.sbegin,
                    bytes.send - bytes.sbegin, dest);
  }
}

// The last block: each live destination's count of every one of its local experts,
// (seq << 32) | total (docs/protocol.md, "LL dispatch"); none to rank `skip` (this rank
// when its receive phase reads the counts here: run_both_phases).
template <class Net>
__device__ __forceinline__ void publish_counts(const CommContext& c, const RankCtx& r, uint8_t* const* peers,
                                               const int* active, const int* total, int E, int e_loc, int skip) {
  for (int e = threadIdx.x; e < E; e += kLlSendThreads) {
    const int dest = e / e_loc;
    if (active[dest] && dest != skip)
      publish_signal<Net>(
          c, r, peers, dest,
          [&](uint8_t* base) { return ll_dispatch_signal(c.layout, base, r.parity, e - dest * e_loc, r.rank); },
          ll_signal(r.seq, uint32_t(total[e])));
  }
}

// The send phase, run by block `block` of rank `local` (c.send_blocks per rank): the
// ll_dispatch_send kernel, or the first half of the one-launch ll_dispatch. `peers`
// and `active` are the kernel's shared tables (filled here; the receive phase reads
// `active` too); `*rank` gets the op's context; `*self_here`: see run_both_phases.
// False when the group is closed: nothing was touched and the kernel returns.
template <class Net>
__device__ __forceinline__ bool dispatch_send_phase(const LlDispatchSendArgs& a, int local, int block, uint8_t** peers,
                                                    int* active, RankCtx* rank, bool* self_here) {
  extern __shared__ int expert_counts[];       // [2][E]: send_counts_before, send_counts_total
  __shared__ int chunk_expert[kChunkEntries];  // [token][k] expert id, -1 when invalid
  __shared__ int chunk_slot[kChunkEntries];    // [token][k] slot j, -1 when nothing is sent
  __shared__ int dropped;
  const CommContext& c = a.c;
  const LlDispatchShape shape = dispatch_send_shape(a);
  const int T = shape.T, K = shape.K, E = shape.E, e_loc = shape.e_loc;
  const int lane = lane_id(), warp = warp_id();
  int* before = send_counts_before(expert_counts);
  int* total = send_counts_total(expert_counts, E);
  const int* topk = a.topk_idx + size_t(local) * T * K;

  // shared state and XLA operands (the routing's first rows too) first: the closed
  // check's barrier publishes them, and the operand reads share its round trip
  for (int e = threadIdx.x; e < 2 * E; e += kLlSendThreads) expert_counts[e] = 0;
  load_peer_table(c, a.active_ranks, local, peers, active);
  const int first_entry = routing_entry(topk, T, K, first_routed_row(K));
  if (threadIdx.x == 0) dropped = 0;
  if (returns_closed(c)) return false;  // docs/protocol.md, "Ordering and lifetime"
  bool sends;
  bool ok =
      begin_send<Net>(c, local, kLlDispatchSendSeq, kLlDispatchRecvDone, kPhaseLlDispatchReuse, active, rank, &sends);
  const RankCtx r = *rank;

  // --- counts (and the first chunk's experts)
  const int per_block = (T + c.send_blocks - 1) / c.send_blocks;
  const int t_begin = min(T, block * per_block), t_end = min(T, t_begin + per_block);
  const int chunk_tokens = kChunkEntries / K;
  count_routing(c, r, shape, topk, active, block, t_begin, min(t_end, t_begin + chunk_tokens), first_entry, before,
                total, chunk_expert, &dropped);
  ok = __syncthreads_and(ok);  // also publishes the counts and the first chunk
  if (block == 0 && threadIdx.x == 0) {
    a.num_dropped[local] = dropped;
    write_seq(a.ticket, r.local, r.seq);
  }

  // --- messages, one chunk of this block's tokens at a time: slots (one warp), then
  // the (token, unit) pieces spread over every warp
  if (sends && ok) {
    const uint8_t* x = static_cast<const uint8_t*>(a.x) + size_t(local) * T * shape.H * shape.esize;
    const size_t raw_bytes = size_t(shape.H) * shape.esize;
    const int units =
        a.fp8 ? (shape.H + kQuantUnitChannels - 1) / kQuantUnitChannels : row_units(raw_bytes, kCopyUnitBytes);
    for (int chunk0 = t_begin; chunk0 < t_end; chunk0 += chunk_tokens) {
      const int n = min(chunk_tokens, t_end - chunk0);
      if (chunk0 != t_begin) {
        stage_chunk_experts(shape, topk, chunk0, n, chunk_expert);
        __syncthreads();
      }
      if (warp == 0) assign_slots(chunk_expert, chunk_slot, before, active, n, K, e_loc);
      __syncthreads();
      for_each_piece(n, units, warp, kLlSendWarps, [&](int i, int u0, int u1) {
        const int t = chunk0 + i;
        const int e = lane < K ? chunk_expert[i * K + lane] : -1;
        const int j = lane < K ? chunk_slot[i * K + lane] : -1;
        bool far = false;
        uint8_t* msg = j >= 0 ? message_slot<Net>(c, r, peers, e_loc, t, lane, e, j, u0 == 0, &far) : nullptr;
        const unsigned writers = __ballot_sync(kFullMask, msg != nullptr);
        if (writers == 0) return;
        const PieceBytes bytes =
            write_piece(a, shape, x + size_t(t) * raw_bytes, msg, writers, raw_bytes, units, u0, u1);
        if constexpr (Net::kNet) put_far_piece<Net>(c, r, e_loc, t, e, j, far, u0, bytes);
      });
      __syncthreads();  // the chunk buffers are reused
    }
  }

  // --- counts to every live destination, after every block's messages (and puts)
  Net::quiet();
  const bool publish = finish_send(c, r, kLlDispatchSendSeq, c.send_blocks, sends, ok);
  if (publish) publish_counts<Net>(c, r, peers, active, total, E, e_loc, *self_here ? r.rank : -1);
  *self_here = *self_here && publish;
  return true;
}

template <class Net>
__global__ void __launch_bounds__(kLlSendThreads, 1) ll_dispatch_send(LlDispatchSendArgs a) {
  run_send_kernel(a, [](auto&&... p) { return dispatch_send_phase<Net>(p...); });
}

// Blocks per rank of a dispatch send: the launcher below says why.
inline int ll_dispatch_send_blocks(const LlDispatchSendArgs& a) {
  return blocks_for(a.num_tokens, 1, ll_block_limit(a.c));
}

inline size_t ll_dispatch_send_smem(const LlDispatchSendArgs& a) {
  return size_t(2) * a.num_experts * sizeof(int);
}

// As many blocks as the receive may use (ll_block_limit: Config.num_copy_sms, every SM
// by default; a decode step has no compute to leave SMs to, and a block's share of
// rows is moved with little memory parallelism per warp, so time falls with blocks);
// blocks split the tokens: no more blocks than tokens.
template <class Net>
cudaError_t launch_ll_dispatch_send_with(const LlDispatchSendArgs& args, cudaStream_t stream) {
  LlDispatchSendArgs a = args;
  a.c.send_blocks = ll_dispatch_send_blocks(a);
  ll_dispatch_send<Net><<<a.c.num_local_ranks * a.c.send_blocks, kLlSendThreads, ll_dispatch_send_smem(a), stream>>>(a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace jax_ep
