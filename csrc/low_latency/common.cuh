// Pieces shared by the low-latency dispatch and combine kernels: slot addressing in
// the ll_* regions, the split of rows over warps, sequence numbers and tickets, the
// buffer-reuse guard and the last-block pattern. Protocol: docs/protocol.md,
// "Low-latency dispatch/combine".
#pragma once

#include <algorithm>
#include <utility>

#include "common/one_wave.h"
#include "common/rank.cuh"
#include "common/rows.cuh"
#include "low_latency/params.h"
#include "low_latency/transport.cuh"

namespace jax_ep {

// Every low-latency kernel runs at most Config.num_copy_sms blocks per launch
// (ll_block_limit), fewer when its rows need fewer. 512 threads: the row movers need ~128 registers per thread
// without spills, so 1024-thread blocks (64 registers) would spill in the hot loops.
constexpr int kLlSendThreads = 512;
constexpr int kLlSendWarps = kLlSendThreads / 32;
constexpr int kLlRecvThreads = 512;
constexpr int kLlRecvWarps = kLlRecvThreads / 32;

// ---------------------------------------------------------------------------
// slot addressing (common/buffer_layout.h)
// ---------------------------------------------------------------------------

// Message j of source `src` for local expert `expert`: 16-byte header, then the row.
__device__ inline uint8_t* ll_dispatch_message(const BufferLayout& layout, uint8_t* base, int parity, int expert,
                                               int src, int j) {
  const size_t slot = ((size_t(parity) * layout.sizes.num_local_experts + expert) * layout.sizes.num_ranks + src) *
                          layout.sizes.ll_max_tokens +
                      j;
  return base + layout.ll_dispatch_data + slot * layout.ll_message_bytes();
}

__device__ inline uint64_t* ll_dispatch_signal(const BufferLayout& layout, uint8_t* base, int parity, int expert,
                                               int src) {
  const size_t word = (size_t(parity) * layout.sizes.num_local_experts + expert) * layout.sizes.num_ranks + src;
  return reinterpret_cast<uint64_t*>(base + layout.ll_dispatch_signal) + word;
}

// Expert output of home token t for its top-k slot k (the first k choosing that expert).
__device__ inline uint8_t* ll_combine_row(const BufferLayout& layout, uint8_t* base, int parity, int t, int k) {
  const size_t slot = (size_t(parity) * layout.sizes.ll_max_tokens + t) * layout.sizes.num_topk + k;
  return base + layout.ll_combine_data + slot * layout.combine_row_bytes;
}

__device__ inline uint64_t* ll_combine_signal(const BufferLayout& layout, uint8_t* base, int parity, int src) {
  return reinterpret_cast<uint64_t*>(base + layout.ll_combine_signal) + size_t(parity) * layout.sizes.num_ranks + src;
}

// Signal words carry the op's sequence number in the high half, so a word left from an
// earlier op of the same half never passes for the current one and nothing is reset.
__device__ __forceinline__ uint64_t ll_signal(uint64_t seq, uint32_t value) {
  return (seq << 32) | value;
}

// ---------------------------------------------------------------------------
// work split: a decode batch has far fewer rows than the launch has warps, so rows
// are cut into units (one iteration of the row mover each) and every warp takes an
// equal contiguous share of all (row, unit) pairs.
// ---------------------------------------------------------------------------

constexpr int kCopyUnitBytes = 32 * 4 * 16;        // copy_row_multi<int4>: 32 lanes x 4 x 16 bytes
constexpr int kQuantUnitChannels = 2 * kFp8Group;  // quantize_row_multi<16, 1>: a 128-channel group per half warp
// (kSumUnitBytes, row_units and unit_range: common/rows.cuh, shared with the
// high-throughput combine)

// Blocks per rank for `pieces` (row, unit) pairs spread over warps of `warps_per_block`,
// at most `limit`: a launch sized to the most rows it can move (the call's tokens where
// the launch knows them, else what its buffers hold: ll_max_recv_rows), so a small
// decode batch does not pay for starting and retiring a block on every SM.
inline int blocks_for(long long pieces, int warps_per_block, int limit) {
  const long long need = (pieces + warps_per_block - 1) / warps_per_block;
  return int(need < 1 ? 1 : need < limit ? need : limit);
}

// Most blocks per rank of a low-latency launch: Config.num_copy_sms (default every SM),
// shared by the ranks of the launch (loopback runs every virtual rank in one launch).
// One block fits an SM (__launch_bounds__(..., 1)), so this keeps a launch to one wave:
// a second wave would pay every block's fixed start (counts, waits, scans) again.
inline int ll_block_limit(const CommContext& c) {
  const int share = c.copy_blocks / c.num_local_ranks;
  return share > 1 ? share : 1;
}

// Rank `local`'s live-rank flags ([R] of active_ranks) copied to shared memory by
// threads < R. An XLA operand, not group memory: kernels read it before their closed
// check (returns_closed), whose barrier publishes it, so both reads share a round trip.
__device__ __forceinline__ void load_live_ranks(const CommContext& c, const int* active_ranks, int local, int* live) {
  if (threadIdx.x < c.num_ranks) live[threadIdx.x] = active_ranks[size_t(local) * c.num_ranks + threadIdx.x] != 0;
}

// The same, with the launch's peer bases: the send kernels read both per message.
__device__ __forceinline__ void load_peer_table(const CommContext& c, const int* active_ranks, int local,
                                                uint8_t** peers, int* active) {
  load_live_ranks(c, active_ranks, local, active);
  if (threadIdx.x < c.num_ranks) peers[threadIdx.x] = c.peers[threadIdx.x];
}

// Most rows one rank can receive in a low-latency dispatch: each source token sends
// once per distinct expert, and at most num_topk (or all local experts) live here.
// `tokens`: the sources' tokens per rank when the launch knows them (a one-call op:
// every rank runs the same shapes), else the buffer's T_max. Only launch sizes follow
// it: the kernels stride over whatever blocks they get.
JAX_EP_HD inline long long ll_max_recv_rows(const BufferLayout& layout, long long tokens = -1) {
  const int k =
      layout.sizes.num_topk < layout.sizes.num_local_experts ? layout.sizes.num_topk : layout.sizes.num_local_experts;
  const long long t_max = layout.sizes.ll_max_tokens;
  return (long long)layout.sizes.num_ranks * (tokens >= 0 && tokens < t_max ? tokens : t_max) * k;
}

// Calls f(item, u0, u1) for each item's units [u0, u1) in worker's share of
// num_items * units units (warp-uniform).
template <typename F>
__device__ inline void for_each_piece(int num_items, int units, int worker, int num_workers, F&& f) {
  const long long total = (long long)num_items * units;
  long long u = total * worker / num_workers;
  const long long end = total * (worker + 1) / num_workers;
  while (u < end) {
    const int item = int(u / units), u0 = int(u % units);
    const int u1 = int(min((long long)units, u0 + (end - u)));
    f(item, u0, u1);
    u += u1 - u0;
  }
}

// Lane j (< popc(mask)) gets `mine` of the j-th lane set in `mask` (mask warp-uniform).
__device__ inline uint8_t* compact_lanes(uint8_t* mine, unsigned mask) {
  uint8_t* out = nullptr;
  for (int j = 0; mask; ++j) {
    const int src = __ffs(mask) - 1;
    mask &= mask - 1;
    auto ptr = reinterpret_cast<uint8_t*>(__shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(mine), src));
    if (lane_id() == j) out = ptr;
  }
  return out;
}

// ---------------------------------------------------------------------------
// block-wide helpers
// ---------------------------------------------------------------------------

// out[i] = Σ_{i' < i} in[i'] for i <= n (out[n] = total); shared memory, all threads.
__device__ inline void block_exclusive_scan(const int* in, int* out, int n) {
  __shared__ int warp_totals[32];
  const int per = (n + blockDim.x - 1) / blockDim.x;
  const int i0 = min(n, int(threadIdx.x) * per), i1 = min(n, i0 + per);
  int mine = 0;
  for (int i = i0; i < i1; ++i) mine += in[i];
  int warp_total;
  const int before = warp_exclusive_scan(mine, &warp_total);
  if (lane_id() == 0) warp_totals[warp_id()] = warp_total;
  __syncthreads();
  if (warp_id() == 0) {
    const int nwarps = blockDim.x / 32;
    int all;
    const int ex = warp_exclusive_scan(lane_id() < nwarps ? warp_totals[lane_id()] : 0, &all);
    if (lane_id() < nwarps) warp_totals[lane_id()] = ex;
    if (lane_id() == 0) out[n] = all;
  }
  __syncthreads();
  int run = warp_totals[warp_id()] + before;
  for (int i = i0; i < i1; ++i) {
    const int v = in[i];
    out[i] = run;
    run += v;
  }
  __syncthreads();
}

