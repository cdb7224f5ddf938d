// HT dispatch, second hop (docs/protocol.md, "Internode"). The relay, the rank of local
// index l on node n, holds the tokens of every node's rank of index l: its own staged
// by ht_net_dispatch_send, the others' put there through NVSHMEM. It forwards each over
// NVLink into the [source][token] slots of its node's ranks that the intranode send
// fills, then adds to their arrival words: from there on, the intranode receive kernels
// (bitmap, scan, copy) run unchanged.
#include "common/load_kernels.h"
#include "common/rows.cuh"
#include "high_throughput/internode.cuh"

namespace jax_ep {
namespace {

__global__ void __launch_bounds__(kHtThreads) ht_dispatch_forward(HtDispatchArgs a) {
  RankCtx r;
  NodeCtx nd;
  if (!start_internode(a.c, kHtDispatchSeq, &r, &nd)) return;
  const CommContext& c = a.c;
  const BufferLayout& layout = c.layout;
  const int T = a.num_tokens, K = a.num_topk, e_loc = a.num_experts / c.num_ranks;
  int t_begin, t_end;
  block_tokens(T, c.send_blocks, blockIdx.x, &t_begin, &t_end);
  // every other node's source sends with send_blocks blocks, each signalling once
  const auto relay_of = [&](int m) { return m * nd.P + nd.local; };
  if (!wait_nodes(c, r, layout.net_dispatch_signal, nd.node, r.seq * c.send_blocks, kPhaseNetDispatchArrival, relay_of))
    return;

  const int lane = lane_id(), span = t_end - t_begin;
  const size_t payload = wire_payload_bytes(a.hidden, dtype_bytes(a.dtype), a.fp8);
  const uint64_t node_ranks = node_peers(c, r.rank);
  for (int i = warp_id(); i < nd.N * span; i += kHtWarps) {
    const int m = i / span, t = t_begin + i % span, src = relay_of(m);
    const bool own = src == r.rank;
    const uint8_t* meta = own ? net_stage_meta(layout, r.self, t) : net_dispatch_meta(layout, r.self, r.parity, m, t);
    const uint8_t* row = own ? net_stage_row(layout, r.self, t) : net_dispatch_row(layout, r.self, r.parity, m, t);
    // the source canonicalised its rows: -1 for masked or out-of-range ids
    const int e = lane < K ? __ldcg(reinterpret_cast<const int*>(meta) + lane) : -1;
    const float w = lane < K ? __ldcg(reinterpret_cast<const float*>(meta) + K + lane) : 0.f;
    const uint64_t dests = dest_mask(e >= 0, e >= 0 ? e / e_loc : 0) & node_ranks;
    // routing rows to every rank of the node (their bitmap kernels read every candidate);
    // our own tokens' row is our input, read in place
    for (uint64_t to = node_ranks; to; to &= to - 1) {
      const int d = __ffsll(to) - 1;
      if (own && d == r.rank) continue;
      uint8_t* dst = dispatch_meta(layout, c.peers[d], r.parity, src, t);
      if (lane < K) {
        reinterpret_cast<int*>(dst)[lane] = e;
        reinterpret_cast<float*>(dst)[K + lane] = w;
      }
    }
    const uint64_t to_rows = own ? dests & ~(1ull << r.rank) : dests;
    if (!to_rows) continue;
    uint8_t* my_dst;
    const int ndst =
        lanes_of_units(to_rows, [&](int d) { return dispatch_row(layout, c.peers[d], r.parity, src, t); }, &my_dst);
    copy_row_any(row, true, payload, my_dst, ndst);
  }

  // one arrival per block for every (source, rank of the node) pair but a rank's own
  fence(c.sys_scope);
  __syncthreads();
  for (int i = threadIdx.x; i < nd.N * nd.P; i += kHtThreads) {
    const int src = relay_of(i / nd.P), d = nd.node * nd.P + i % nd.P;
    if (src != d)
      add_release(reinterpret_cast<uint64_t*>(c.peers[d] + layout.ht_dispatch_arrival) + src, 1, c.sys_scope);
  }
}

}  // namespace

cudaError_t prepare_ht_forward_kernels() {
  return load_kernels(ht_dispatch_forward);
}

cudaError_t launch_ht_dispatch_forward(const HtDispatchArgs& a, cudaStream_t stream) {
  ht_dispatch_forward<<<a.c.send_blocks, kHtThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep
