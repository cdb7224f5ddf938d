// Where each region lives inside one rank's communication buffer.
//
// Every rank owns one allocation; peers write into it (NVLink peer access or
// CUDA IPC). The layout is a pure function of the group's sizes, so every rank
// computes the same offsets for every peer. Protocol facts (who writes which
// word, when) are in docs/protocol.md; region names here match it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/device_types.h"

namespace jax_ep {

constexpr size_t kAlign = 128;
constexpr int kFp8Group = 128;  // channels per FP8 scale

JAX_EP_HD inline size_t align_up(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}

// Sizes a group was created with (upper bounds for every call).
// The one list of a group's sizes: Python passes them by these names (the nanobind
// module's kSizeFields; jax_ep/backends/cuda/runtime.py), nothing else restates them.
struct BufferSizes {
  int num_ranks = 1;
  int max_tokens = 1;     // high-throughput tokens per rank per call (T_max)
  int ll_max_tokens = 1;  // low-latency tokens per rank per call (decode batch bound)
  int hidden = 1;         // channels per token (max)
  int elem_bytes = 2;     // widest payload element the buffers must hold
  int num_topk = 1;       // K (max)
  int num_local_experts = 1;
  int low_latency = 0;  // allocate the low-latency regions too
  // Nodes the ranks are split into (internode groups, NVSHMEM transport): ranks
  // [n * R/N, (n+1) * R/N) form node n. 1 = every rank reachable over NVLink.
  int num_nodes = 1;
};

// Bytes of one token row on the wire: the raw payload, or FP8 + one float scale per
// 128 channels, whichever is larger, padded to 16 bytes for vector copies.
JAX_EP_HD inline size_t wire_row_bytes(const BufferSizes& sizes) {
  size_t raw = size_t(sizes.hidden) * sizes.elem_bytes;
  size_t fp8 = size_t(sizes.hidden) + size_t((sizes.hidden + kFp8Group - 1) / kFp8Group) * 4;
  return align_up(raw > fp8 ? raw : fp8, 16);
}

// Bytes of one call's token row on the wire: FP8 (hidden a multiple of 128) plus one
// float scale per 128 channels, or the raw payload of elem_bytes-byte elements.
JAX_EP_HD inline size_t wire_payload_bytes(size_t hidden, size_t elem_bytes, bool fp8) {
  return fp8 ? hidden + hidden / kFp8Group * 4 : hidden * elem_bytes;
}

// A low-latency dispatch message: 16-byte header (source token, first k) + row.
constexpr size_t kLowLatencyHeaderBytes = 16;

struct BufferLayout {
  BufferSizes sizes;
  size_t row_bytes = 0;          // wire_row_bytes(sizes)
  size_t combine_row_bytes = 0;  // hidden * elem_bytes, padded to 16
  size_t bitmap_words = 0;       // 32-bit words covering R * T_max received-token bits
  // --- written by peers -------------------------------------------------------
  size_t ht_dispatch_arrival = 0;  // u64 [R]: blocks of source s that finished sending
  size_t ht_combine_arrival = 0;   // u64 [R]
  size_t ht_dispatch_meta = 0;     // [2][R][T_max][K] int32 expert ids, then float weights
  size_t ht_dispatch_data = 0;     // [2][R][T_max][row_bytes]
  size_t ht_combine_data = 0;      // [2][R][T_max][combine_row_bytes]
  size_t ht_combine_extra = 0;     // [2][R][T_max][K] float: extra columns of each partial
  // low-latency regions: T_ll = sizes.ll_max_tokens
  size_t ll_dispatch_signal = 0;  // u64 [2][E_loc][R]: (seq << 32) | rows sent
  size_t ll_dispatch_data = 0;    // [2][E_loc][R][T_ll][ll_message_bytes]
  size_t ll_combine_signal = 0;   // u64 [2][R]
  size_t ll_combine_data = 0;     // [2][T_ll][K][combine_row_bytes]
  // --- internode (num_nodes > 1): written by peers of other nodes through NVSHMEM,
  // except the tags, which node-local peers write (docs/protocol.md, "Internode")
  size_t net_dispatch_signal = 0;  // u64 [N]: send blocks of node n's source that finished
  size_t net_combine_signal = 0;   // u64 [N]: relay blocks of node n that finished
  size_t net_dispatch_meta = 0;    // [2][N][T_max][K] ids then weights, from (n, my local index)
  size_t net_dispatch_data = 0;    // [2][N][T_max][row_bytes]
  size_t net_combine_data = 0;     // [2][N][T_max][combine_row_bytes]: node n's partial of my token
  size_t net_combine_tag = 0;      // u32 [2][R][T_max]: seq of the partial in ht_combine_data's row
  size_t net_stage_meta = 0;       // [T_max][K] (private: NVSHMEM's source buffers)
  size_t net_stage_data = 0;       // [T_max][row_bytes]
  size_t net_stage_combine = 0;    // [N][T_max][combine_row_bytes]
  size_t ll_stage_dispatch = 0;    // [T_ll][K][ll_message_bytes] (low-latency + internode)
  size_t ll_stage_combine = 0;     // [R*T_ll*min(K, E_loc)][combine_row_bytes]
  // --- private to the owning rank ---------------------------------------------
  size_t counters = 0;  // u64 [kNumCounters]: per-op sequence numbers, abort flag, ... (enum Counter)
  size_t bitmaps = 0;   // u32 [E_loc + 1][bitmap_words]
  size_t prefixes = 0;  // u32 [E_loc + 1][bitmap_words] exclusive popcount prefix
  size_t totals = 0;    // int32 [E_loc + 1]
  size_t total_bytes = 0;

