// Low-latency combine (docs/protocol.md, "Low-latency dispatch/combine"). Two
// launches, each serving all ranks of this launch:
//   send  expert side: low_latency/combine_send.cuh (built here for peers on this
//         node; the NVSHMEM module builds it for groups spanning nodes);
//   recv  home side: wait for every live rank's flag, then
//         out[t] = Σ_k w[t,k] * row(t, first k of e_k) in float32, k ascending,
//         skipping masked selections and failed ranks: the reference's order exactly.
#include "common/load_kernels.h"
#include "low_latency/combine_send.cuh"
#include "nvshmem/launchers.h"

namespace jax_ep {
namespace {

__global__ void __launch_bounds__(kLlRecvThreads) ll_combine_recv(LlCombineRecvArgs a) {
  if (returns_closed(a.c)) return;  // docs/protocol.md, "Ordering and lifetime"
  const CommContext& c = a.c;
  const BufferLayout& layout = c.layout;
  const int R = c.num_ranks, T = a.num_tokens, K = a.num_topk, H = a.hidden, E = a.num_experts, e_loc = E / R;
  const int local = blockIdx.x / c.copy_blocks, block = blockIdx.x % c.copy_blocks;
  const RankCtx r = ll_recv_ctx(c, local, a.ticket);
  const int* active = a.active_ranks + size_t(local) * R;
  // nobody sends to a failed rank: it waits for no one and its tokens sum to zero
  const bool me_active = active[r.rank] != 0;

  bool ok = true;
  const int peer = threadIdx.x;
  if (me_active && peer < R && active[peer]) {
    uint64_t v = 0;
    ok = wait_tag(ll_combine_signal(layout, r.self, r.parity, peer), uint32_t(r.seq), peer,
                  wait_ctx(c, r, kPhaseLlCombineSignal), &v);
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
      const uint8_t* my_row = valid ? ll_combine_row(layout, r.self, r.parity, t, __ffs(same) - 1) + b.begin : nullptr;
      const float w = lane < K ? __ldg(weights + size_t(t) * K + lane) : 0.f;
      weighted_sum_rows(my_row, w, K, true, a.dtype, int((b.end - b.begin) / esize), out + t * row_bytes + b.begin);
    });
  }
  finish_recv(c, r, kLlCombineRecvSeq, c.copy_blocks, a.order);
}

}  // namespace

cudaError_t prepare_ll_kernels() {
  cudaError_t err = prepare_ll_dispatch_kernels();
  return err != cudaSuccess ? err : load_kernels(ll_combine_send<PeerStores>, ll_combine_recv);
}

cudaError_t launch_ll_combine_send(const LlCombineSendArgs& a, cudaStream_t stream) {
  if (a.c.layout.sizes.num_nodes > 1) return a.c.net->ll_combine_send(a, stream);
  return launch_ll_combine_send_with<PeerStores>(a, stream);
}

cudaError_t launch_ll_combine_recv(const LlCombineRecvArgs& args, cudaStream_t stream) {
  LlCombineRecvArgs a = args;
  const size_t row_bytes = size_t(a.hidden) * (a.dtype == kF32 ? 4 : 2);
  a.c.copy_blocks =
      blocks_for((long long)a.num_tokens * row_units(row_bytes, kSumUnitBytes), kLlRecvWarps, ll_block_limit(a.c));
  ll_combine_recv<<<a.c.num_local_ranks * a.c.copy_blocks, kLlRecvThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep
