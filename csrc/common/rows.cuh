// Warp-cooperative row movers shared by the high-throughput and low-latency kernels.
//
// A "destination list" is held one pointer per lane: lane j holds destination j
// (j < ndst <= 32). Every mover reads its source once and stores to all
// destinations, so a token that goes to several experts or ranks costs one read.
#pragma once

#include "common/device.cuh"

namespace jax_ep {

// Largest vector width (16, 8, 4 or 2 bytes) dividing a row's byte count; rows
// start at multiples of their size, so this keeps every access aligned.
__host__ __device__ inline int row_vector_bytes(size_t row_bytes) {
  if (row_bytes % 16 == 0) return 16;
  if (row_bytes % 8 == 0) return 8;
  if (row_bytes % 4 == 0) return 4;
  return 2;
}

// Peer-written data bypasses L1 (it may hold the line from an earlier call).
template <typename V>
__device__ __forceinline__ V load_vec(const uint8_t* ptr, bool from_peer) {
  return from_peer ? __ldcg(reinterpret_cast<const V*>(ptr)) : __ldg(reinterpret_cast<const V*>(ptr));
}

// Copies `bytes` from `src` to the ndst destinations (lane j holds destination j).
template <typename V>
__device__ inline void copy_row_multi(const uint8_t* src, bool from_peer, size_t bytes, uint8_t* my_dst, int ndst) {
  constexpr int kUnroll = 4;
  const size_t nvec = bytes / sizeof(V);
  const int lane = lane_id();
  for (size_t base = 0; base < nvec; base += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      size_t i = base + u * 32 + lane;
      if (i < nvec) v[u] = load_vec<V>(src + i * sizeof(V), from_peer);
    }
    for (int j = 0; j < ndst; ++j) {
      uint8_t* d = reinterpret_cast<uint8_t*>(__shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(my_dst), j));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        size_t i = base + u * 32 + lane;
        if (i < nvec) __stcs(reinterpret_cast<V*>(d + i * sizeof(V)), v[u]);  // streamed: written once
      }
    }
  }
}

__device__ inline void copy_row_any(const uint8_t* src, bool from_peer, size_t bytes, uint8_t* my_dst, int ndst) {
  switch (row_vector_bytes(bytes)) {
    case 16:
      copy_row_multi<int4>(src, from_peer, bytes, my_dst, ndst);
      break;
    case 8:
      copy_row_multi<int2>(src, from_peer, bytes, my_dst, ndst);
      break;
    case 4:
      copy_row_multi<int>(src, from_peer, bytes, my_dst, ndst);
      break;
    default:
      copy_row_multi<short>(src, from_peer, bytes, my_dst, ndst);
      break;
  }
}

// Quantises one input row (bf16/f16/f32, hidden % 128 == 0) to FP8 and stores the
// payload (hidden bytes) and scales (hidden / 128 floats) to every destination.
// Lane j holds destination j's payload and scale pointers. Each half warp owns one
// 128-channel group at a time: 16 lanes x 8 channels.
__device__ inline void quantize_row_multi(const uint8_t* x_row, int dtype, int hidden, bool round_scale,
                                          uint8_t* my_payload, float* my_scales, int ndst) {
  const int lane = lane_id(), half = lane >> 4, sub = lane & 15;
  const int num_groups = hidden / kFp8Group;
  const int esize = dtype == kF32 ? 4 : 2;
  for (int group0 = 0; group0 < num_groups; group0 += 2) {
    const int group = group0 + half;
    const bool active = group < num_groups;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (active) {
      const uint8_t* src = x_row + (size_t(group) * kFp8Group + sub * 8) * esize;
      int n = unpack16(ld_input16(src), dtype, v);
      if (n == 4) unpack16(ld_input16(src + 16), dtype, v + 4);
    }
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
    amax = half_warp_max(amax);
    float scale, inv;
    fp8_scales(amax, round_scale, &scale, &inv);
    const uint2 q = quantize8(v, inv);
    for (int j = 0; j < ndst; ++j) {
      uint8_t* pd = reinterpret_cast<uint8_t*>(__shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(my_payload), j));
      float* sd = reinterpret_cast<float*>(__shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(my_scales), j));
      if (active) {
        *reinterpret_cast<uint2*>(pd + size_t(group) * kFp8Group + sub * 8) = q;
        if (sub == 0) sd[group] = scale;
      }
    }
  }
}

