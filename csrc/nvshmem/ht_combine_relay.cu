// HT combine, middle hop (docs/protocol.md, "Internode"). The relay of local index l
// on node n has, from every rank w of its node, w's partial of each token of every
// node's rank of index l (ht_combine_data row [w's index][source node], tagged with
// the op's sequence number when written). Per (source node, token) it adds the tagged
// partials in ascending writer order in float32, rounds to the payload dtype, and puts
// the row to the home rank (our own node's rows stay here); after its puts complete,
// each block adds one to our node's signal word at every other node's home rank.
#include "common/load_kernels.h"
#include "common/rows.cuh"
#include "high_throughput/internode.cuh"
#include "nvshmem/device.cuh"
#include "nvshmem/kernels.h"

namespace jax_ep {
namespace {

__global__ void __launch_bounds__(kHtThreads) ht_net_combine_relay(HtCombineArgs a) {
  RankCtx r;
  NodeCtx nd;
  if (!start_internode(a.c, kHtCombineSeq, &r, &nd)) return;
  const CommContext& c = a.c;
  const BufferLayout& layout = c.layout;
  // the node's writers send with copy_blocks blocks (launch_ht_combine)
  if (!wait_all_peers(c, r, layout.ht_combine_arrival, r.seq * uint64_t(c.copy_blocks), kPhaseHtCombineArrival,
                      node_peers(c, r.rank)))
    return;
  const int lane = lane_id(), T = a.num_tokens;
  const size_t row_bytes = size_t(a.hidden) * dtype_bytes(a.dtype);
  int t_begin, t_end;
  block_tokens(T, gridDim.x, blockIdx.x, &t_begin, &t_end);
  const int span = t_end - t_begin;
  for (int i = warp_id(); i < nd.N * span; i += kHtWarps) {
    const int m = i / span, t = t_begin + i % span;
    const bool tagged =
        lane < nd.P && __ldcg(net_combine_tag(layout, r.self, r.parity, lane * nd.N + m, t)) == uint32_t(r.seq);
    const uint32_t writers = __ballot_sync(kFullMask, tagged);
    if (!writers) continue;  // the token has no expert on this node
    const uint8_t* my_row;
    const int n = lanes_of_units(
        writers, [&](int writer) { return combine_row(layout, r.self, r.parity, writer * nd.N + m, t); }, &my_row);
    uint8_t* sum =
        m == nd.node ? net_combine_row(layout, r.self, r.parity, nd.node, t) : net_stage_combine(layout, r.self, m, t);
    weighted_sum_rows(my_row, 1.f, n, true, a.dtype, a.hidden, sum);
    if (m == nd.node) continue;
    __syncwarp();
    net_put_warp(net_combine_row(layout, r.self, r.parity, nd.node, t), sum, row_bytes, m * nd.P + nd.local);
  }
  signal_other_nodes(r.self, layout.net_combine_signal, nd);
}

}  // namespace

cudaError_t prepare_net_combine_kernels() {
  return load_kernels(ht_net_combine_relay);
}

cudaError_t launch_ht_net_combine_relay(const HtCombineArgs& a, cudaStream_t stream) {
  // as many blocks as the home's receive waits for (one signal each)
  ht_net_combine_relay<<<a.c.copy_blocks, kHtThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep
