// High-throughput dispatch of a one-rank group (EP=1) with a small batch in one launch
// instead of three (bitmap, scan, copy; docs/protocol.md, "HT dispatch"). Its routing
// and rows are operands of the launch (a group that runs whole here: whole_group_here),
// so nothing is sent or waited for, and the numbering the bitmap and scan kernels
// compute grid-wide each block computes for itself:
//   count  every block reads the routing of every candidate token (R * T * K ids)
//          and counts, per bucket (received; each local expert), the entries before
//          its own candidates and the totals, and per warp the entries of the run
//          of its candidates that warp will copy;
//   place  each warp numbers its run in order from those counts (the same list
//          indices and expert slots as the bitmap's prefix plus bits) and copies
//          each token from x to its rows with place_token, as the copy kernel does.
// No block waits for another, so the launch needs no co-residency (not cooperative).
// Every block repeats the count, so it pays only for small batches (kHereMaxEntries);
// the code serves any whole group, but loopback groups measured slower with it.
#include "common/load_kernels.h"
#include "high_throughput/dispatch_rows.cuh"

namespace jax_ep {
namespace {

// Shared memory of one block (ints, then the destination lists' pointers):
//   before[nb], total[nb]   bucket entries before the block's candidates, in all
//   runs[kHtWarps][nb]      per warp: its run's entries, then (scanned) its run's start
//   offsets[E_loc]          ragged offsets of the local experts (expert layouts;
//                           an even count: the pointers after it stay 8-byte aligned)
struct HereSmem {
  int *before, *total, *runs, *offsets;
  uint8_t** warp_payload;
  float** warp_scales;
};

// Routing ids a block counts at most (R * T * K). Every block reads them all, one
// dependent load per warp step, and adds each (candidate, distinct expert) with a
// shared-memory atomic, so the count grows with blocks x ids and is latency-bound. On
// an H200 at EP=1 (8 ids per token, DeepSeek-V3 sizes) it paid at 1024 tokens (8 K
// ids): dispatch 65 / 22 us (ragged / per_rank) against 74 / 30 in the bitmap form;
// at 4096 tokens per_rank took 101 us per op against 53 (with a count per warp, which
// was no faster), and in loopback (2 and 4 ranks, every rank's blocks counting every rank's
// ids) it lost to the bitmap form too: only a one-rank group of at most 8 K ids (the
// sizes measured) takes it.
constexpr long long kHereMaxEntries = 8 * 1024;

JAX_EP_HD inline size_t here_smem_ints(int num_buckets, int e_loc) {
  return size_t(num_buckets) * (2 + kHtWarps) + (num_buckets > 1 ? size_t((e_loc + 1) & ~1) : 0);
}

JAX_EP_HD inline size_t here_smem_bytes(int num_buckets, int e_loc) {
  return here_smem_ints(num_buckets, e_loc) * sizeof(int) + size_t(kHtWarps) * 32 * 2 * sizeof(void*);
}

__device__ inline HereSmem here_smem(int* smem, int nb, int e_loc) {
  HereSmem s;
  s.before = smem;
  s.total = smem + nb;
  s.runs = smem + 2 * nb;
  s.offsets = s.runs + kHtWarps * nb;
  s.warp_payload = reinterpret_cast<uint8_t**>(smem + here_smem_ints(nb, e_loc));
  s.warp_scales = reinterpret_cast<float**>(s.warp_payload + kHtWarps * 32);
  return s;
}

// The block's candidates [p0, p1) in runs of `per_warp`, one per warp, in order.
struct Runs {
  int p0, p1, per_warp;
};

// count: warp = 32 / K whole candidates, lane = (candidate, k), over all R * T of them.
// A candidate is received when one of its experts is local; an expert's bucket counts
// a candidate once (its first k choosing it: lanes of one candidate share a warp).
__device__ __forceinline__ void count_candidates(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r,
                                                 const Runs& runs, const HereSmem& s) {
  const int K = shape.K, nb = shape.num_buckets, RT = shape.R * shape.T;
  const int lane = lane_id(), per_warp = 32 / K, cand_in_warp = lane / K, k = lane - cand_in_warp * K;
  const auto add = [&](int p, int bucket) {
    atomicAdd(&s.total[bucket], 1);
    if (p < runs.p0)
      atomicAdd(&s.before[bucket], 1);
    else if (p < runs.p1)
      atomicAdd(&s.runs[(p - runs.p0) / runs.per_warp * nb + bucket], 1);
  };
  for (int first = warp_id() * per_warp; first < RT; first += kHtWarps * per_warp) {
    const int p = first + cand_in_warp;
    const bool in = cand_in_warp < per_warp && p < RT;
    const int e = in ? __ldg(a.topk_idx + size_t(p) * K + k) : -1;  // [R, T, K]: the whole group's routing
    const bool valid = e >= 0 && e < shape.E;
    const int le = valid ? local_id(e, r.rank, shape.E_loc) : -1;
    const unsigned here = __ballot_sync(kFullMask, le >= 0);
    const unsigned mask_of_k = K == 32 ? kFullMask : (1u << K) - 1u;
    if (in && k == 0 && ((here >> (cand_in_warp * K)) & mask_of_k)) add(p, 0);
    if (nb > 1) {
      const unsigned same = __match_any_sync(kFullMask, le >= 0 ? (cand_in_warp << 16) | le : -1 - lane);
      if (le >= 0 && (same & lanemask_lt()) == 0) add(p, 1 + le);
    }
  }
}

// place: warp `warp`'s run, in candidate order, from its start in s.runs.
__device__ __forceinline__ void place_run(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r,
                                          const Runs& runs, const HereSmem& s) {
  const int lane = lane_id(), warp = warp_id(), nb = shape.num_buckets;
  int* next = s.runs + warp * nb;  // the next list index (bucket 0) and slot of each local expert
  const RankOutputs o = rank_outputs(a, shape, r.local);
  const int q0 = runs.p0 + warp * runs.per_warp, q1 = min(runs.p1, q0 + runs.per_warp);
  for (int p = q0; p < q1; ++p) {
    const int e = lane < shape.K ? routing_id(a, shape, r, p / shape.T, p % shape.T, lane) : -1;
    const int le = local_id(e, r.rank, shape.E_loc);
    if (__ballot_sync(kFullMask, le >= 0) == 0) continue;  // not received here
    const int i = next[0];
    int slot = -1;
    if (nb > 1) {  // the first k choosing an expert takes its next slot; a repeat shares it
      const unsigned same = __match_any_sync(kFullMask, le >= 0 ? le : -1 - lane);
      const int first = __ffs(same) - 1;
      slot = __shfl_sync(kFullMask, le >= 0 ? next[1 + le] : -1, first);
      __syncwarp();
      if (le >= 0 && lane == first) next[1 + le] = slot + 1;
    }
    __syncwarp();
    if (lane == 0) next[0] = i + 1;
    __syncwarp();
    place_token(a, shape, r, o, i, p, le, slot, s.offsets, s.warp_payload + warp * 32, s.warp_scales + warp * 32);
  }
}

__global__ void __launch_bounds__(kHtThreads, 1) ht_dispatch_here(HtDispatchArgs a) {
  if (returns_closed(a.c)) return;  // docs/protocol.md, "Ordering and lifetime"
  extern __shared__ int smem[];
  const CommContext& c = a.c;
  const Shape shape = shape_of(a);
  const int nb = shape.num_buckets, RT = shape.R * shape.T;
  const int local = blockIdx.x / c.copy_blocks, block = blockIdx.x % c.copy_blocks;
  const HereSmem s = here_smem(smem, nb, shape.E_loc);
  for (int i = threadIdx.x; i < nb * (2 + kHtWarps); i += kHtThreads) smem[i] = 0;
  const RankCtx r = rank_ctx(c, local, kHtDispatchSeq);
  Runs runs;
  runs.p0 = int((long long)RT * block / c.copy_blocks);
  runs.p1 = int((long long)RT * (block + 1) / c.copy_blocks);
  runs.per_warp = max(1, (runs.p1 - runs.p0 + kHtWarps - 1) / kHtWarps);
  report_bad_ids(a, shape, r, block, c.copy_blocks);  // as the bitmap kernel does
  if (__syncthreads_and(!aborted(c, r))) {            // block-uniform: the phases have barriers
    count_candidates(a, shape, r, runs, s);
    __syncthreads();
    for (int b = threadIdx.x; b < nb; b += kHtThreads) {  // each run's start: before + earlier runs
      int start = s.before[b];
      for (int w = 0; w < kHtWarps; ++w) {
        const int n = s.runs[w * nb + b];
        s.runs[w * nb + b] = start;
        start += n;
      }
    }
    if (nb > 1) expert_offsets(a, shape, s.total, s.offsets);  // (its barrier publishes the starts)
    __syncthreads();
    if (block == 0 && threadIdx.x == 0) write_counts(a, shape, local, s.total, s.offsets);
    place_run(a, shape, r, runs, s);
    pad_handle(a, shape, local, block, s.total[0]);
  }
  finish_op(c, r, kHtDispatchSeq, c.copy_blocks, a.order);
}

}  // namespace

cudaError_t prepare_ht_dispatch_here_kernels() {
  return load_kernels(ht_dispatch_here);
}

// The dynamic shared memory of a launch for `a`'s layout and local experts.
static size_t here_smem_bytes(const HtDispatchArgs& a) {
  const int e_loc = a.num_experts / a.c.num_ranks;
  return here_smem_bytes(a.layout_kind == kPerRank ? 1 : e_loc + 1, e_loc);
}

// Where the one launch applies: a group of one rank, few routing ids, and a block's
// shared memory (dynamic, plus the kernel's own) within the default 48 KB.
bool ht_dispatch_here_applies(const HtDispatchArgs& a) {
  static const size_t static_smem = [] {
    cudaFuncAttributes attr = {};
    return cudaFuncGetAttributes(&attr, ht_dispatch_here) == cudaSuccess ? attr.sharedSizeBytes : size_t(48 * 1024);
  }();
  const long long ids = (long long)a.c.num_ranks * a.num_tokens * a.num_topk;
  const size_t smem = here_smem_bytes(a);
  return whole_group_here(a.c) && a.c.num_ranks == 1 && ids <= kHereMaxEntries && smem + static_smem <= 48 * 1024;
}

cudaError_t launch_ht_dispatch_here(const HtDispatchArgs& a, cudaStream_t stream) {
  ht_dispatch_here<<<a.c.num_local_ranks * a.c.copy_blocks, kHtThreads, here_smem_bytes(a), stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep
