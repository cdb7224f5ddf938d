// Cached dispatch (docs/protocol.md, "HT cached dispatch"): the backward of combine
// sends each home row to the ranks its token went to, in a dispatch whose routing the
// forward already settled. The send phase is the dispatch's own (same slots, arrival
// words and sequence number); the receive copies each received token's row to its
// place in the handle's list (recv_src), with no routing pass (no bitmap, no scan):
// two launches (one when the whole group runs in this launch: whole_group_here) instead of four.
#include "common/load_kernels.h"
#include "common/rows.cuh"
#include "high_throughput/common.cuh"

namespace jax_ep {
namespace {

__global__ void __launch_bounds__(kHtThreads) ht_cached_copy(HtDispatchArgs a) {
  if (returns_closed(a.c)) return;  // docs/protocol.md, "Ordering and lifetime"
  const CommContext& c = a.c;
  const int local = blockIdx.x / c.copy_blocks, block = blockIdx.x % c.copy_blocks;
  const RankCtx r = rank_ctx(c, local, kHtDispatchSeq);
  const int T = a.num_tokens;
  const size_t RT = size_t(c.num_ranks) * T;
  const size_t bytes = size_t(a.hidden) * dtype_bytes(a.dtype);
  const uint64_t target = r.seq * uint64_t(c.send_blocks);
  if (whole_group_here(c) || wait_all_peers(c, r, c.layout.ht_dispatch_arrival, target, kPhaseHtDispatchArrival)) {
    const int* recv_src = a.recv_src + local * RT;
    const uint8_t* x = static_cast<const uint8_t*>(a.x);  // [L, T, H]: sources in this launch
    uint8_t* out = static_cast<uint8_t*>(a.out_x) + size_t(local) * RT * bytes;
    for (size_t i = size_t(block) * kHtWarps + warp_id(); i < RT; i += size_t(c.copy_blocks) * kHtWarps) {
      const int p = recv_src[i];
      uint8_t* dst = out + i * bytes;
      if (p < 0) {  // past the received tokens: rows of nothing, their cotangent is 0
        zero_row(dst, bytes);
        continue;
      }
      const int src = p / T, t = p % T;
      const bool here = reads_operands(c, r.rank, src);
      const uint8_t* row =
          here ? x + (size_t(src - c.first_rank) * T + t) * bytes : dispatch_row(c.layout, r.self, r.parity, src, t);
      copy_row_any(row, !here, bytes, lane_id() == 0 ? dst : nullptr, 1);
    }
  }
  finish_op(c, r, kHtDispatchSeq, c.copy_blocks, a.order);
}

}  // namespace

cudaError_t prepare_ht_cached_dispatch_kernels() {
  return load_kernels(ht_cached_copy);
}

cudaError_t launch_ht_cached_dispatch(const HtDispatchArgs& a, cudaStream_t stream) {
  if (cudaError_t err = launch_ht_dispatch_send(a, stream); err != cudaSuccess) return err;
  ht_cached_copy<<<a.c.num_local_ranks * a.c.copy_blocks, kHtThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep
