// Device helpers shared by every kernel family: memory-order primitives for
// cross-GPU flags, bounded waits, warp reductions, vector copies, FP8 casts.
// Kernels include this header; nothing here is copied into a kernel file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "common/buffer_layout.h"
#include "common/device_types.h"
#include "common/error_record.h"

namespace jax_ep {

// ---------------------------------------------------------------------------
// time and memory order
// ---------------------------------------------------------------------------

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* ptr) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(ptr) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint64_t* ptr, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

__device__ __forceinline__ void add_release_sys(uint64_t* ptr, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

// The same at the scope a group needs (CommContext::sys_scope): system scope when a
// peer is another GPU; GPU scope when every rank runs on this GPU (loopback, EP=1),
// where a system-scope release costs microseconds for nothing.
__device__ __forceinline__ uint64_t ld_acquire(const uint64_t* ptr, bool sys) {
  if (sys) return ld_acquire_sys(ptr);
  uint64_t v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(ptr) : "memory");
  return v;
}

// Two adjacent words (16-byte aligned) in one acquire load: an acquire load holds back
// the loads after it until it returns, so two of them would cost two round trips.
__device__ __forceinline__ void ld_acquire_pair(const uint64_t* ptr, bool sys, uint64_t& v0, uint64_t& v1) {
  if (sys)
    asm volatile("ld.acquire.sys.global.v2.u64 {%0, %1}, [%2];" : "=l"(v0), "=l"(v1) : "l"(ptr) : "memory");
  else
    asm volatile("ld.acquire.gpu.global.v2.u64 {%0, %1}, [%2];" : "=l"(v0), "=l"(v1) : "l"(ptr) : "memory");
}

__device__ __forceinline__ void st_release(uint64_t* ptr, uint64_t v, bool sys) {
  if (sys)
    st_release_sys(ptr, v);
  else
    asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

__device__ __forceinline__ void add_release(uint64_t* ptr, uint64_t v, bool sys) {
  if (sys)
    add_release_sys(ptr, v);
  else
    asm volatile("red.release.gpu.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

// *ptr = max(*ptr, v), published with release semantics: a record that only grows,
// written without reading it first (no round trip before the store leaves).
__device__ __forceinline__ void max_release(uint64_t* ptr, uint64_t v, bool sys) {
  if (sys)
    asm volatile("red.release.sys.global.max.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
  else
    asm volatile("red.release.gpu.global.max.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

__device__ __forceinline__ void fence(bool sys) {
  if (sys)
    __threadfence_system();
  else
    __threadfence();
}

// ---------------------------------------------------------------------------
// failure reporting and bounded waits (docs/protocol.md, "Failure reporting")
// ---------------------------------------------------------------------------

// Publishes an error: the first claimant fills the record, the code word last.
__device__ inline void record_error(const ErrorSink& sink, int code, int rank, int peer, int phase, long long expected,
                                    long long observed, long long waited) {
  if (atomicCAS(sink.claim, 0, 1) != 0) return;  // someone else reports
  volatile ErrorRecord* rec = sink.record;
  rec->rank = rank;
  rec->peer = peer;
  rec->phase = phase;
  rec->expected = expected;
  rec->observed = observed;
  rec->waited_ns = waited;
  __threadfence_system();
  rec->code = code;
  __threadfence_system();
}

struct WaitContext {
  ErrorSink err;
  uint64_t* abort_flag;  // this rank's private abort word: set on the first timeout
  uint64_t timeout_ns;
  int rank;
  int phase;
  bool sys;  // scope of the flag reads (see ld_acquire)
};

// Spins until the word `load()` returns is done: >= target, or (tagged) carrying
// `target` in its high 32 bits. Returns false (after recording who waited for whom)
// when the budget runs out or another block of this rank already gave up. `load` is
// a local acquire load, or a remote read of a peer on another node.
template <typename Load>
__device__ inline bool wait_word(Load load, uint64_t target, bool tagged, int peer, const WaitContext& ctx,
                                 uint64_t* value) {
  const auto done = [&](uint64_t seen) { return tagged ? uint32_t(seen >> 32) == uint32_t(target) : seen >= target; };
  uint64_t seen = load();
  if (done(seen)) {
    *value = seen;
    return true;
  }
  const uint64_t start = global_timer_ns();
  while (true) {
    seen = load();
    if (done(seen)) {
      *value = seen;
      return true;
    }
    if (*(volatile uint64_t*)ctx.abort_flag) return false;
    uint64_t waited = global_timer_ns() - start;
    if (waited > ctx.timeout_ns) {
      record_error(ctx.err, kErrTimeout, ctx.rank, peer, ctx.phase, (long long)target,
                   (long long)(tagged ? seen >> 32 : seen), (long long)waited);
      atomicExch((unsigned long long*)ctx.abort_flag, 1ull);
      return false;
    }
    __nanosleep(64);
  }
}

// Spins until *word >= target (see wait_word).
__device__ inline bool wait_geq(const uint64_t* word, uint64_t target, int peer, const WaitContext& ctx) {
  uint64_t seen;
  return wait_word([&] { return ld_acquire(word, ctx.sys); }, target, false, peer, ctx, &seen);
}

// Same, for a word that must carry tag `tag` in its high 32 bits.
__device__ inline bool wait_tag(const uint64_t* word, uint32_t tag, int peer, const WaitContext& ctx, uint64_t* value) {
  return wait_word([&] { return ld_acquire(word, ctx.sys); }, tag, true, peer, ctx, value);
}

// ---------------------------------------------------------------------------
// warp helpers
// ---------------------------------------------------------------------------

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int lane_id() {
  return threadIdx.x & 31;
}
__device__ __forceinline__ int warp_id() {
  return threadIdx.x >> 5;
}
__device__ __forceinline__ unsigned lanemask_lt() {
  return (1u << lane_id()) - 1u;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Exclusive prefix sum across the warp.
__device__ __forceinline__ int warp_exclusive_scan(int v, int* total) {
  int incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    int n = __shfl_up_sync(kFullMask, incl, o);
    if (lane_id() >= o) incl += n;
  }
  *total = __shfl_sync(kFullMask, incl, 31);
  return incl - v;
}

// ---------------------------------------------------------------------------
// element conversion
// ---------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(const void* ptr, int dtype, size_t i) {
  switch (dtype) {
    case kBF16:
      return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(ptr)[i]);
    case kF16:
      return __half2float(reinterpret_cast<const __half*>(ptr)[i]);
    default:
      return reinterpret_cast<const float*>(ptr)[i];
  }
}

__device__ __forceinline__ void from_f32(void* ptr, int dtype, size_t i, float v) {
  switch (dtype) {
    case kBF16:
      reinterpret_cast<__nv_bfloat16*>(ptr)[i] = __float2bfloat16_rn(v);
      break;
    case kF16:
      reinterpret_cast<__half*>(ptr)[i] = __float2half_rn(v);
      break;
    default:
      reinterpret_cast<float*>(ptr)[i] = v;
  }
}

// Loads 16 bytes from an input buffer XLA owns (read-only for the kernel's life).
__device__ __forceinline__ int4 ld_input16(const void* ptr) {
  return __ldg(reinterpret_cast<const int4*>(ptr));
}

// Loads 16 bytes a peer wrote into our buffer: bypass L1, which may hold the line
// from an earlier call.
__device__ __forceinline__ int4 ld_peer16(const void* ptr) {
  return __ldcg(reinterpret_cast<const int4*>(ptr));
}

// Unpacks 16 bytes of `dtype` elements to floats (8 for 16-bit types, 4 for f32).
__device__ __forceinline__ int unpack16(int4 v, int dtype, float* out) {
  if (dtype == kF32) {
    out[0] = __int_as_float(v.x);
    out[1] = __int_as_float(v.y);
    out[2] = __int_as_float(v.z);
    out[3] = __int_as_float(v.w);
    return 4;
  }
  const uint32_t words[4] = {uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w)};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint16_t lo = words[j] & 0xffff, hi = words[j] >> 16;
    if (dtype == kBF16) {
      out[2 * j] = __bfloat162float(__ushort_as_bfloat16(lo));
      out[2 * j + 1] = __bfloat162float(__ushort_as_bfloat16(hi));
    } else {
      out[2 * j] = __half2float(__ushort_as_half(lo));
      out[2 * j + 1] = __half2float(__ushort_as_half(hi));
    }
  }
  return 8;
}

// Packs floats into 16 bytes of `dtype` (round to nearest even).
__device__ __forceinline__ int4 pack16(const float* in, int dtype) {
  if (dtype == kF32)
    return make_int4(__float_as_int(in[0]), __float_as_int(in[1]), __float_as_int(in[2]), __float_as_int(in[3]));
  uint32_t words[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (dtype == kBF16) {
      lo = __bfloat16_as_ushort(__float2bfloat16_rn(in[2 * j]));
      hi = __bfloat16_as_ushort(__float2bfloat16_rn(in[2 * j + 1]));
    } else {
      lo = __half_as_ushort(__float2half_rn(in[2 * j]));
      hi = __half_as_ushort(__float2half_rn(in[2 * j + 1]));
    }
    words[j] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  return make_int4(int(words[0]), int(words[1]), int(words[2]), int(words[3]));
}

// ---------------------------------------------------------------------------
// FP8 (jax_ep/fp8.py is the definition)
// ---------------------------------------------------------------------------

constexpr float kFp8Max = 448.0f;
constexpr float kFp8InvMax = 1.0f / 448.0f;  // the reference multiplies by this rounded reciprocal
constexpr float kAmaxFloor = 1e-4f;

// Smallest power of two >= v (v positive and normal): from the float's bits.
__device__ __forceinline__ float pow2_ceil(float v) {
  uint32_t bits = __float_as_uint(v);
  uint32_t exponent = bits & 0x7F800000u;
  if (bits & 0x007FFFFFu) exponent += 0x00800000u;
  return __uint_as_float(exponent);
}

// Scale (dequantisation multiplier) and its inverse for a group's amax.
__device__ __forceinline__ void fp8_scales(float amax, bool round_scale, float* scale, float* inv) {
  amax = fmaxf(amax, kAmaxFloor);
  if (round_scale) {
    *scale = pow2_ceil(__fmul_rn(amax, kFp8InvMax));
    *inv = __fdiv_rn(1.0f, *scale);
  } else {
    *scale = __fmul_rn(amax, kFp8InvMax);
    *inv = __fdiv_rn(kFp8Max, amax);
  }
}

// Quantises 8 floats with `inv`, saturating, round to nearest even: 8 bytes.
__device__ __forceinline__ uint2 quantize8(const float* v, float inv) {
  uint32_t words[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    float2 v01 = make_float2(__fmul_rn(v[4 * j], inv), __fmul_rn(v[4 * j + 1], inv));
    float2 v23 = make_float2(__fmul_rn(v[4 * j + 2], inv), __fmul_rn(v[4 * j + 3], inv));
    uint32_t q01 = __nv_cvt_float2_to_fp8x2(v01, __NV_SATFINITE, __NV_E4M3);
    uint32_t q23 = __nv_cvt_float2_to_fp8x2(v23, __NV_SATFINITE, __NV_E4M3);
    words[j] = (q01 & 0xffff) | (q23 << 16);
  }
  return make_uint2(words[0], words[1]);
}

}  // namespace jax_ep
