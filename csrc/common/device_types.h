// Payload element types the kernels move and reduce (shared by host and device code).
#pragma once

namespace jax_ep {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

}  // namespace jax_ep
