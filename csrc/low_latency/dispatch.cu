// Low-latency dispatch (docs/protocol.md, "Low-latency dispatch/combine"). The split
// form is two launches, each serving all ranks of this launch, so XLA can schedule
// work between them:
//   send  low_latency/dispatch_send.cuh (built here for peers on this node; the
//         NVSHMEM module builds it for groups spanning nodes);
//   recv  wait for every live source's count of every local expert, then copy the
//         messages out in (source rank, j) order: exactly the reference's row order.
// The one-call form (low_latency_dispatch) runs both phases in one launch, ll_dispatch,
// where the group allows it (ll_one_launch): a launch and its fixed start fewer.
#include "common/load_kernels.h"
#include "low_latency/dispatch_send.cuh"
#include "nvshmem/launchers.h"

namespace jax_ep {
namespace {

// ---------------------------------------------------------------------------
// recv
// ---------------------------------------------------------------------------

// The receive phase, run by block `block` of rank `local` (c.copy_blocks per rank):
// the ll_dispatch_recv kernel, or the second half of ll_dispatch. `live`: the rank's
// active_ranks in shared memory; `done`: the arrival counter of its last block;
// `self_here` (run_both_phases): the counts of this rank's own rows are the send
// phase's totals, still in dynamic shared memory (send_counts_total, past the E words
// this phase's counts take), not a signal.
__device__ __forceinline__ void dispatch_recv_phase(const LlDispatchRecvArgs& a, int local, int block, const RankCtx& r,
                                                    const int* live, int done, bool self_here) {
  extern __shared__ int smem[];
  const CommContext& c = a.c;
  const BufferLayout& layout = c.layout;
  const int R = c.num_ranks, E = a.num_experts, e_loc = E / R, H = a.hidden;
  const int T_max = layout.sizes.ll_max_tokens;
  int* counts = smem;     // [E_loc][R] messages of (local expert, source)
  int* start = smem + E;  // [E_loc * R + 1] flat exclusive prefix: expert-major, then source
  // nobody sends to a failed rank: it waits for no one and receives nothing
  const bool me_active = live[r.rank] != 0;

  bool ok = true;
  for (int i = threadIdx.x; i < E; i += kLlRecvThreads) {
    const int s = i % R;
    uint32_t n = 0;
    if (self_here && s == r.rank) {
      n = min(uint32_t(send_counts_total(smem, E)[r.rank * e_loc + i / R]), uint32_t(T_max));
    } else if (ok && me_active && live[s]) {
      uint64_t v = 0;
      ok = wait_tag(ll_dispatch_signal(layout, r.self, r.parity, i / R, s), uint32_t(r.seq), s,
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
    const size_t payload_bytes = a.fp8 ? size_t(H) : size_t(H) * dtype_bytes(a.dtype);
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
    for (size_t entry = size_t(block) * kLlRecvThreads + threadIdx.x; entry < size_t(e_loc) * RT; entry += stride) {
      const int e = int(entry / RT);
      if (int(entry % RT) >= start[(e + 1) * R] - start[e * R]) src_info[entry] = topk_slot[entry] = -1;
    }

    // rows: index `flat` over (expert, source, j), cut into units over every warp of the rank
    const int units = row_units(payload_bytes, kCopyUnitBytes);
    const int worker = block * kLlRecvWarps + warp_id();
    for_each_piece(start[E], units, worker, c.copy_blocks * kLlRecvWarps, [&](int flat, int u0, int u1) {
      const int es = segment_of(start, E, flat), e = es / R, s = es % R;
      const int j = flat - start[es], row = start[es] - start[e * R] + j;
      const uint8_t* msg = ll_dispatch_message(layout, r.self, r.parity, e, s, j);
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
  finish_recv(c, r, kLlDispatchRecvDone, c.copy_blocks, a.order, done);
}

__global__ void __launch_bounds__(kLlRecvThreads) ll_dispatch_recv(LlDispatchRecvArgs a) {
  run_recv_kernel(a, [](auto&&... p) { dispatch_recv_phase(p...); });
}

// Both phases in one launch (every block resident: launch_one_wave).
__global__ void __launch_bounds__(kLlSendThreads, 1) ll_dispatch(LlDispatchSendArgs send, LlDispatchRecvArgs recv) {
  run_both_phases(
      send, recv, [](auto&&... p) { return dispatch_send_phase<PeerStores>(p...); },
      [](auto&&... p) { dispatch_recv_phase(p...); });
}

// `tokens`: see ll_max_recv_rows (the split receive does not know the send's count).
int ll_dispatch_recv_blocks(const LlDispatchRecvArgs& a, long long tokens = -1) {
  const size_t payload = a.fp8 ? size_t(a.hidden) : size_t(a.hidden) * dtype_bytes(a.dtype);
  return blocks_for(ll_max_recv_rows(a.c.layout, tokens) * row_units(payload, kCopyUnitBytes), kLlRecvWarps,
                    ll_block_limit(a.c));
}

size_t ll_dispatch_recv_smem(const LlDispatchRecvArgs& a) {
  return (size_t(2) * a.num_experts + 1) * sizeof(int);
}

}  // namespace

cudaError_t prepare_ll_dispatch_kernels() {
  return load_kernels(ll_dispatch_send<PeerStores>, ll_dispatch_recv, ll_dispatch);
}

cudaError_t launch_ll_dispatch_send(const LlDispatchSendArgs& a, cudaStream_t stream) {
  if (a.c.layout.sizes.num_nodes > 1) return a.c.net->ll_dispatch_send(a, stream);
  return launch_ll_dispatch_send_with<PeerStores>(a, stream);
}

cudaError_t launch_ll_dispatch_recv(const LlDispatchRecvArgs& args, cudaStream_t stream) {
  LlDispatchRecvArgs a = args;
  a.c.copy_blocks = ll_dispatch_recv_blocks(a);
  ll_dispatch_recv<<<a.c.num_local_ranks * a.c.copy_blocks, kLlRecvThreads, ll_dispatch_recv_smem(a), stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_ll_dispatch(const LlDispatchSendArgs& send, const LlDispatchRecvArgs& recv, cudaStream_t stream) {
  // the receive phase sized to the rows this call can deliver (num_tokens per source),
  // not to the buffer: a decode batch below T_max gets the blocks its rows need
  return launch_one_call(ll_dispatch, send, recv, ll_dispatch_send_blocks(send),
                         ll_dispatch_recv_blocks(recv, send.num_tokens),
                         std::max(ll_dispatch_send_smem(send), ll_dispatch_recv_smem(recv)), stream,
                         launch_ll_dispatch_send, launch_ll_dispatch_recv);
}

}  // namespace jax_ep
