// Placing received tokens in the high-throughput dispatch's output layouts: the
// shape, the routing as the receiving rank sees it, the summary counts, the handle
// entries, the output rows and the copy of each token to them. Shared by the copy
// kernel (slots from the bitmaps and prefixes: high_throughput/dispatch.cu) and the
// one-launch dispatch of a group that runs whole in one launch (slots counted per run
// of candidates: high_throughput/dispatch_here.cu).
#pragma once

#include "common/rows.cuh"
#include "high_throughput/common.cuh"

namespace jax_ep {
namespace {

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
  shape.esize = dtype_bytes(a.dtype);
  shape.num_buckets = a.layout_kind == kPerRank ? 1 : shape.E_loc + 1;
  shape.rows_out = a.layout_kind == kExpertMajor ? shape.E_loc * a.capacity : a.capacity;
  return shape;
}

// Expert id of (source rank, token, k) as this rank sees it; -1 when masked or out of
// range (senders canonicalise their rows; a source in this launch is read from its
// routing operand, and each rank checks its own input: report_bad_ids).
__device__ inline int routing_id(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r, int src, int t, int k) {
  if (reads_operands(a.c, r.rank, src)) {
    int e = a.topk_idx[(size_t(src - a.c.first_rank) * shape.T + t) * shape.K + k];
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
  if (reads_operands(a.c, r.rank, src))
    return a.topk_weights ? a.topk_weights[(size_t(src - a.c.first_rank) * shape.T + t) * shape.K + k] : 0.f;
  const float* meta = reinterpret_cast<const float*>(dispatch_meta(a.c.layout, r.self, r.parity, src, t));
  return __ldcg(meta + shape.K + k);
}

__device__ inline int local_id(int e, int rank, int e_loc) {
  return e >= 0 && e / e_loc == rank ? e - rank * e_loc : -1;
}

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
// its expert (a repeated expert keeps the first k's copy). The expert layouts' row
// comes from `slot`, the token's place in its expert's bucket (this lane's; unused for
// per_rank). Warp-uniform (shuffles): the whole warp calls it for one token.
__device__ __forceinline__ bool output_row(const HtDispatchArgs& a, const Shape& shape, int local, int i, int le,
                                           float w, int slot, const int* offsets, int* recv_rows, int* row) {
  const int lane = lane_id();
  const bool per_rank = a.layout_kind == kPerRank;
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

// Copies token t of source src to the ndst destinations, reading it once: the source's
// input row when it is in this launch (quantised here for FP8), else the wire row it
// sent (payload, then FP8 scales) with L1-bypassing loads. Warp-uniform.
__device__ __forceinline__ void copy_token(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r, int src,
                                           int t, size_t payload_bytes, int scale_cols, uint8_t* my_payload,
                                           float* my_scales, int ndst) {
  if (reads_operands(a.c, r.rank, src)) {
    const size_t row_bytes = size_t(shape.H) * shape.esize;
    const uint8_t* x_row = static_cast<const uint8_t*>(a.x) + (size_t(src - a.c.first_rank) * shape.T + t) * row_bytes;
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

// Where one rank's copy-out writes: its slices of the handle and of the outputs.
struct RankOutputs {
  int* recv_src;
  int* recv_topk_idx;
  float* recv_weights;
  int* recv_rows;
  uint8_t* out_x;
  float* out_scales;
  size_t payload_bytes;
  int scale_cols;
};

__device__ __forceinline__ RankOutputs rank_outputs(const HtDispatchArgs& a, const Shape& shape, int local) {
  const size_t RT = size_t(shape.R) * shape.T;
  const int kr = a.layout_kind == kPerRank ? 1 : shape.K;
  RankOutputs o;
  o.recv_src = a.recv_src + local * RT;
  o.recv_topk_idx = a.recv_topk_idx + local * RT * shape.K;
  o.recv_weights = a.recv_weights + local * RT * shape.K;
  o.recv_rows = a.recv_rows + local * RT * kr;
  o.payload_bytes = a.fp8 ? size_t(shape.H) : size_t(shape.H) * shape.esize;
  o.scale_cols = shape.H / kFp8Group;
  o.out_x = static_cast<uint8_t*>(a.out_x) + size_t(local) * shape.rows_out * o.payload_bytes;
  o.out_scales = a.fp8 ? a.out_scales + size_t(local) * shape.rows_out * o.scale_cols : nullptr;
  return o;
}

// Received token i, candidate p = src * T + t, whose lane k chose local expert le (-1:
// none here) with `slot` in its bucket: the handle entry, the output rows, and the
// token copied to them with one read. Warp-uniform; `warp_payload` / `warp_scales`:
// the warp's 32 shared-memory slots for the destination list.
__device__ __forceinline__ void place_token(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r,
                                            const RankOutputs& o, int i, int p, int le, int slot, const int* offsets,
                                            uint8_t** warp_payload, float** warp_scales) {
  const int src = p / shape.T, t = p % shape.T;
  const float w = le >= 0 ? routing_weight(a, shape, r, src, t, lane_id()) : 0.f;
  write_handle_entry(shape, i, p, le, w, o.recv_src, o.recv_topk_idx, o.recv_weights);
  int row;
  const bool writes = output_row(a, shape, r.local, i, le, w, slot, offsets, o.recv_rows, &row);
  uint8_t* my_payload;
  float* my_scales;
  const int ndst = gather_destinations(a, writes, row, o.out_x, o.out_scales, o.payload_bytes, o.scale_cols,
                                       warp_payload, warp_scales, &my_payload, &my_scales);
  if (ndst > 0) copy_token(a, shape, r, src, t, o.payload_bytes, o.scale_cols, my_payload, my_scales, ndst);
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

}  // namespace
}  // namespace jax_ep
