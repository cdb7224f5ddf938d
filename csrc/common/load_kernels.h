// Loading kernels on a device ahead of their first launch (runtime/runtime.h,
// preload_kernels, says why): every kernel family's prepare_* function uses this.
#pragma once

#include <cuda_runtime.h>

namespace jax_ep {

// Loads the module of each kernel on the current device (cudaFuncGetAttributes does),
// in order; returns the first error and loads nothing after it.
template <typename... Kernel>
cudaError_t load_kernels(Kernel*... kernels) {
  cudaFuncAttributes attr;
  cudaError_t err = cudaSuccess;
  ((err = err == cudaSuccess ? cudaFuncGetAttributes(&attr, kernels) : err), ...);
  return err;
}

}  // namespace jax_ep
