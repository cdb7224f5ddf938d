// Low-latency combine (docs/protocol.md, "Low-latency dispatch/combine"). The split
// form is two launches, each serving all ranks of this launch:
//   send  expert side: low_latency/combine_send.cuh (built here for peers on this
//         node; the NVSHMEM module builds it for groups spanning nodes);
//   recv  home side: wait for every live rank's flag, then
//         out[t] = Σ_k w[t,k] * row(t, first k of e_k) in float32, k ascending,
//         skipping masked selections and failed ranks: the reference's order exactly.
// The one-call form (low_latency_combine) runs both phases in one launch, ll_combine,
// where the group allows it (as the dispatch: low_latency/dispatch.cu).
#include "common/load_kernels.h"
#include "low_latency/combine_send.cuh"
#include "nvshmem/launchers.h"

namespace jax_ep {
namespace {

// The receive phase, run by block `block` of rank `local` (c.copy_blocks per rank):
// the ll_combine_recv kernel, or the second half of ll_combine (arguments as in
// dispatch_recv_phase; `self_here`: this rank's rows to itself are written, no flag).
__device__ __forceinline__ void combine_recv_phase(const LlCombineRecvArgs& a, int local, int block, const RankCtx& r,
                                                   const int* live, int done, bool self_here) {
  const CommContext& c = a.c;
  const BufferLayout& layout = c.layout;
  const int R = c.num_ranks, T = a.num_tokens, K = a.num_topk, H = a.hidden, E = a.num_experts, e_loc = E / R;
  // nobody sends to a failed rank: it waits for no one and its tokens sum to zero
  const bool me_active = live[r.rank] != 0;

  bool ok = true;
  const int peer = threadIdx.x;
  if (me_active && peer < R && live[peer] && !(self_here && peer == r.rank)) {
    uint64_t v = 0;
    ok = wait_tag(ll_combine_signal(layout, r.self, r.parity, peer), uint32_t(r.seq), peer,
                  wait_ctx(c, r, kPhaseLlCombineSignal), &v);
  }
  if (__syncthreads_and(ok)) {
    const int esize = dtype_bytes(a.dtype);
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
      const bool valid = me_active && e >= 0 && e < E && live[e / e_loc];
      const unsigned same = __match_any_sync(kFullMask, valid ? e : -1 - lane);
      const ByteRange b = unit_range(row_bytes, units, kSumUnitBytes, u0, u1);
      const uint8_t* my_row = valid ? ll_combine_row(layout, r.self, r.parity, t, __ffs(same) - 1) + b.begin : nullptr;
      const float w = lane < K ? __ldg(weights + size_t(t) * K + lane) : 0.f;
      weighted_sum_rows(my_row, w, K, true, a.dtype, int((b.end - b.begin) / esize), out + t * row_bytes + b.begin);
    });
  }
  finish_recv(c, r, kLlCombineRecvDone, c.copy_blocks, a.order, done);
}

__global__ void __launch_bounds__(kLlRecvThreads) ll_combine_recv(LlCombineRecvArgs a) {
  run_recv_kernel(a, [](auto&&... p) { combine_recv_phase(p...); });
}

// Both phases in one launch (as ll_dispatch in low_latency/dispatch.cu).
__global__ void __launch_bounds__(kLlSendThreads, 1) ll_combine(LlCombineSendArgs send, LlCombineRecvArgs recv) {
  run_both_phases(
      send, recv, [](auto&&... p) { return combine_send_phase<PeerStores>(p...); },
      [](auto&&... p) { combine_recv_phase(p...); });
}

int ll_combine_recv_blocks(const LlCombineRecvArgs& a) {
  const size_t row_bytes = size_t(a.hidden) * dtype_bytes(a.dtype);
  return blocks_for((long long)a.num_tokens * row_units(row_bytes, kSumUnitBytes), kLlRecvWarps, ll_block_limit(a.c));
}

}  // namespace

cudaError_t prepare_ll_kernels() {
  cudaError_t err = prepare_ll_dispatch_kernels();
  return err != cudaSuccess ? err : load_kernels(ll_combine_send<PeerStores>, ll_combine_recv, ll_combine);
}

cudaError_t launch_ll_combine_send(const LlCombineSendArgs& a, cudaStream_t stream) {
  if (a.c.layout.sizes.num_nodes > 1) return a.c.net->ll_combine_send(a, stream);
  return launch_ll_combine_send_with<PeerStores>(a, stream);
}

cudaError_t launch_ll_combine_recv(const LlCombineRecvArgs& args, cudaStream_t stream) {
  LlCombineRecvArgs a = args;
  a.c.copy_blocks = ll_combine_recv_blocks(a);
  ll_combine_recv<<<a.c.num_local_ranks * a.c.copy_blocks, kLlRecvThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_ll_combine(const LlCombineSendArgs& send, const LlCombineRecvArgs& recv, cudaStream_t stream) {
  // the send phase sized to the rows a dispatch of this call's shape delivered (as
  // launch_ll_dispatch sizes its receive)
  return launch_one_call(ll_combine, send, recv, ll_combine_send_blocks(send, recv.num_tokens),
                         ll_combine_recv_blocks(recv), ll_combine_send_smem(send), stream, launch_ll_combine_send,
                         launch_ll_combine_recv);
}

}  // namespace jax_ep
