// High-throughput dispatch over NVLink peer memory (docs/protocol.md, "HT dispatch").
//
// Four launches per call (three when the group has one rank: nothing to send), each
// serving all ranks of this launch (one rank, or all virtual ranks in loopback):
//   send     push routing rows to every peer and token rows to their destination
//            ranks ([source][token] slots: no queues, no count exchange), then add
//            one to each peer's arrival word per block;
//   bitmap   wait for every peer, then mark per 32 received-token candidates which
//            tokens came here (bucket 0) and which local experts they chose (first,
//            before any wait: report expert ids out of range in our own routing);
//   scan     exclusive popcount prefix of every bucket's words;
//   copy     token-major copy-out: read each received token once (our own tokens
//            straight from x), write it to its rows (one per rank, or one per
//            distinct local expert), fill the handle; then fill the handle entries
//            past the received tokens (-1, 0) and, for per_rank, the routing of rows
//            past the kept ones. Output rows past the valid ones are left as they
//            are: nobody reads them (the contract in jax_ep/reference.py), and a
//            consumer that needs zeros there masks them.
// Internode groups replace the send by two hops (high_throughput/relay_forward.cu), which fill
// the same slots and arrival words.
// Slot of (token, expert) = number of earlier received tokens that chose the expert,
// exactly the reference's order (jax_ep/reference.py).
#include "common/load_kernels.h"
#include "common/rows.cuh"
#include "high_throughput/common.cuh"
#include "nvshmem/launchers.h"

namespace jax_ep {
namespace {

constexpr int kBitmapThreads = 256;
constexpr int kScanThreads = 1024;

struct Shape {
  int T, K, H, E, E_loc, R, esize, num_buckets, rows_out;
};

__device__ inline Shape shape_of(const HtDispatchArgs& a) {
  Shape shape;
  shape.T = a.num_tokens;
  shape.K = a.num_topk;
  shape.H = a.hidden;
  shape.E = a.num_experts;
  shape.R = a.c.num_ranks;
  shape.E_loc = shape.E / shape.R;
  shape.esize = a.dtype == kF32 ? 4 : 2;
  shape.num_buckets = a.layout_kind == kPerRank ? 1 : shape.E_loc + 1;
  shape.rows_out = a.layout_kind == kExpertMajor ? shape.E_loc * a.capacity : a.capacity;
  return shape;
}

// Expert id of (source rank, token, k) as this rank sees it; -1 when masked or out of
// range (senders canonicalise their rows, our own input is checked here).
__device__ inline int routing_id(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r, int src, int t, int k) {
  if (src == r.rank) {
    int e = a.topk_idx[(size_t(r.local) * shape.T + t) * shape.K + k];
    return e >= 0 && e < shape.E ? e : -1;
  }
  const int* meta = reinterpret_cast<const int*>(dispatch_meta(a.c.layout, r.self, r.parity, src, t));
  return __ldcg(meta + k);
}

// Records the first expert id of this rank's own routing outside [-1, E) (the kernels
// treat it as masked; the error reaches the caller at the group's next check). Before
// any wait: a peer's timeout must not hide it. Grid-stride over the rank's T * K ids.
__device__ inline void report_bad_ids(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r, int block,
                                      int blocks) {
  const int* ids = a.topk_idx + size_t(r.local) * shape.T * shape.K;
  for (int i = block * blockDim.x + threadIdx.x; i < shape.T * shape.K; i += blocks * blockDim.x) {
    const int e = ids[i];
    if (e < -1 || e >= shape.E) record_error(a.c.err, kErrBadExpert, r.rank, i / shape.K, i % shape.K, shape.E, e, 0);
  }
}

__device__ inline float routing_weight(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r, int src, int t,
                                       int k) {
  if (src == r.rank) return a.topk_weights ? a.topk_weights[(size_t(r.local) * shape.T + t) * shape.K + k] : 0.f;
  const float* meta = reinterpret_cast<const float*>(dispatch_meta(a.c.layout, r.self, r.parity, src, t));
  return __ldcg(meta + shape.K + k);
}

__device__ inline int local_id(int e, int rank, int e_loc) {
  return e >= 0 && e / e_loc == rank ? e - rank * e_loc : -1;
}

// ---------------------------------------------------------------------------
// send
// ---------------------------------------------------------------------------

__global__ void __launch_bounds__(kHtThreads) ht_dispatch_send(HtDispatchArgs a) {
  if (returns_closed(a.c)) return;  // docs/protocol.md, "Ordering and lifetime"
  const CommContext& c = a.c;
  const Shape shape = shape_of(a);
  const int local = blockIdx.x / c.send_blocks, block = blockIdx.x % c.send_blocks;
  const RankCtx r = rank_ctx(c, local, kHtDispatchSeq);
  if (r.rank == c.fault_inject_rank) return;  // testing: a peer that never arrives
  const int lane = lane_id();
  const int per_block = (shape.T + c.send_blocks - 1) / c.send_blocks;
  const int t_begin = block * per_block, t_end = min(shape.T, t_begin + per_block);
  const uint8_t* x = static_cast<const uint8_t*>(a.x) + size_t(local) * shape.T * shape.H * shape.esize;
  const size_t raw_bytes = size_t(shape.H) * shape.esize;

  for (int t = t_begin + warp_id(); t < t_end; t += kHtWarps) {
    int e = lane < shape.K ? a.topk_idx[(size_t(local) * shape.T + t) * shape.K + lane] : -1;
    const bool valid = lane < shape.K && e >= 0 && e < shape.E;
    if (!valid) e = -1;
    const uint64_t dests = dest_mask(valid, valid ? e / shape.E_loc : 0);
    const float w = valid && a.topk_weights ? a.topk_weights[(size_t(local) * shape.T + t) * shape.K + lane] : 0.f;

    // routing rows: every peer learns which of our tokens it receives
    for (int peer = 0; peer < shape.R; ++peer) {
      if (peer == r.rank || lane >= shape.K) continue;
      uint8_t* meta = dispatch_meta(c.layout, c.peers[peer], r.parity, r.rank, t);
      reinterpret_cast<int*>(meta)[lane] = e;
      if ((dests >> peer) & 1) reinterpret_cast<float*>(meta)[shape.K + lane] = w;
    }
    // token rows to each destination rank but ourselves (read locally at copy-out)
    uint64_t remote = dests & ~(1ull << r.rank);
    const int ndst = __popcll(remote);
    if (ndst == 0) continue;
    uint8_t* my_dst = nullptr;
    for (int j = 0; j < ndst; ++j) {
      const int peer = __ffsll(remote) - 1;
      remote &= remote - 1;
      if (lane == j) my_dst = dispatch_row(c.layout, c.peers[peer], r.parity, r.rank, t);
    }
    const uint8_t* x_row = x + size_t(t) * raw_bytes;
    if (a.fp8) {
      quantize_row_multi(x_row, a.dtype, shape.H, a.round_scale, my_dst, reinterpret_cast<float*>(my_dst + shape.H),
                         ndst);
    } else {
      copy_row_any(x_row, false, raw_bytes, my_dst, ndst);
    }
  }
  publish_arrival(c, r, c.layout.ht_dispatch_arrival);
}

// ---------------------------------------------------------------------------
// bitmap: bucket 0 = "received", bucket 1 + e = "chose local expert e"
// ---------------------------------------------------------------------------

__global__ void __launch_bounds__(kBitmapThreads) ht_dispatch_bitmap(HtDispatchArgs a) {
  if (returns_closed(a.c)) return;            // docs/protocol.md, "Ordering and lifetime"
  extern __shared__ uint32_t expert_words[];  // [warps][E_loc]
  const CommContext& c = a.c;
  const Shape shape = shape_of(a);
  const int local = blockIdx.x / c.copy_blocks, block = blockIdx.x % c.copy_blocks;
  const RankCtx r = rank_ctx(c, local, kHtDispatchSeq);
  report_bad_ids(a, shape, r, block, c.copy_blocks);
  const uint64_t target = r.seq * uint64_t(c.send_blocks);
  if (!wait_all_peers(c, r, c.layout.ht_dispatch_arrival, target, kPhaseHtDispatchArrival)) return;

  const int lane = lane_id(), warp = threadIdx.x / 32, warps = kBitmapThreads / 32;
  const int num_words = (shape.R * shape.T + 31) / 32;
  uint32_t* bitmaps = reinterpret_cast<uint32_t*>(r.self + c.layout.bitmaps);
  uint32_t* mine = expert_words + warp * shape.E_loc;
  const bool experts = shape.num_buckets > 1;
  for (int word_idx = block * warps + warp; word_idx < num_words; word_idx += c.copy_blocks * warps) {
    const int p = word_idx * 32 + lane;
    const bool in_range = p < shape.R * shape.T;
    const int src = in_range ? p / shape.T : 0, t = in_range ? p % shape.T : 0;
    if (experts) {
      for (int e = lane; e < shape.E_loc; e += 32) mine[e] = 0;
      __syncwarp();
    }
    bool any = false;
    for (int k = 0; k < shape.K && in_range; ++k) {
      const int le = local_id(routing_id(a, shape, r, src, t, k), r.rank, shape.E_loc);
      if (le < 0) continue;
      any = true;
      if (experts) atomicOr(&mine[le], 1u << lane);
    }
    const uint32_t word = __ballot_sync(kFullMask, any);
    if (lane == 0) bitmaps[word_idx] = word;
    if (experts) {
      __syncwarp();
      for (int e = lane; e < shape.E_loc; e += 32) bitmaps[size_t(1 + e) * c.layout.bitmap_words + word_idx] = mine[e];
      __syncwarp();
    }
  }
}

// ---------------------------------------------------------------------------
// scan: prefix[b][w] = Σ_{w' < w} popc(bitmap[b][w']); totals[b]
// ---------------------------------------------------------------------------

__global__ void __launch_bounds__(kScanThreads) ht_dispatch_scan(HtDispatchArgs a) {
  if (returns_closed(a.c)) return;  // docs/protocol.md, "Ordering and lifetime"
  __shared__ int warp_totals[kScanThreads / 32];
  const CommContext& c = a.c;
  const Shape shape = shape_of(a);
  const int local = blockIdx.x / shape.num_buckets, bucket = blockIdx.x % shape.num_buckets;
  const RankCtx r = rank_ctx(c, local, kHtDispatchSeq);
  if (!__syncthreads_and(!aborted(c, r))) return;  // block-uniform: the scan has barriers
  const int num_words = (shape.R * shape.T + 31) / 32, threads = blockDim.x, warps = threads / 32;
  const uint32_t* words =
      reinterpret_cast<const uint32_t*>(r.self + c.layout.bitmaps) + size_t(bucket) * c.layout.bitmap_words;
  uint32_t* prefix = reinterpret_cast<uint32_t*>(r.self + c.layout.prefixes) + size_t(bucket) * c.layout.bitmap_words;
  const int per = (num_words + threads - 1) / threads;
  const int word0 = threadIdx.x * per, word1 = min(num_words, word0 + per);
  int mine = 0;
  for (int word_idx = word0; word_idx < word1; ++word_idx) mine += __popc(words[word_idx]);
  int warp_total;
  int before = warp_exclusive_scan(mine, &warp_total);
  if (lane_id() == 0) warp_totals[warp_id()] = warp_total;
  __syncthreads();
  if (warp_id() == 0) {
    int v = lane_id() < warps ? warp_totals[lane_id()] : 0, all;
    int ex = warp_exclusive_scan(v, &all);
    if (lane_id() < warps) warp_totals[lane_id()] = ex;
    if (lane_id() == 0) reinterpret_cast<int*>(r.self + c.layout.totals)[bucket] = all;
  }
  __syncthreads();
  int run = warp_totals[warp_id()] + before;
  for (int word_idx = word0; word_idx < word1; ++word_idx) {
    prefix[word_idx] = run;
    run += __popc(words[word_idx]);
  }
}

// Threads of a scan block: about 4 words each (a bucket of a few hundred words needs no
// 1024-thread block), a whole number of warps, at most kScanThreads.
inline int scan_threads(int num_words) {
  const int want = ((num_words + 3) / 4 + 31) / 32 * 32;
  return want < 32 ? 32 : want > kScanThreads ? kScanThreads : want;
}

// ---------------------------------------------------------------------------
// copy-out
// ---------------------------------------------------------------------------

// Rows kept per expert and ragged offsets, from the bucket totals.
__device__ inline void expert_offsets(const HtDispatchArgs& a, const Shape& shape, const int* totals, int* offsets) {
  if (threadIdx.x == 0) {
    int run = 0;
    for (int e = 0; e < shape.E_loc; ++e) {
      offsets[e] = run;
      run += totals[1 + e];
    }
  }
  __syncthreads();
}

__device__ inline int kept_rows(const HtDispatchArgs& a, const Shape& shape, const int* totals, const int* offsets,
                                int e) {
  const int n = totals[1 + e];
  if (a.layout_kind == kExpertMajor) return min(n, a.capacity);
  return max(0, min(n, a.capacity - offsets[e]));
}

// Block 0's summary outputs: tokens received, rows kept (per local expert, or in the
// per_rank list) and selections dropped for want of capacity.
__device__ __forceinline__ void write_counts(const HtDispatchArgs& a, const Shape& shape, int local, const int* totals,
                                             const int* offsets) {
  const int n = totals[0];
  a.num_recv[local] = n;
  if (a.layout_kind == kPerRank) {
    const int kept = min(n, a.capacity);
    a.out_counts[local] = kept;
    a.out_dropped[local] = n - kept;
  } else {
    int dropped = 0;
    for (int e = 0; e < shape.E_loc; ++e) {
      const int kept = kept_rows(a, shape, totals, offsets, e);
      a.out_counts[size_t(local) * shape.E_loc + e] = kept;
      dropped += totals[1 + e] - kept;
    }
    a.out_dropped[local] = dropped;
  }
}

// The handle entry of received token i, candidate p = src * T + t: recv_src, and per
// k (lane) its local expert id le (-1: another rank's expert) and weight w.
__device__ __forceinline__ void write_handle_entry(const Shape& shape, int i, int p, int le, float w, int* recv_src,
                                                   int* recv_topk_idx, float* recv_weights) {
  const int lane = lane_id();
  if (lane == 0) recv_src[i] = p;
  if (lane < shape.K) {
    recv_topk_idx[size_t(i) * shape.K + lane] = le;
    recv_weights[size_t(i) * shape.K + lane] = w;
  }
}

// The output row of received token i for lane k's selection (local expert le, weight
// w), -1 when it has none (another rank's expert, or past the capacity); per_rank:
// the token's one row, lane 0's, whose routing it also writes. Writes the handle's
// recv_rows and returns whether this lane stores the payload: the first k choosing
// its expert (a repeated expert keeps the first k's copy). The expert layouts' row is
// the token's slot in its expert's bucket: the bucket word's prefix plus the bits
// before it. Warp-uniform (shuffles): the whole warp calls it for one token.
__device__ __forceinline__ bool output_row(const HtDispatchArgs& a, const Shape& shape, int local, int i, int word_idx,
                                           int bit, int le, float w, const uint32_t* bitmaps, const uint32_t* prefixes,
                                           const int* offsets, int* recv_rows, int* row) {
  const int lane = lane_id();
  const bool per_rank = a.layout_kind == kPerRank;
  const size_t bw = a.c.layout.bitmap_words;
  *row = -1;
  bool first = true;
  if (per_rank) {
    *row = i < a.capacity ? i : -1;
    if (lane == 0) recv_rows[i] = *row;
    if (*row >= 0 && lane < shape.K) {
      a.out_topk_idx[(size_t(local) * a.capacity + *row) * shape.K + lane] = le;
      a.out_topk_weights[(size_t(local) * a.capacity + *row) * shape.K + lane] = w;
    }
    first = lane == 0;
  } else if (le >= 0) {
    const uint32_t below = (1u << bit) - 1u;
    const int slot = prefixes[(1 + le) * bw + word_idx] + __popc(bitmaps[(1 + le) * bw + word_idx] & below);
    if (a.layout_kind == kExpertMajor)
      *row = slot < a.capacity ? le * a.capacity + slot : -1;
    else
      *row = offsets[le] + slot < a.capacity ? offsets[le] + slot : -1;
  }
  if (!per_rank) {
    for (int k2 = 0; k2 < shape.K; ++k2) {
      const int other = __shfl_sync(kFullMask, le, k2);
      if (k2 < lane && other == le) first = false;
    }
    if (lane < shape.K) recv_rows[size_t(i) * shape.K + lane] = *row;
  }
  return first && *row >= 0 && (per_rank ? lane == 0 : lane < shape.K);
}

// The destination list of one token: lane j (< the returned count) gets the payload
// and scale addresses of output row `row` of the j-th lane that `writes`, through the
// warp's slots in shared memory. Warp-uniform (ballot).
__device__ __forceinline__ int gather_destinations(const HtDispatchArgs& a, bool writes, int row, uint8_t* out_x,
                                                   float* out_scales, size_t payload_bytes, int scale_cols,
                                                   uint8_t** warp_payload, float** warp_scales, uint8_t** my_payload,
                                                   float** my_scales) {
  const int lane = lane_id();
  const unsigned writers = __ballot_sync(kFullMask, writes);
  const int ndst = __popc(writers);
  if (writes) {
    const int pos = __popc(writers & lanemask_lt());
    warp_payload[pos] = out_x + size_t(row) * payload_bytes;
    warp_scales[pos] = a.fp8 ? out_scales + size_t(row) * scale_cols : nullptr;
  }
  __syncwarp();
  *my_payload = lane < ndst ? warp_payload[lane] : nullptr;
  *my_scales = lane < ndst ? warp_scales[lane] : nullptr;
  __syncwarp();
  return ndst;
}

// Copies token t of source src to the ndst destinations, reading it once: our own
// input row (quantised here for FP8), or the wire row the source sent (payload, then
// FP8 scales) with L1-bypassing loads. Warp-uniform.
__device__ __forceinline__ void copy_token(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r,
                                           const uint8_t* x, int src, int t, size_t payload_bytes, int scale_cols,
                                           uint8_t* my_payload, float* my_scales, int ndst) {
  if (src == r.rank) {
    const uint8_t* x_row = x + size_t(t) * shape.H * shape.esize;
    if (a.fp8)
      quantize_row_multi(x_row, a.dtype, shape.H, a.round_scale, my_payload, my_scales, ndst);
    else
      copy_row_any(x_row, false, payload_bytes, my_payload, ndst);
  } else {
    const uint8_t* wire = dispatch_row(a.c.layout, r.self, r.parity, src, t);
    copy_row_any(wire, true, payload_bytes, my_payload, ndst);
    if (a.fp8) copy_row_any(wire + shape.H, true, size_t(scale_cols) * 4, reinterpret_cast<uint8_t*>(my_scales), ndst);
  }
}

// The received tokens of rank r that block `block` owns: handle entries and rows.
__device__ __forceinline__ void copy_out(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r, int block,
                                         const int* totals, const int* offsets, uint8_t** warp_payload,
                                         float** warp_scales) {
  const CommContext& c = a.c;
  const int local = r.local, lane = lane_id(), warp = warp_id();
  const uint32_t* bitmaps = reinterpret_cast<const uint32_t*>(r.self + c.layout.bitmaps);
  const uint32_t* prefixes = reinterpret_cast<const uint32_t*>(r.self + c.layout.prefixes);
  const bool per_rank = a.layout_kind == kPerRank;

  const size_t RT = size_t(shape.R) * shape.T;
  const int kr = per_rank ? 1 : shape.K;
  int* recv_src = a.recv_src + local * RT;
  int* recv_topk_idx = a.recv_topk_idx + local * RT * shape.K;
  float* recv_weights = a.recv_weights + local * RT * shape.K;
  int* recv_rows = a.recv_rows + local * RT * kr;
  const size_t payload_bytes = a.fp8 ? size_t(shape.H) : size_t(shape.H) * shape.esize;
  const int scale_cols = shape.H / kFp8Group;
  uint8_t* out_x = static_cast<uint8_t*>(a.out_x) + size_t(local) * shape.rows_out * payload_bytes;
  float* out_scales = a.fp8 ? a.out_scales + size_t(local) * shape.rows_out * scale_cols : nullptr;
  const uint8_t* x = static_cast<const uint8_t*>(a.x) + size_t(local) * shape.T * shape.H * shape.esize;

  if (block == 0 && threadIdx.x == 0) write_counts(a, shape, local, totals, offsets);

  // one warp per candidate token (not per 32-token word: a word per warp leaves most
  // of the GPU idle); a token's list index is its word's prefix plus the bits before it
  for (int p = block * kHtWarps + warp; p < int(RT); p += c.copy_blocks * kHtWarps) {
    const int word_idx = p / 32, bit = p % 32;
    const uint32_t bits = bitmaps[word_idx];
    if (!((bits >> bit) & 1u)) continue;
    const int i = prefixes[word_idx] + __popc(bits & ((1u << bit) - 1u));
    const int src = p / shape.T, t = p % shape.T;
    const int e = lane < shape.K ? routing_id(a, shape, r, src, t, lane) : -1;
    const int le = local_id(e, r.rank, shape.E_loc);
    const float w = le >= 0 ? routing_weight(a, shape, r, src, t, lane) : 0.f;
    write_handle_entry(shape, i, p, le, w, recv_src, recv_topk_idx, recv_weights);
    int row;
    const bool writes =
        output_row(a, shape, local, i, word_idx, bit, le, w, bitmaps, prefixes, offsets, recv_rows, &row);
    uint8_t* my_payload;
    float* my_scales;
    const int ndst = gather_destinations(a, writes, row, out_x, out_scales, payload_bytes, scale_cols,
                                         warp_payload + warp * 32, warp_scales + warp * 32, &my_payload, &my_scales);
    if (ndst > 0) copy_token(a, shape, r, x, src, t, payload_bytes, scale_cols, my_payload, my_scales, ndst);
  }
}

// Handle entries past the n received tokens (-1, 0) and, for per_rank, the routing
// of the rows past the kept ones (masked): block `block`'s share.
__device__ __forceinline__ void pad_handle(const HtDispatchArgs& a, const Shape& shape, int local, int block, int n) {
  const CommContext& c = a.c;
  const bool per_rank = a.layout_kind == kPerRank;
  const size_t RT = size_t(shape.R) * shape.T;
  const int kr = per_rank ? 1 : shape.K;
  const int gthreads = c.copy_blocks * kHtThreads, gtid = block * kHtThreads + threadIdx.x;
  for (size_t i = size_t(n) + gtid; i < RT; i += gthreads) {
    a.recv_src[local * RT + i] = -1;
    for (int k = 0; k < shape.K; ++k) {
      a.recv_topk_idx[(local * RT + i) * shape.K + k] = -1;
      a.recv_weights[(local * RT + i) * shape.K + k] = 0.f;
    }
    for (int k = 0; k < kr; ++k) a.recv_rows[(local * RT + i) * kr + k] = -1;
  }
  if (per_rank) {
    const int gwarps = c.copy_blocks * kHtWarps, gwarp = block * kHtWarps + warp_id();
    for (int row = min(n, a.capacity) + gwarp; row < a.capacity; row += gwarps) {
      if (lane_id() < shape.K) {
        a.out_topk_idx[(size_t(local) * a.capacity + row) * shape.K + lane_id()] = -1;
        a.out_topk_weights[(size_t(local) * a.capacity + row) * shape.K + lane_id()] = 0.f;
      }
    }
  }
}

__global__ void __launch_bounds__(kHtThreads, 1) ht_dispatch_copy(HtDispatchArgs a) {
  if (returns_closed(a.c)) return;  // docs/protocol.md, "Ordering and lifetime"
  extern __shared__ int smem[];
  int* offsets = smem;  // [E_loc]
  uint8_t** warp_payload = reinterpret_cast<uint8_t**>(smem + ((a.num_experts / a.c.num_ranks + 1) & ~1));
  float** warp_scales = reinterpret_cast<float**>(warp_payload + kHtWarps * 32);
  const CommContext& c = a.c;
  const Shape shape = shape_of(a);
  const int local = blockIdx.x / c.copy_blocks, block = blockIdx.x % c.copy_blocks;
  const RankCtx r = rank_ctx(c, local, kHtDispatchSeq);
  if (__syncthreads_and(!aborted(c, r))) {  // block-uniform: expert_offsets has a barrier
    const int* totals = reinterpret_cast<const int*>(r.self + c.layout.totals);
    if (a.layout_kind != kPerRank) expert_offsets(a, shape, totals, offsets);
    copy_out(a, shape, r, block, totals, offsets, warp_payload, warp_scales);
    pad_handle(a, shape, local, block, totals[0]);
  }
  finish_op(c, r, kHtDispatchSeq, c.copy_blocks, a.order);
}

}  // namespace

cudaError_t prepare_ht_dispatch_kernels() {
  return load_kernels(ht_dispatch_send, ht_dispatch_bitmap, ht_dispatch_scan, ht_dispatch_copy);
}

cudaError_t launch_ht_dispatch_send(const HtDispatchArgs& a, cudaStream_t stream) {
  const CommContext& c = a.c;
  // one rank: the copy kernels read its tokens from x, and no peer waits for an arrival
  if (c.num_ranks == 1) return cudaSuccess;
  if (c.layout.sizes.num_nodes > 1) {
    // two hops: NVSHMEM to each destination node's relay, NVLink from there
    if (cudaError_t err = c.net->ht_dispatch_send(a, stream); err != cudaSuccess) return err;
    return launch_ht_dispatch_forward(a, stream);
  }
  ht_dispatch_send<<<c.num_local_ranks * c.send_blocks, kHtThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_ht_dispatch(const HtDispatchArgs& a, cudaStream_t stream) {
  const CommContext& c = a.c;
  const int L = c.num_local_ranks;
  const int e_loc = a.num_experts / c.num_ranks;
  const int num_buckets = a.layout_kind == kPerRank ? 1 : e_loc + 1;
  const size_t bitmap_smem = a.layout_kind == kPerRank ? 0 : size_t(kBitmapThreads / 32) * e_loc * 4;
  const size_t offsets_ints = size_t((e_loc + 1) & ~1);
  const size_t copy_smem = offsets_ints * 4 + size_t(kHtWarps) * 32 * 2 * sizeof(void*);
  if (cudaError_t err = launch_ht_dispatch_send(a, stream); err != cudaSuccess) return err;
  ht_dispatch_bitmap<<<L * c.copy_blocks, kBitmapThreads, bitmap_smem, stream>>>(a);
  const int num_words = int((size_t(c.num_ranks) * a.num_tokens + 31) / 32);
  ht_dispatch_scan<<<L * num_buckets, scan_threads(num_words), 0, stream>>>(a);
  ht_dispatch_copy<<<L * c.copy_blocks, kHtThreads, copy_smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep
