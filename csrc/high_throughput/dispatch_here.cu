// High-throughput dispatch of a group that runs whole in one launch (EP=1, loopback:
// whole_group_here) as one kernel instead of three (bitmap, scan, copy;
// docs/protocol.md, "HT dispatch"). Every source's routing and rows are operands of
// the launch, so nothing is sent or waited for; what is left is numbering the received
// tokens and copying them. Each block takes a contiguous range of candidate tokens,
// each of its warps a run of them, in order:
//   count  per bucket (received; each local expert): the entries of each warp's run,
//          of the candidates before the block's, and in all;
//   place  each warp numbers its run in order from those counts (the same list
//          indices and expert slots as the bitmap's prefix plus bits) and copies
//          each token from x to its rows with place_token, as the copy kernel does.
// Two kernels differ in how a block learns the counts outside its range:
//   here   every block reads all R * T * K routing ids: no block waits for another
//          (no co-residency needed), but the count is latency-bound and grows with
//          the batch, so only a one-rank group's small batches take it;
//   wave   one wave of blocks (a cooperative launch), each counting its own range; the
//          counts are exchanged through the rank's bitmap region with one barrier of
//          the rank's blocks (per_rank) or two (the expert layouts).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/load_kernels.h"
#include "common/one_wave.h"
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

__device__ inline Runs runs_of(int num_candidates, int block, int blocks) {
  Runs runs;
  runs.p0 = int((long long)num_candidates * block / blocks);
  runs.p1 = int((long long)num_candidates * (block + 1) / blocks);
  runs.per_warp = max(1, (runs.p1 - runs.p0 + kHtWarps - 1) / kHtWarps);
  return runs;
}

// Calls add(p, bucket) once per (candidate p in [begin, end), bucket it counts in): a
// warp reads 32 / K whole candidates at a time, lane = (candidate, k). A candidate is
// received when one of its experts is local; an expert's bucket counts a candidate once
// (its first k choosing it: lanes of one candidate share a warp).
template <typename Add>
__device__ __forceinline__ void for_each_selection(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r,
                                                   int begin, int end, Add add) {
  const int K = shape.K, nb = shape.num_buckets;
  const int lane = lane_id(), per_warp = 32 / K, cand_in_warp = lane / K, k = lane - cand_in_warp * K;
  for (int first = begin + warp_id() * per_warp; first < end; first += kHtWarps * per_warp) {
    const int p = first + cand_in_warp;
    const bool in = cand_in_warp < per_warp && p < end;
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

// The run of candidate p in [runs.p0, runs.p1): its warp's counts in s.runs.
__device__ __forceinline__ int* run_counts(const Runs& runs, const HereSmem& s, int nb, int p) {
  return s.runs + (p - runs.p0) / runs.per_warp * nb;
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

// Once s.before and s.total hold the block's counts: each run's start (before + the
// earlier runs), the ragged offsets, block 0's summary counts, then every warp places
// its run and the block pads its share of the handle. `a.c.copy_blocks`: the rank's blocks.
__device__ __forceinline__ void place_block(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r, int block,
                                            const Runs& runs, const HereSmem& s) {
  const int nb = shape.num_buckets;
  for (int b = threadIdx.x; b < nb; b += kHtThreads) {
    int start = s.before[b];
    for (int w = 0; w < kHtWarps; ++w) {
      const int n = s.runs[w * nb + b];
      s.runs[w * nb + b] = start;
      start += n;
    }
  }
  if (nb > 1) expert_offsets(a, shape, s.total, s.offsets);  // (its barrier publishes the starts)
  __syncthreads();
  if (block == 0 && threadIdx.x == 0) write_counts(a, shape, r.local, s.total, s.offsets);
  place_run(a, shape, r, runs, s);
  pad_handle(a, shape, r.local, block, s.total[0]);
}

// Zeroes the block's counts (before, total, runs) and sets up its context.
__device__ __forceinline__ RankCtx start_block(const HtDispatchArgs& a, const Shape& shape, int* smem, int local) {
  for (int i = threadIdx.x; i < shape.num_buckets * (2 + kHtWarps); i += kHtThreads) smem[i] = 0;
  return rank_ctx(a.c, local, kHtDispatchSeq);
}

__global__ void __launch_bounds__(kHtThreads, 1) ht_dispatch_here(HtDispatchArgs a) {
  if (returns_closed(a.c)) return;  // docs/protocol.md, "Ordering and lifetime"
  extern __shared__ int smem[];
  const CommContext& c = a.c;
  const Shape shape = shape_of(a);
  const int nb = shape.num_buckets, RT = shape.R * shape.T;
  const int local = blockIdx.x / c.copy_blocks, block = blockIdx.x % c.copy_blocks;
  const HereSmem s = here_smem(smem, nb, shape.E_loc);
  const RankCtx r = start_block(a, shape, smem, local);
  const Runs runs = runs_of(RT, block, c.copy_blocks);
  report_bad_ids(a, shape, r, block, c.copy_blocks);  // as the bitmap kernel does
  if (__syncthreads_and(!aborted(c, r))) {            // block-uniform: the phases have barriers
    // every candidate of the group: those before the block's, its runs', and the totals
    for_each_selection(a, shape, r, 0, RT, [&](int p, int bucket) {
      atomicAdd(&s.total[bucket], 1);
      if (p < runs.p0)
        atomicAdd(&s.before[bucket], 1);
      else if (p < runs.p1)
        atomicAdd(&run_counts(runs, s, nb, p)[bucket], 1);
    });
    __syncthreads();
    place_block(a, shape, r, block, runs, s);
  }
  finish_op(c, r, kHtDispatchSeq, c.copy_blocks, a.order);
}

// ---------------------------------------------------------------------------
// one wave: every block counts only its own candidates
// ---------------------------------------------------------------------------

// Waits until all `blocks` blocks of rank r have got here (their earlier stores are
// visible to the blocks after it), as cooperative groups' grid sync does: the rank's
// last block to arrive (last_block, on the barrier's own arrivals counter, which it
// resets) releases the next round, which the others wait for. Bounded: a block that
// never comes (one that saw the group closed at its start while the others did not, a
// close() during the launch) ends in a timeout error naming the rank, and false in
// every thread.
__device__ inline bool rank_barrier(const CommContext& c, const RankCtx& r, int blocks) {
  __shared__ uint64_t round;
  __shared__ int ok;
  uint64_t* ctr = counters_of(c, r.self);
  // read before our arrival (last_block's fence orders it): the round cannot move on before
  if (threadIdx.x == 0) round = *reinterpret_cast<volatile uint64_t*>(ctr + kBarrierRound);
  const bool last = last_block(c, r, blocks, kBarrierArrived);
  if (blocks == 1) return true;  // the block barrier orders it all
  if (threadIdx.x == 0) {
    if (last) st_release(ctr + kBarrierRound, round + 1, false);
    ok = last || wait_geq(ctr + kBarrierRound, round + 1, r.rank, wait_ctx(c, r, kPhaseHtDispatchBarrier));
    __threadfence();
  }
  __syncthreads();
  return ok != 0;
}

// From the blocks' counts to s.before / s.total: each block stores its counts in the
// rank's bitmap region ([bucket][block]); after a barrier, one warp per bucket scans a
// bucket's counts over the blocks. With one bucket (per_rank) every block scans it for
// itself; otherwise block b % blocks scans bucket b into the prefix region and the
// totals, and after a second barrier each block reads its starts there.
__device__ inline bool exchange_counts(const HtDispatchArgs& a, const Shape& shape, const RankCtx& r, int block,
                                       int blocks, const HereSmem& s) {
  const CommContext& c = a.c;
  const int nb = shape.num_buckets, lane = lane_id();
  const size_t bw = c.layout.bitmap_words;  // >= blocks (launch_ht_dispatch_whole)
  int* counts = reinterpret_cast<int*>(r.self + c.layout.bitmaps);
  int* starts = reinterpret_cast<int*>(r.self + c.layout.prefixes);
  int* totals = reinterpret_cast<int*>(r.self + c.layout.totals);
  for (int b = threadIdx.x; b < nb; b += kHtThreads) {
    int n = 0;
    for (int w = 0; w < kHtWarps; ++w) n += s.runs[w * nb + b];
    counts[b * bw + block] = n;
  }
  if (!rank_barrier(c, r, blocks)) return false;
  const bool one = nb == 1;
  const int b0 = one ? warp_id() : block + warp_id() * blocks, step = one ? kHtWarps : kHtWarps * blocks;
  for (int b = b0; b < nb; b += step) {
    int run = 0;
    for (int j0 = 0; j0 < blocks; j0 += 32) {
      const int j = j0 + lane;
      const int n = j < blocks ? __ldcg(counts + b * bw + j) : 0;
      int chunk;
      const int before = run + warp_exclusive_scan(n, &chunk);
      if (one && j == block) s.before[0] = before;
      if (!one && j < blocks) starts[b * bw + j] = before;
      run += chunk;
    }
    if (lane == 0) (one ? s.total[0] : totals[b]) = run;
  }
  if (one) {
    __syncthreads();
    return true;
  }
  if (!rank_barrier(c, r, blocks)) return false;
  for (int b = threadIdx.x; b < nb; b += kHtThreads) {
    s.before[b] = __ldcg(starts + b * bw + block);
    s.total[b] = __ldcg(totals + b);
  }
  __syncthreads();
  return true;
}

// A cooperative launch of one wave (c.copy_blocks blocks per rank, all resident).
__global__ void __launch_bounds__(kHtThreads, 1) ht_dispatch_wave(HtDispatchArgs a) {
  if (returns_closed(a.c)) return;  // docs/protocol.md, "Ordering and lifetime"
  extern __shared__ int smem[];
  const CommContext& c = a.c;
  const Shape shape = shape_of(a);
  const int nb = shape.num_buckets;
  const int local = blockIdx.x / c.copy_blocks, block = blockIdx.x % c.copy_blocks;
  const HereSmem s = here_smem(smem, nb, shape.E_loc);
  const RankCtx r = start_block(a, shape, smem, local);
  const Runs runs = runs_of(shape.R * shape.T, block, c.copy_blocks);
  report_bad_ids(a, shape, r, block, c.copy_blocks);
  // every block takes part in the barriers, an aborted one with no counts
  const bool work = __syncthreads_and(!aborted(c, r));
  if (work)
    for_each_selection(a, shape, r, runs.p0, runs.p1,
                       [&](int p, int bucket) { atomicAdd(&run_counts(runs, s, nb, p)[bucket], 1); });
  __syncthreads();
  if (exchange_counts(a, shape, r, block, c.copy_blocks, s) && work) place_block(a, shape, r, block, runs, s);
  finish_op(c, r, kHtDispatchSeq, c.copy_blocks, a.order);
}

}  // namespace

cudaError_t prepare_ht_dispatch_here_kernels() {
  return load_kernels(ht_dispatch_here, ht_dispatch_wave);
}

// The dynamic shared memory of a launch for `a`'s layout and local experts.
static size_t here_smem_bytes(const HtDispatchArgs& a) {
  const int e_loc = a.num_experts / a.c.num_ranks;
  return here_smem_bytes(a.layout_kind == kPerRank ? 1 : e_loc + 1, e_loc);
}

// Whether a block of `Kernel` with `smem` bytes of dynamic shared memory fits the default
// 48 KB with the kernel's own (read once per kernel: the template is keyed on the kernel
// itself, as both kernels have one type). Then one block fits an SM: 512 threads of at
// most 128 registers (__launch_bounds__(kHtThreads, 1)).
template <auto Kernel>
static bool fits(size_t smem) {
  static const size_t own = [] {
    cudaFuncAttributes attr = {};
    return cudaFuncGetAttributes(&attr, Kernel) == cudaSuccess ? attr.sharedSizeBytes : size_t(48 * 1024);
  }();
  return smem + own <= 48 * 1024;
}

// Testing and benchmarking: JAX_EP_HT_DISPATCH_FORM=bitmap|here|wave forces a form (the
// bitmap form where the one asked for cannot run); the forms give identical results,
// this only picks the kernels. Any other value is reported once and ignored.
enum Form { kDefault, kBitmap, kHere, kWave };
static Form forced_form() {
  static const Form form = [] {
    const char* v = std::getenv("JAX_EP_HT_DISPATCH_FORM");
    if (!v) return kDefault;
    const std::string s(v);
    if (s == "bitmap") return kBitmap;
    if (s == "here") return kHere;
    if (s == "wave") return kWave;
    std::fprintf(stderr, "jax_ep: JAX_EP_HT_DISPATCH_FORM=%s ignored (bitmap, here or wave)\n", v);
    return kDefault;
  }();
  return form;
}

// The form where none is forced (on an H200, DeepSeek-V3 sizes, 4 dependent ops per
// program, BF16 / FP8 in us):
//   here    a one-rank group's batches up to kHereMaxEntries ids: 512 tokens, ragged
//           39 / 39, per_rank 17 / 22 (the bitmap form: 70 / 56, 24 / 29; the wave:
//           89 / 64, 26 / 38, with 16 blocks: see below);
//   bitmap  larger one-rank batches, where the wave measured no faster (4096 tokens,
//           bitmap form against wave: ragged 174 / 122 against 176 / 123, per_rank
//           49 / 49 against 51 / 48: what its count and barriers save, its copy-out,
//           whose warps take contiguous runs instead of interleaved tokens, loses
//           again), and would wait for every SM;
//   wave    loopback groups (2 ranks, 4096 tokens, one run per form: ragged 347 / 232
//           against 351 / 240 in the bitmap form, per_rank 130 / 137 against 147 /
//           139) whose buffer has a bitmap word (R * T_max / 32 of them) per block of
//           the wave: the blocks' counts live in the bitmap region (exchange_counts),
//           and a wave of fewer blocks copies slowly (the 512-token figures above).
static Form default_form(const HtDispatchArgs& a, int wave_blocks) {
  const long long ids = (long long)a.c.num_ranks * a.num_tokens * a.num_topk;
  if (a.c.num_ranks == 1) return ids <= kHereMaxEntries ? kHere : kBitmap;
  return wave_blocks <= int(a.c.layout.bitmap_words) ? kWave : kBitmap;
}

bool launch_ht_dispatch_whole(const HtDispatchArgs& a, cudaStream_t stream, cudaError_t* err) {
  *err = cudaSuccess;
  if (!whole_group_here(a.c)) return false;
  const size_t smem = here_smem_bytes(a);
  const int L = a.c.num_local_ranks;
  const int wave_blocks = std::min(a.c.copy_blocks, a.c.num_sms / L);  // every rank's blocks resident at once
  const Form form = forced_form() != kDefault ? forced_form() : default_form(a, wave_blocks);
  if (form == kHere && fits<ht_dispatch_here>(smem)) {
    ht_dispatch_here<<<L * a.c.copy_blocks, kHtThreads, smem, stream>>>(a);
    *err = cudaGetLastError();
    return true;
  }
  // at most one block per bitmap word (where the blocks' counts live: exchange_counts)
  const int blocks = std::min(wave_blocks, int(a.c.layout.bitmap_words));
  if (form != kWave || blocks < 1 || !fits<ht_dispatch_wave>(smem) || !a.c.cooperative) return false;
  HtDispatchArgs w = a;
  w.c.copy_blocks = blocks;
  *err = launch_one_wave(ht_dispatch_wave, L * blocks, kHtThreads, smem, stream, w);
  return true;
}

}  // namespace jax_ep
