// Launchers of the internode kernels that need no NVSHMEM calls (main module): the
// relay's NVLink forwarding of dispatched tokens. The NVSHMEM hops are in net_ops.h.
#pragma once

#include <cuda_runtime.h>

#include "intranode/params.h"

namespace jax_ep {

cudaError_t launch_ht_dispatch_forward(const HtDispatchArgs& args, cudaStream_t stream);
cudaError_t prepare_internode_kernels();

}  // namespace jax_ep
