// Payload element types the kernels move and reduce (shared by host and device code).
#pragma once

#ifdef __CUDACC__
#define JAX_EP_HD __host__ __device__
#else
#define JAX_EP_HD
#endif

namespace jax_ep {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Bytes of one element of `dtype`.
JAX_EP_HD constexpr int dtype_bytes(int dtype) {
  return dtype == kF32 ? 4 : 2;
}

}  // namespace jax_ep
