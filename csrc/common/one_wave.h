// Launching a grid whose blocks wait for one another (the one-launch low-latency ops,
// the one-wave high-throughput dispatch).
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace jax_ep {

// A cooperative launch: the driver starts the grid only with every block resident
// (or fails the launch), so blocks that wait for other blocks of the grid cannot wait
// for one of them that never gets an SM (what else runs on the GPU: one_wave_blocks in
// low_latency/common.cuh). A grid of one block waits for no other: a plain launch.
template <typename... Params, typename... Args>
cudaError_t launch_one_wave(void (*kernel)(Params...), int grid, int threads, size_t smem, cudaStream_t stream,
                            Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = grid > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace jax_ep
