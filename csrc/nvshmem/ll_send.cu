// The low-latency send kernels built with NVSHMEM for groups spanning nodes: peers on
// this node are still written through their NVLink mappings; ranks on other nodes get
// puts from the staging regions, signals with NVSHMEM signal operations, and the
// buffer-reuse check reads their receive records remotely.
#include "common/load_kernels.h"
#include "low_latency/transport.cuh"
#include "nvshmem/device.cuh"
#include "nvshmem/kernels.h"

namespace jax_ep {

struct NvshmemNet {
  static constexpr bool kNet = true;
  __device__ static void put_warp(uint8_t* dst, const uint8_t* src, size_t bytes, int pe) {
    net_put_warp(dst, src, bytes, pe);
  }
  __device__ static void quiet() { net_quiet(); }
  __device__ static void signal_set(uint64_t* word, uint64_t value, int pe) { net_signal_set(word, value, pe); }
  __device__ static uint64_t get_u64(const uint64_t* word, int pe) { return net_get_u64(word, pe); }
};

}  // namespace jax_ep

#include "low_latency/combine_send.cuh"
#include "low_latency/dispatch_send.cuh"

namespace jax_ep {

cudaError_t prepare_ll_net_kernels() {
  return load_kernels(ll_dispatch_send<NvshmemNet>, ll_combine_send<NvshmemNet>);
}

cudaError_t launch_ll_net_dispatch_send(const LlDispatchSendArgs& a, cudaStream_t stream) {
  return launch_ll_dispatch_send_with<NvshmemNet>(a, stream);
}

cudaError_t launch_ll_net_combine_send(const LlCombineSendArgs& a, cudaStream_t stream) {
  return launch_ll_combine_send_with<NvshmemNet>(a, stream);
}

}  // namespace jax_ep
