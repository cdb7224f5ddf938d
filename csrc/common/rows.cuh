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

// Rows cut into units (one iteration of a row mover each), so several warps can share
// a row: the low-latency kernels' decode batches, and a high-throughput combine that
// received fewer tokens than it has warps.
constexpr int kSumUnitBytes = 32 * 16;  // weighted_sum_rows: 16 bytes per lane

// Units of a row; a row that is not a multiple of 16 bytes stays whole, so every
// piece keeps the vector width (and alignment) the movers pick for the whole row.
JAX_EP_HD inline int row_units(size_t bytes, int unit_bytes) {
  return bytes % 16 ? 1 : int((bytes + unit_bytes - 1) / unit_bytes);
}

struct ByteRange {
  size_t begin, end;
};

// Bytes of units [u0, u1) of a row of `units` units.
__device__ inline ByteRange unit_range(size_t bytes, int units, int unit_bytes, int u0, int u1) {
  if (units == 1) return {0, bytes};
  return {size_t(u0) * unit_bytes, min(bytes, size_t(u1) * unit_bytes)};
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
// Lane j holds destination j's payload and scale pointers. kLanes lanes own one
// 128-channel group at a time (128 / kLanes channels each), so a warp covers
// 32 / kLanes groups per step, and the loads of kSteps steps are issued before the
// first is used: the bytes in flight a memory-bound row mover needs.
//   default (8 lanes x 16 channels, 2 steps): 16-byte stores and 2 KiB of bf16 loads
//     in flight per warp, for whole rows (high-throughput kernels);
//   <16, 1>: 8 channels per lane, a warp per 256 channels, the low-latency kernels'
//     unit of work (kQuantUnitChannels).
// Per element the arithmetic is the same in both: scale from the group's amax, one
// multiply, a saturating round-to-nearest cast.
template <int kLanes = 8, int kSteps = 2>
__device__ inline void quantize_row_multi(const uint8_t* x_row, int dtype, int hidden, bool round_scale,
                                          uint8_t* my_payload, float* my_scales, int ndst) {
  static_assert(kLanes == 8 || kLanes == 16, "8 or 16 lanes per 128-channel group");
  constexpr int kChannels = kFp8Group / kLanes;  // per lane
  constexpr int kGroupsPerStep = 32 / kLanes;
  constexpr int kLoads = kChannels * 4 / 16;  // 16-byte loads per lane for f32 (half for 16-bit)
  const int lane = lane_id(), slot = lane / kLanes, sub = lane % kLanes;
  const int num_groups = hidden / kFp8Group;
  const bool f32 = dtype == kF32;
  const int esize = f32 ? 4 : 2, loads = f32 ? kLoads : kLoads / 2;
  for (int group0 = 0; group0 < num_groups; group0 += kGroupsPerStep * kSteps) {
    int4 raw[kSteps][kLoads];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int group = group0 + s * kGroupsPerStep + slot;
      const uint8_t* src = x_row + (size_t(group) * kFp8Group + sub * kChannels) * esize;
#pragma unroll
      for (int l = 0; l < kLoads; ++l)
        if (group < num_groups && l < loads) raw[s][l] = ld_input16(src + l * 16);
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int group = group0 + s * kGroupsPerStep + slot;
      const bool active = group < num_groups;
      float v[kChannels];
#pragma unroll
      for (int i = 0; i < kChannels; ++i) v[i] = 0.f;
      if (active) {
        if (f32) {
#pragma unroll
          for (int l = 0; l < kLoads; ++l) unpack16(raw[s][l], kF32, v + 4 * l);
        } else {
#pragma unroll
          for (int l = 0; l < kLoads / 2; ++l) unpack16(raw[s][l], dtype, v + 8 * l);
        }
      }
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < kChannels; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, o));
      float scale, inv;
      fp8_scales(amax, round_scale, &scale, &inv);
      const uint2 q0 = quantize8(v, inv);
      uint2 q1;
      if constexpr (kChannels == 16) q1 = quantize8(v + 8, inv);
      for (int j = 0; j < ndst; ++j) {
        uint8_t* pd = reinterpret_cast<uint8_t*>(__shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(my_payload), j));
        float* sd = reinterpret_cast<float*>(__shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(my_scales), j));
        if (active) {
          uint8_t* dst = pd + size_t(group) * kFp8Group + sub * kChannels;
          if constexpr (kChannels == 16)
            *reinterpret_cast<uint4*>(dst) = make_uint4(q0.x, q0.y, q1.x, q1.y);
          else
            *reinterpret_cast<uint2*>(dst) = q0;
          if (sub == 0) sd[group] = scale;
        }
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

// The 16-byte-vector body of weighted_sum_rows: kChunks chunks of 16 bytes per lane
// (one every 32 lanes) times kBatch rows of loads in flight before the (ordered)
// accumulation; a single row gets several chunks in flight instead of one.
template <int kChunks, int kBatch>
__device__ inline void weighted_sum_rows16(const uint8_t* my_row, float my_w, int n, bool from_peer, int dtype,
                                           size_t chunks, uint8_t* out) {
  const int lane = lane_id();
  const int per = dtype == kF32 ? 4 : 8;
  // the loop bounds are the same for every lane: the shuffles need the whole warp
  for (size_t chunk0 = 0; chunk0 < chunks; chunk0 += 32 * kChunks) {
    float acc[kChunks][8];
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[c][i] = 0.f;
    for (int j0 = 0; j0 < n; j0 += kBatch) {
      int4 raw[kChunks][kBatch];
      const uint8_t* rows[kBatch];
      float w[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int j = j0 + u;
        rows[u] = reinterpret_cast<const uint8_t*>(__shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(my_row), j & 31));
        w[u] = __shfl_sync(kFullMask, my_w, j & 31);
        if (j >= n) rows[u] = nullptr;
      }
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const size_t chunk = chunk0 + c * 32 + lane;
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
          if (rows[u] != nullptr && chunk < chunks)
            raw[c][u] = from_peer ? ld_peer16(rows[u] + chunk * 16) : ld_input16(rows[u] + chunk * 16);
      }
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const size_t chunk = chunk0 + c * 32 + lane;
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (rows[u] == nullptr || chunk >= chunks) continue;
          float v[8];
          unpack16(raw[c][u], dtype, v);
#pragma unroll
          for (int i = 0; i < 8; ++i)
            if (i < per) acc[c][i] = __fadd_rn(acc[c][i], __fmul_rn(w[u], v[i]));
        }
      }
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const size_t chunk = chunk0 + c * 32 + lane;
      if (chunk < chunks) *reinterpret_cast<int4*>(out + chunk * 16) = pack16(acc[c], dtype);
    }
  }
}

// Weighted row sum, the combine arithmetic shared by every combine kernel:
//   out = cast(Σ_j w_j * rows_j) in float32, j ascending, skipping null rows.
// Lane j (< n) holds row pointer j (null = absent) and weight j. `from_peer` marks
// rows peers wrote. No fused multiply-add, to match the reference bit for bit.
__device__ inline void weighted_sum_rows(const uint8_t* my_row, float my_w, int n, bool from_peer, int dtype,
                                         int hidden, uint8_t* out) {
  const int lane = lane_id();
  const int esize = dtype_bytes(dtype);
  const size_t bytes = size_t(hidden) * esize;
  if (bytes % 16 == 0) {
    // loads in flight per lane: up to 8 rows' chunk, or 4 chunks of a single row (per_rank's
    // combine: one row per token); n is warp-uniform
    if (n == 1)
      weighted_sum_rows16<4, 1>(my_row, my_w, n, from_peer, dtype, bytes / 16, out);
    else
      weighted_sum_rows16<1, 8>(my_row, my_w, n, from_peer, dtype, bytes / 16, out);
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
