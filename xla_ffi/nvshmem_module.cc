// The nanobind module jax_ep._jax_ep_nvshmem: the kernels that call NVSHMEM (built
// only where NVSHMEM's device library was found). Python initialises NVSHMEM with
// nvshmem4py, then calls init() here, then hands net_ops() to the main module's
// register_state for every group spanning nodes.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <stdexcept>

#include "nvshmem/kernels.h"

namespace nb = nanobind;

NB_MODULE(_jax_ep_nvshmem, m) {
  m.doc() = "jax_ep NVSHMEM kernels: the internode hops of dispatch/combine and the low-latency sends";
  m.def(
      "init",
      [] {
        const std::string err = jax_ep::init_net_module();
        if (!err.empty()) throw std::runtime_error("jax_ep: " + err);
      },
      "Registers this module's NVSHMEM device state (NVSHMEM must be initialised) and loads its kernels.");
  m.def(
      "net_ops", [] { return reinterpret_cast<uint64_t>(jax_ep::net_ops()); },
      "Address of the launcher table, for _jax_ep_cuda.register_state(net_ops=...).");
  m.attr("abi") = jax_ep::kNetOpsAbi;
}
