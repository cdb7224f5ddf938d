// Low-latency combine over NVLink peer memory (docs/protocol.md, "Low-latency
// dispatch/combine"). Two launches, each serving all ranks of this launch:
//   send  expert side: every received row goes back unreduced to its home rank's
//         [token][first k] slot (the handle says which); then the rank's last block
//         sets a flag in every live home rank with a release store.
//   recv  home side: wait for every live rank's flag, then
//         out[t] = Σ_k w[t,k] * row(t, first k of e_k) in float32, k ascending,
//         skipping masked selections and failed ranks: the reference's order exactly.
#include "low_latency/common.cuh"

namespace jax_ep {
namespace {

__global__ void __launch_bounds__(kLlSendThreads, 1) ll_combine_send(LlCombineSendArgs a) {
  extern __shared__ int smem[];
  __shared__ uint8_t* peers[kMaxRanks];
  __shared__ int active[kMaxRanks];
  const CommContext& c = a.c;
  const BufferLayout& L = c.layout;
  const int R = c.num_ranks, e_loc = a.num_experts / R, T_max = L.sizes.max_tokens;
  const size_t RT = size_t(R) * T_max;
  int* counts = smem;           // [E_loc] rows per local expert
  int* offsets = smem + e_loc;  // [E_loc + 1] flat exclusive prefix
  const int local = blockIdx.x / c.send_blocks, block = blockIdx.x % c.send_blocks;
  const RankCtx r = rank_ctx(c, local, kLlCombineSendSeq);

  for (int e = threadIdx.x; e < e_loc; e += kLlSendThreads)
    counts[e] = min(max(a.recv_count[size_t(local) * e_loc + e], 0), int(RT));
  if (threadIdx.x < R) {
    peers[threadIdx.x] = c.peers[threadIdx.x];
    active[threadIdx.x] = a.active_ranks[size_t(local) * R + threadIdx.x] != 0;
  }
  __syncthreads();
  const bool sends = active[r.rank] && r.rank != c.fault_inject_rank;
  bool ok = !sends || peer_received(c, r, active, kLlCombineRecvSeq, kPhaseLlCombineReuse);
  block_exclusive_scan(counts, offsets, e_loc);
  ok = __syncthreads_and(ok);
  if (block == 0 && threadIdx.x == 0) write_ticket(a.ticket, r);

  if (sends && ok) {
    const size_t row_bytes = size_t(a.hidden) * (a.dtype == kF32 ? 4 : 2);
    const uint8_t* y = static_cast<const uint8_t*>(a.y) + size_t(local) * e_loc * RT * row_bytes;
    const int* src_info = a.src_info + size_t(local) * e_loc * RT;
    const int* topk_slot = a.topk_slot + size_t(local) * e_loc * RT;
    const int units = row_units(row_bytes, kCopyUnitBytes);
    const int worker = block * kLlSendWarps + warp_id();
    for_each_piece(offsets[e_loc], units, worker, c.send_blocks * kLlSendWarps, [&](int g, int u0, int u1) {
      const int e = segment_of(offsets, e_loc, g);
      const size_t row = size_t(e) * RT + (g - offsets[e]);
      const int src = __ldg(src_info + row), k = __ldg(topk_slot + row);
      const int s = src / T_max, t = src - s * T_max;
      // a handle that did not come from this group's dispatch: skip rather than scribble
      if (src < 0 || s >= R || !active[s] || k < 0 || k >= L.sizes.num_topk) return;
      const ByteRange b = unit_range(row_bytes, units, kCopyUnitBytes, u0, u1);
      copy_row_any(y + row * row_bytes + b.begin, false, b.end - b.begin,
                   ll_combine_row(L, peers[s], r.parity, t, k) + b.begin, 1);
    });
  }

  // --- one flag per live home rank, after every block's rows
  if (finish_send(c, r, kLlCombineSendSeq, c.send_blocks) && sends && !aborted(c, r)) {
    const int p = threadIdx.x;
    if (p < R && active[p])
      st_release(ll_combine_signal(L, peers[p], r.parity, r.rank), ll_signal(r.seq, 1), c.sys_scope != 0);
  }
}

__global__ void __launch_bounds__(kLlRecvThreads) ll_combine_recv(LlCombineRecvArgs a) {
  const CommContext& c = a.c;
  const BufferLayout& L = c.layout;
  const int R = c.num_ranks, T = a.num_tokens, K = a.num_topk, H = a.hidden, E = a.num_experts, e_loc = E / R;
  const int local = blockIdx.x / c.copy_blocks, block = blockIdx.x % c.copy_blocks;
  const RankCtx r = ll_recv_ctx(c, local, a.ticket);
  const int* active = a.active_ranks + size_t(local) * R;
  // nobody sends to a failed rank: it waits for no one and its tokens sum to zero
  const bool me_active = active[r.rank] != 0;

  bool ok = true;
  const int p = threadIdx.x;
  if (me_active && p < R && active[p]) {
    uint64_t v = 0;
    ok = wait_tag(ll_combine_signal(L, r.self, r.parity, p), uint32_t(r.seq), p, wait_ctx(c, r, kPhaseLlCombineSignal),
                  &v);
  }
  if (__syncthreads_and(ok)) {
    const int esize = a.dtype == kF32 ? 4 : 2;
    const size_t row_bytes = size_t(H) * esize;
    const int* topk = a.topk_idx + size_t(local) * T * K;
    const float* weights = a.topk_weights + size_t(local) * T * K;
    uint8_t* out = static_cast<uint8_t*>(a.out) + size_t(local) * T * row_bytes;
    const int units = row_units(row_bytes, kSumUnitBytes);
    const int lane = lane_id(), worker = block * kLlRecvWarps + warp_id();
    for_each_piece(T, units, worker, c.copy_blocks * kLlRecvWarps, [&](int t, int u0, int u1) {
      // lane k holds the row of selection k: the expert side stored it once, under the
      // first k choosing that expert
      const int e = lane < K ? __ldg(topk + size_t(t) * K + lane) : -1;
      const bool valid = me_active && e >= 0 && e < E && active[e / e_loc];
      const unsigned same = __match_any_sync(kFullMask, valid ? e : -1 - lane);
      const ByteRange b = unit_range(row_bytes, units, kSumUnitBytes, u0, u1);
      const uint8_t* my_row = valid ? ll_combine_row(L, r.self, r.parity, t, __ffs(same) - 1) + b.begin : nullptr;
      const float w = lane < K ? __ldg(weights + size_t(t) * K + lane) : 0.f;
      weighted_sum_rows(my_row, w, K, true, a.dtype, int((b.end - b.begin) / esize), out + t * row_bytes + b.begin);
    });
  }
  finish_recv(c, r, kLlCombineRecvSeq, c.copy_blocks);
}

}  // namespace

cudaError_t prepare_ll_kernels() {
  cudaFuncAttributes attr;
  cudaError_t err = prepare_ll_dispatch_kernels();
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, ll_combine_send);
  return err != cudaSuccess ? err : cudaFuncGetAttributes(&attr, ll_combine_recv);
}