// The segment s with offsets[s] <= row < offsets[s + 1] (offsets[0] = 0 <= row < offsets[n]).
__device__ inline int segment_of(const int* offsets, int n, int row) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (offsets[mid] <= row)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// ---------------------------------------------------------------------------
// sequence numbers (protocol.md, "Low-latency dispatch/combine")
// ---------------------------------------------------------------------------

// A receive serves the op of its ticket (the sequence number its send wrote, [lo, hi]),
// not the next one in a counter: XLA may run the receives of two outstanding sends
// in either order.
__device__ inline RankCtx ll_recv_ctx(const CommContext& c, int local, const int* ticket) {
  RankCtx r;
  r.local = local;
  r.rank = c.first_rank + local;
  r.self = c.peers[r.rank];
  r.seq = uint64_t(uint32_t(ticket[2 * local])) | (uint64_t(uint32_t(ticket[2 * local + 1])) << 32);
  r.parity = int(r.seq & 1);
  return r;
}

// Buffer reuse: op `seq` overwrites the half that op seq-2 used in every destination,
// so each live rank (ourselves included: XLA orders our own receive only by data)
// must have finished its receive of op seq-2: its record of that half (private
// counters recv_done + half, finish_recv) is >= seq - 2. Thread i < R checks rank i (a
// remote read for a rank on another node); returns this thread's verdict (combine
// with __syncthreads_and, so the read overlaps the caller's own work).
template <class Net>
__device__ inline bool peer_received(const CommContext& c, const RankCtx& r, const int* active, int recv_done,
                                     int phase) {
  const int peer = threadIdx.x;
  if (peer >= c.num_ranks || !active[peer]) return true;
  if (is_far<Net>(c, r, peer)) {
    if (r.seq <= 2) return true;
    const uint64_t* word = counters_of(c, r.self) + recv_done + r.parity;  // symmetric: p's copy
    uint64_t seen;
    return wait_word([&] { return Net::get_u64(word, peer); }, r.seq - 2, false, peer, wait_ctx(c, r, phase), &seen);
  }
  // both halves' records in one load, before r.seq is looked at: it leaves with
  // rank_ctx's read of the op counter, and both come back in one round trip
  const uint64_t* words = counters_of(c, c.peers[peer]) + recv_done;
  uint64_t half0, half1;
  ld_acquire_pair(words, c.sys_scope != 0, half0, half1);
  if (r.seq <= 2) return true;
  const uint64_t target = r.seq - 2, seen = r.parity ? half1 : half0;
  return seen >= target || wait_geq(words + r.parity, target, peer, wait_ctx(c, r, phase));
}

// The start of a send phase, right after its closed check: the op's context (*rank),
// whether this rank sends (*sends: a failed rank sends nothing; fault injection, for
// testing, makes a peer that never arrives) and this thread's verdict on going on, to be
// combined with __syncthreads_and after the caller's own work. The verdict holds the
// peers' receive records of the half (peer_received) and the abort flag as the op
// begins (read by one thread: a group that gave up sends nothing more). The op counter,
// the flag and the records are read before any of them is looked at: one round trip.
template <class Net>
__device__ __forceinline__ bool begin_send(const CommContext& c, int local, int send_counter, int recv_done,
                                           int reuse_phase, const int* active, RankCtx* rank, bool* sends) {
  const RankCtx r = rank_ctx(c, local, send_counter);
  *rank = r;
  const bool gave_up = threadIdx.x == 0 && aborted(c, r);
  *sends = active[r.rank] && r.rank != c.fault_inject_rank;
  const bool received = !*sends || peer_received<Net>(c, r, active, recv_done, reuse_phase);
  return received && !gave_up;
}

// End of a send kernel's data phase. The last block to get here publishes the op's
// signals, and they must cover every block's peer stores: each block's stores are
// ordered before its arrival by the barrier and fence in last_block (the pattern of
// cooperative groups' grid sync), the last block observes every arrival, and its
// signal stores are releases at the group's scope, which is cumulative over all of
// that. One release per signal instead of a system fence per thread or block: a
// system-scope fence costs microseconds. That block also bumps the op counter (every
// block has read the sequence number by then). Returns whether this block publishes:
// the last one, of a rank that sends, when no wait of the op failed. `ok` holds this
// block's waits and the abort flag as the op began: the whole answer for a rank of one
// block (only its own waits raise its flag meanwhile), so the flag is read again, a
// round trip, only for the other blocks' waits. The same in every thread of the block
// (`sends` and `ok` are; the flag is read by one thread and handed to all).
__device__ inline bool finish_send(const CommContext& c, const RankCtx& r, int counter, int blocks_per_rank, bool sends,
                                   bool ok) {
  const bool last = last_block(c, r, blocks_per_rank);
  if (last && threadIdx.x == 0) counters_of(c, r.self)[counter] = r.seq;
  if (!last || !sends || !ok) return false;
  return blocks_per_rank == 1 || !__syncthreads_or(threadIdx.x == 0 && aborted(c, r));
}

// End of a receive phase: the last block raises the record of the half it read
// (private counters recv_done + half) to the op's sequence number with a release,
// after every block's reads of the half (peers wait for it before reusing it), and
// writes the op's ordering token `order` ([L, 2] int32). A maximum, not a store of
// the next value: it needs no read of the record first, and receives may finish out of
// order (XLA runs the receives of two outstanding sends in either order), which the
// two halves' records absorb. `done`: see last_block.
__device__ inline void finish_recv(const CommContext& c, const RankCtx& r, int recv_done, int blocks_per_rank,
                                   int* order, int done) {
  if (last_block(c, r, blocks_per_rank, done) && threadIdx.x == 0) {
    max_release(counters_of(c, r.self) + recv_done + r.parity, r.seq, c.sys_scope != 0);
    write_seq(order, r.local, r.seq);
  }
}

// ---------------------------------------------------------------------------
// one-launch ops: the send and receive phases of a low-latency op in one kernel
// ---------------------------------------------------------------------------

// Whether an op may run as one launch: its receive phase waits inside the kernel for
// the send phases of every rank, so every rank's kernel must be resident as a whole
// (no other process's ranks on this GPU, CommContext::ll_one_launch, a device that
// takes cooperative launches, and a block per rank must fit one wave); ranks on other nodes are reached by the NVSHMEM
// module's send kernels, which this module does not build into one launch.
inline bool one_launch(const CommContext& c) {
  return c.ll_one_launch != 0 && c.cooperative != 0 && c.layout.sizes.num_nodes == 1 && c.num_local_ranks <= c.num_sms;
}

// Blocks per rank of a one-launch op: `want`, at most what lets every block of the
// launch be resident at once (one block per SM: __launch_bounds__(..., 1) and 512
// threads of up to 128 registers). With peers on other GPUs, at most half the SMs: the
// grid starts only when all its blocks fit, and a kernel on another stream that waits
// for a peer GPU (a collective XLA overlaps with the op) must find SMs to finish on
// while this GPU's own one-launch kernel waits for that peer; with every rank on this
// GPU nothing in the launch waits for anything outside it.
inline int one_wave_blocks(const CommContext& c, int want) {
  const int sms = c.num_local_ranks == c.num_ranks ? c.num_sms : c.num_sms / 2;
  return std::max(1, std::min(want, sms / c.num_local_ranks));
}

// The body of a send kernel: `phase` (dispatch_send_phase or combine_send_phase) on
// this block, with the kernel's shared peer and live-rank tables; it signals every
// live rank, its own included (self_here false: see run_both_phases).
template <typename Args, typename Phase>
__device__ __forceinline__ void run_send_kernel(const Args& a, Phase phase) {
  __shared__ uint8_t* peers[kMaxRanks];
  __shared__ int active[kMaxRanks];
  RankCtx r;
  bool self_here = false;
  phase(a, int(blockIdx.x) / a.c.send_blocks, int(blockIdx.x) % a.c.send_blocks, peers, active, &r, &self_here);
}

// The body of a receive kernel: the op's context from its ticket and the live ranks
// (XLA operands, not group memory: read in the closed flag's round trip), then
// `phase` (dispatch_recv_phase or combine_recv_phase) unless the group is closed.
template <typename Args, typename Phase>
__device__ __forceinline__ void run_recv_kernel(const Args& a, Phase phase) {
  const int local = int(blockIdx.x) / a.c.copy_blocks;
  const RankCtx r = ll_recv_ctx(a.c, local, a.ticket);
  __shared__ int live[kMaxRanks];
  load_live_ranks(a.c, a.active_ranks, local, live);
  if (returns_closed(a.c)) return;  // docs/protocol.md, "Ordering and lifetime"
  phase(a, local, int(blockIdx.x) % a.c.copy_blocks, r, live, kDoneBlocks, false);
}

// The body of a one-launch kernel: the send phase, then the receive phase of the op it
// numbered (no ticket needed), on every block (c.send_blocks == c.copy_blocks).
// A rank served by one block does not signal itself: that block wrote the rows it is
// about to receive from itself, and its barrier orders them before its reads, so the
// send phase's release of its own signal and the receive phase's acquire of it would
// be two round trips for nothing. A rank gets one block when the call's rows need no
// more (the launch is sized to the rows num_tokens per source can make:
// ll_max_recv_rows; a token or two of a narrow model), or with Config.num_copy_sms =
// the launch's ranks. `self_here` goes in as "skip the own signal" and comes out as "the
// rows to myself are written" (the send phase would have signalled); when they are not
// (a failed wait, an aborted group, a fault-injected rank that never sends) the receive
// waits for the signal that never comes and fails as the split form does. A rank
// marked failed in active_ranks sends nothing and waits for nobody, as before.
static_assert(kLlSendThreads == kLlRecvThreads, "a one-launch kernel runs the receive phase with the send's threads");
template <typename SendArgs, typename RecvArgs, typename SendPhase, typename RecvPhase>
__device__ __forceinline__ void run_both_phases(const SendArgs& send, const RecvArgs& recv, SendPhase send_phase,
                                                RecvPhase recv_phase) {
  __shared__ uint8_t* peers[kMaxRanks];
  __shared__ int active[kMaxRanks];
  const int local = int(blockIdx.x) / send.c.send_blocks, block = int(blockIdx.x) % send.c.send_blocks;
  RankCtx r;
  bool self_here = send.c.send_blocks == 1;
  if (!send_phase(send, local, block, peers, active, &r, &self_here)) return;
  __syncthreads();  // the phases may share the dynamic shared memory
  recv_phase(recv, local, block, r, active, kDoneRecvBlocks, self_here);
}

// A one-call op: both phases in one launch of `kernel` (launch_one_wave: cooperative
// unless it is one block; blocks per rank: the larger of the phases' counts, within one
// wave) where the group allows it, else the split form's two launches.
template <typename Send, typename Recv, typename... Params>
cudaError_t launch_one_call(void (*kernel)(Params...), Send send, Recv recv, int send_blocks, int recv_blocks,
                            size_t smem, cudaStream_t stream, cudaError_t (*launch_send)(const Send&, cudaStream_t),
                            cudaError_t (*launch_recv)(const Recv&, cudaStream_t)) {
  if (!one_launch(send.c)) {
    const cudaError_t err = launch_send(send, stream);
    return err != cudaSuccess ? err : launch_recv(recv, stream);
  }
  const int blocks = one_wave_blocks(send.c, std::max(send_blocks, recv_blocks));
  send.c.send_blocks = recv.c.copy_blocks = blocks;
  return launch_one_wave(kernel, send.c.num_local_ranks * blocks, kLlSendThreads, smem, stream, send, recv);
}

cudaError_t prepare_ll_dispatch_kernels();

}  // namespace jax_ep