// Zeroes `bytes` at `dst` with the warp (dst aligned to row_vector_bytes(bytes)).
__device__ inline void zero_row(uint8_t* dst, size_t bytes) {
  const int lane = lane_id();
  switch (row_vector_bytes(bytes)) {
    case 16:
      for (size_t i = lane; i < bytes / 16; i += 32) reinterpret_cast<int4*>(dst)[i] = make_int4(0, 0, 0, 0);
      break;
    case 8:
      for (size_t i = lane; i < bytes / 8; i += 32) reinterpret_cast<int2*>(dst)[i] = make_int2(0, 0);
      break;
    case 4:
      for (size_t i = lane; i < bytes / 4; i += 32) reinterpret_cast<int*>(dst)[i] = 0;
      break;
    default:
      for (size_t i = lane; i < bytes / 2; i += 32) reinterpret_cast<short*>(dst)[i] = 0;
  }
}

// One element of a row a peer wrote, bypassing L1.
__device__ __forceinline__ float load_peer_f32(const uint8_t* row, int dtype, int h) {
  if (dtype == kF32) return __int_as_float(__ldcg(reinterpret_cast<const int*>(row) + h));
  unsigned short u = __ldcg(reinterpret_cast<const unsigned short*>(row) + h);
  return dtype == kBF16 ? __bfloat162float(__ushort_as_bfloat16(u)) : __half2float(__ushort_as_half(u));
}

// Weighted row sum, the combine arithmetic shared by every combine kernel:
//   out = cast(Σ_j w_j * rows_j) in float32, j ascending, skipping null rows.
// Lane j (< n) holds row pointer j (null = absent) and weight j. `from_peer` marks
// rows peers wrote. No fused multiply-add, to match the reference bit for bit.
__device__ inline void weighted_sum_rows(const uint8_t* my_row, float my_w, int n, bool from_peer, int dtype,
                                         int hidden, uint8_t* out) {
  const int lane = lane_id();
  const int esize = dtype == kF32 ? 4 : 2;
  const size_t bytes = size_t(hidden) * esize;
  if (bytes % 16 == 0) {
    const int per = 16 / esize;
    // the loop bound is the same for every lane: the shuffles need the whole warp
    const size_t chunks = bytes / 16;
    for (size_t chunk0 = 0; chunk0 < chunks; chunk0 += 32) {
      const size_t chunk = chunk0 + lane;
      const bool active = chunk < chunks;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      // loads of kBatch rows in flight before the (ordered) accumulation
      constexpr int kBatch = 8;
      for (int j0 = 0; j0 < n; j0 += kBatch) {
        int4 raw[kBatch];
        float w[kBatch];
        bool has[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int j = j0 + u;
          const uint8_t* row =
              reinterpret_cast<const uint8_t*>(__shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(my_row), j & 31));
          w[u] = __shfl_sync(kFullMask, my_w, j & 31);
          has[u] = j < n && row != nullptr && active;
          if (has[u]) raw[u] = from_peer ? ld_peer16(row + chunk * 16) : ld_input16(row + chunk * 16);
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (!has[u]) continue;
          float v[8];
          unpack16(raw[u], dtype, v);
#pragma unroll
          for (int i = 0; i < 8; ++i)
            if (i < per) acc[i] = __fadd_rn(acc[i], __fmul_rn(w[u], v[i]));
        }
      }
      if (active) *reinterpret_cast<int4*>(out + chunk * 16) = pack16(acc, dtype);
    }
    return;
  }
  // odd sizes: one element per lane
  for (int h0 = 0; h0 < hidden; h0 += 32) {
    const int h = h0 + lane;
    float acc = 0.f;
    for (int j = 0; j < n; ++j) {
      const uint8_t* row =
          reinterpret_cast<const uint8_t*>(__shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(my_row), j));
      const float w = __shfl_sync(kFullMask, my_w, j);
      if (row == nullptr || h >= hidden) continue;
      float v = from_peer ? load_peer_f32(row, dtype, h) : to_f32(row, dtype, h);
      acc = __fadd_rn(acc, __fmul_rn(w, v));
    }
    if (h < hidden) from_f32(out, dtype, h, acc);
  }
}

}  // namespace jax_ep