cudaError_t launch_ll_combine_send(const LlCombineSendArgs& args, cudaStream_t stream) {
  LlCombineSendArgs a = args;
  const size_t row_bytes = size_t(a.hidden) * (a.dtype == kF32 ? 4 : 2);
  // every SM, as the dispatch send (launch_ll_dispatch_send says why)
  a.c.send_blocks = blocks_for(ll_max_recv_rows(a.c.layout) * row_units(row_bytes, kCopyUnitBytes), kLlSendWarps,
                               a.c.copy_blocks);
  const size_t smem = (size_t(2) * (a.num_experts / a.c.num_ranks) + 1) * sizeof(int);
  ll_combine_send<<<a.c.num_local_ranks * a.c.send_blocks, kLlSendThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_ll_combine_recv(const LlCombineRecvArgs& args, cudaStream_t stream) {
  LlCombineRecvArgs a = args;
  const size_t row_bytes = size_t(a.hidden) * (a.dtype == kF32 ? 4 : 2);
  a.c.copy_blocks = blocks_for((long long)a.num_tokens * row_units(row_bytes, kSumUnitBytes), kLlRecvWarps,
                               a.c.copy_blocks);
  ll_combine_recv<<<a.c.num_local_ranks * a.c.copy_blocks, kLlRecvThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep
