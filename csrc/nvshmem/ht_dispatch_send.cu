// HT dispatch, first hop (docs/protocol.md, "Internode"): every token crosses the
// network once per destination node. Each block stages its contiguous token range in
// this rank's symmetric buffer (the routing row, and the payload raw or quantised to
// FP8, once per token) and puts each token's row to the relay of our local index on
// every other node that holds one of its experts, then the block's routing rows to
// every other node (which tell the relay which tokens came). After its puts complete,
// the block adds one to our node's signal word at each such relay.
#include "common/load_kernels.h"
#include "common/rows.cuh"
#include "high_throughput/internode.cuh"
#include "nvshmem/device.cuh"
#include "nvshmem/kernels.h"

namespace jax_ep {
namespace {

__global__ void __launch_bounds__(kHtThreads) ht_net_dispatch_send(HtDispatchArgs a) {
  RankCtx r;
  NodeCtx nd;
  if (!start_internode(a.c, kHtDispatchSeq, &r, &nd)) return;
  const CommContext& c = a.c;
  const BufferLayout& layout = c.layout;
  const int T = a.num_tokens, K = a.num_topk, H = a.hidden, E = a.num_experts, e_loc = E / c.num_ranks;
  const int esize = dtype_bytes(a.dtype), lane = lane_id();
  const size_t raw_bytes = size_t(H) * esize, meta_bytes = layout.meta_bytes_per_token();
  const size_t payload = wire_payload_bytes(H, esize, a.fp8);
  const uint8_t* x = static_cast<const uint8_t*>(a.x);
  int t_begin, t_end;
  block_tokens(T, c.send_blocks, blockIdx.x, &t_begin, &t_end);

  for (int t = t_begin + warp_id(); t < t_end; t += kHtWarps) {
    int e = lane < K ? a.topk_idx[size_t(t) * K + lane] : -1;
    const bool valid = lane < K && e >= 0 && e < E;
    if (!valid) e = -1;
    const float w = valid && a.topk_weights ? a.topk_weights[size_t(t) * K + lane] : 0.f;
    uint8_t* meta = net_stage_meta(layout, r.self, t);
    if (lane < K) {
      reinterpret_cast<int*>(meta)[lane] = e;
      reinterpret_cast<float*>(meta)[K + lane] = w;
    }
    const uint64_t nodes = nodes_of(dest_mask(valid, valid ? e / e_loc : 0), nd.P);
    if (!nodes) continue;
    // staged once: our own node's relay (this rank) forwards it from here too
    uint8_t* staged = net_stage_row(layout, r.self, t);
    uint8_t* my_dst = lane == 0 ? staged : nullptr;
    const uint8_t* x_row = x + size_t(t) * raw_bytes;
    if (a.fp8)
      quantize_row_multi(x_row, a.dtype, H, a.round_scale, my_dst, reinterpret_cast<float*>(my_dst + H), 1);
    else
      copy_row_any(x_row, false, raw_bytes, my_dst, 1);
    __syncwarp();
    for (uint64_t to = nodes & ~(1ull << nd.node); to; to &= to - 1) {
      const int m = __ffsll(to) - 1;
      net_put_warp(net_dispatch_row(layout, r.self, r.parity, nd.node, t), staged, payload, m * nd.P + nd.local);
    }
  }
  __syncthreads();  // the block's routing rows are staged
  if (t_end > t_begin) {
    for (int m = warp_id(); m < nd.N; m += kHtWarps) {
      if (m == nd.node) continue;
      net_put_warp(net_dispatch_meta(layout, r.self, r.parity, nd.node, t_begin),
                   net_stage_meta(layout, r.self, t_begin), size_t(t_end - t_begin) * meta_bytes, m * nd.P + nd.local);
    }
  }
  signal_other_nodes(r.self, layout.net_dispatch_signal, nd);
}

}  // namespace

cudaError_t prepare_net_dispatch_kernels() {
  return load_kernels(ht_net_dispatch_send);
}

cudaError_t launch_ht_net_dispatch_send(const HtDispatchArgs& a, cudaStream_t stream) {
  ht_net_dispatch_send<<<a.c.send_blocks, kHtThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep
