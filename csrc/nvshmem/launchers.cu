// The NVSHMEM module's setup and its launcher table (nvshmem/launchers.h).
#include <nvshmem.h>
#include <nvshmemx.h>

#include "nvshmem/kernels.h"

namespace jax_ep {

std::string init_net_module() {
  if (nvshmemx_init_status() < NVSHMEM_STATUS_IS_INITIALIZED)
    return "NVSHMEM is not initialised in this process (initialise it with nvshmem4py first)";
  // Already initialised, NVSHMEM skips the bootstrap and copies its device state into
  // every device library that registers; this is that registration for this module.
  // (The header's nvshmemx_init_attr would exit the process on failure.)
  int provided = 0;
  const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
  if (int status = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, 0, nullptr, version); status != 0)
    return "registering the NVSHMEM device state failed (status " + std::to_string(status) +
           "): are nvshmem4py and jax_ep built against the same NVSHMEM major version?";
  cudaError_t err = prepare_net_dispatch_kernels();
  if (err == cudaSuccess) err = prepare_net_combine_kernels();
  if (err == cudaSuccess) err = prepare_ll_net_kernels();
  if (err != cudaSuccess) return std::string("loading the NVSHMEM kernels failed: ") + cudaGetErrorString(err);
  return "";
}

const NetOps* net_ops() {
  static const NetOps ops = [] {
    NetOps o;
    o.ht_dispatch_send = launch_ht_net_dispatch_send;
    o.ht_combine_relay = launch_ht_net_combine_relay;
    o.ll_dispatch_send = launch_ll_net_dispatch_send;
    o.ll_combine_send = launch_ll_net_combine_send;
    return o;
  }();
  return &ops;
}

}  // namespace jax_ep
