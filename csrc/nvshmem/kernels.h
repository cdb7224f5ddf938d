// Launchers of the kernels that call NVSHMEM (the NVSHMEM module), and its setup.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "nvshmem/launchers.h"

namespace jax_ep {

cudaError_t launch_ht_net_dispatch_send(const HtDispatchArgs& args, cudaStream_t stream);
cudaError_t launch_ht_net_combine_relay(const HtCombineArgs& args, cudaStream_t stream);
cudaError_t launch_ll_net_dispatch_send(const LlDispatchSendArgs& args, cudaStream_t stream);
cudaError_t launch_ll_net_combine_send(const LlCombineSendArgs& args, cudaStream_t stream);
cudaError_t prepare_net_dispatch_kernels();
cudaError_t prepare_net_combine_kernels();
cudaError_t prepare_ll_net_kernels();

// Registers this module's NVSHMEM device state with an NVSHMEM already initialised in
// the process (nvshmem4py): without it, device calls here would see an empty state.
// Then loads the kernels on the current device. Returns "" or what failed.
std::string init_net_module();

// The launchers above, for the main module.
const NetOps* net_ops();

}  // namespace jax_ep
