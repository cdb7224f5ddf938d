// High-throughput dispatch over NVLink peer memory (docs/protocol.md, "HT dispatch").
//
// Four launches per call, each serving all ranks of this launch (one rank, or all
// virtual ranks in loopback). When the whole group runs in this launch (EP=1, loopback:
// whole_group_here) nothing is sent, and where it measured faster the other three run
// as one launch (high_throughput/dispatch_here.cu: which kernel, and where).
//   send     push routing rows to every peer and token rows to their destination
//            ranks ([source][token] slots: no queues, no count exchange), then add
//            one to each peer's arrival word per block;
//   bitmap   wait for every peer, then mark per 32 received-token candidates which
//            tokens came here (bucket 0) and which local experts they chose (first,
//            before any wait: report expert ids out of range in our own routing);
//   scan     exclusive popcount prefix of every bucket's words;
//   copy     token-major copy-out: read each received token once (our own tokens,
//            and in a whole group here every source's, straight from x), write it
//            to its rows (one per rank, or one per distinct local expert), fill the
//            handle; then fill the handle entries past the received tokens (-1, 0)
//            and, for per_rank, the routing of rows past the kept ones. Output
//            rows past the valid ones are left as they are: nobody reads them (the
//            contract in jax_ep/reference.py), and a consumer that needs zeros
//            there masks them.
// Internode groups replace the send by two hops (high_throughput/relay_forward.cu), which fill
// the same slots and arrival words.
// Slot of (token, expert) = number of earlier received tokens that chose the expert,
// exactly the reference's order (jax_ep/reference.py).
#include "common/load_kernels.h"
#include "high_throughput/dispatch_rows.cuh"
#include "nvshmem/launchers.h"

namespace jax_ep {
namespace {

constexpr int kBitmapThreads = 256;
constexpr int kScanThreads = 1024;

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
  if (!whole_group_here(c) && !wait_all_peers(c, r, c.layout.ht_dispatch_arrival, target, kPhaseHtDispatchArrival))
    return;

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

// The received tokens of rank r that block `block` owns: handle entries and rows.
__device__ __forceinline__ void copy_out(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r, int block,
                                         const int* totals, const int* offsets, uint8_t** warp_payload,
                                         float** warp_scales) {
  const CommContext& c = a.c;
  const int lane = lane_id(), warp = warp_id();
  const uint32_t* bitmaps = reinterpret_cast<const uint32_t*>(r.self + c.layout.bitmaps);
  const uint32_t* prefixes = reinterpret_cast<const uint32_t*>(r.self + c.layout.prefixes);
  const size_t bw = c.layout.bitmap_words;
  const RankOutputs o = rank_outputs(a, shape, r.local);
  if (block == 0 && threadIdx.x == 0) write_counts(a, shape, r.local, totals, offsets);

  // one warp per candidate token (not per 32-token word: a word per warp leaves most
  // of the GPU idle); a token's list index is its word's prefix plus the bits before
  // it, and so is its slot in each expert's bucket
  const int RT = shape.R * shape.T;
  for (int p = block * kHtWarps + warp; p < RT; p += c.copy_blocks * kHtWarps) {
    const int word_idx = p / 32;
    const uint32_t bits = bitmaps[word_idx], below = (1u << (p % 32)) - 1u;
    if (!((bits >> (p % 32)) & 1u)) continue;
    const int i = prefixes[word_idx] + __popc(bits & below);
    const int e = lane < shape.K ? routing_id(a, shape, r, p / shape.T, p % shape.T, lane) : -1;
    const int le = local_id(e, r.rank, shape.E_loc);
    const int slot = le >= 0 && shape.num_buckets > 1
                         ? int(prefixes[(1 + le) * bw + word_idx]) + __popc(bitmaps[(1 + le) * bw + word_idx] & below)
                         : -1;
    place_token(a, shape, r, o, i, p, le, slot, offsets, warp_payload + warp * 32, warp_scales + warp * 32);
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
  // the whole group in this launch: the copy kernels read every source's tokens from its
  // operands, and no peer waits for an arrival
  if (whole_group_here(c)) return cudaSuccess;
  if (c.layout.sizes.num_nodes > 1) {
    // two hops: NVSHMEM to each destination node's relay, NVLink from there
    if (cudaError_t err = c.net->ht_dispatch_send(a, stream); err != cudaSuccess) return err;
    return launch_ht_dispatch_forward(a, stream);
  }
  ht_dispatch_send<<<c.num_local_ranks * c.send_blocks, kHtThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_ht_dispatch(const HtDispatchArgs& a, cudaStream_t stream) {
  if (cudaError_t err; launch_ht_dispatch_whole(a, stream, &err)) return err;
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