  JAX_EP_HD size_t ll_message_bytes() const { return kLowLatencyHeaderBytes + row_bytes; }
  JAX_EP_HD size_t meta_bytes_per_token() const { return size_t(sizes.num_topk) * 8; }
  JAX_EP_HD int ranks_per_node() const { return sizes.num_ranks / sizes.num_nodes; }
};

// Counter slots in the private region.
enum Counter : int {
  kHtDispatchSeq = 0,
  kHtCombineSeq = 1,
  kLlDispatchSendSeq = 2,
  kLlCombineSendSeq = 3,
  // [2], by buffer half: the last op whose receive finished there (see finish_recv)
  kLlDispatchRecvDone = 4,
  kLlCombineRecvDone = 6,
  kAbortFlag = 8,
  kDoneBlocks = 9,       // blocks of the running op that finished (see finish_op)
  kDoneRecvBlocks = 10,  // the same for the receive phase of a one-launch low-latency op
  kBarrierArrived = 11,  // blocks at the running barrier of a one-wave dispatch (see rank_barrier)
  kBarrierRound = 12,    // barriers completed (the waiting blocks watch it)
  kNumCounters = 13,
};
// a record's two halves are read in one 16-byte load (peer_received): even slots of the
// counters region, which starts on a kAlign boundary of a buffer whose base is at
// least 256-byte aligned (cudaMalloc, IPC mappings, the NVSHMEM symmetric heap)
static_assert(kLlDispatchRecvDone % 2 == 0 && kLlCombineRecvDone % 2 == 0, "records must be 16-byte aligned");

JAX_EP_HD inline BufferLayout make_layout(const BufferSizes& sizes) {
  BufferLayout layout;
  layout.sizes = sizes;
  layout.row_bytes = wire_row_bytes(sizes);
  layout.combine_row_bytes = align_up(size_t(sizes.hidden) * sizes.elem_bytes, 16);
  layout.bitmap_words = (size_t(sizes.num_ranks) * sizes.max_tokens + 31) / 32;
  const size_t R = sizes.num_ranks, T_max = sizes.max_tokens, K = sizes.num_topk, E_loc = sizes.num_local_experts;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    size_t at = off;
    off = align_up(off + bytes, kAlign);
    return at;
  };
  layout.ht_dispatch_arrival = take(R * 8);
  layout.ht_combine_arrival = take(R * 8);
  layout.ht_dispatch_meta = take(2 * R * T_max * K * 8);
  layout.ht_dispatch_data = take(2 * R * T_max * layout.row_bytes);
  layout.ht_combine_data = take(2 * R * T_max * layout.combine_row_bytes);
  layout.ht_combine_extra = take(2 * R * T_max * K * 4);
  const size_t T_ll = sizes.ll_max_tokens;
  if (sizes.low_latency) {
    layout.ll_dispatch_signal = take(2 * E_loc * R * 8);
    layout.ll_dispatch_data = take(2 * E_loc * R * T_ll * layout.ll_message_bytes());
    layout.ll_combine_signal = take(2 * R * 8);
    layout.ll_combine_data = take(2 * T_ll * K * layout.combine_row_bytes);
  }
  if (sizes.num_nodes > 1) {
    const size_t N = sizes.num_nodes, meta = layout.meta_bytes_per_token();
    layout.net_dispatch_signal = take(N * 8);
    layout.net_combine_signal = take(N * 8);
    layout.net_dispatch_meta = take(2 * N * T_max * meta);
    layout.net_dispatch_data = take(2 * N * T_max * layout.row_bytes);
    layout.net_combine_data = take(2 * N * T_max * layout.combine_row_bytes);
    layout.net_combine_tag = take(2 * R * T_max * 4);
    layout.net_stage_meta = take(T_max * meta);
    layout.net_stage_data = take(T_max * layout.row_bytes);
    layout.net_stage_combine = take(N * T_max * layout.combine_row_bytes);
    if (sizes.low_latency) {
      layout.ll_stage_dispatch = take(T_ll * K * layout.ll_message_bytes());
      layout.ll_stage_combine = take(R * T_ll * (K < E_loc ? K : E_loc) * layout.combine_row_bytes);
    }
  }
  layout.counters = take(kNumCounters * 8);
  layout.bitmaps = take((E_loc + 1) * layout.bitmap_words * 4);
  layout.prefixes = take((E_loc + 1) * layout.bitmap_words * 4);
  layout.totals = take((E_loc + 1) * 4);
  layout.total_bytes = off;
  return layout;
}

}  // namespace jax_ep
