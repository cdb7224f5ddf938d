// The table of FFI handlers the nanobind module hands to jax.ffi.register_ffi_target,
// and how a group op's handlers are defined. Every op has a plain handler (command-
// buffer compatible) and a "_sync" twin that waits for its kernels and reports
// device-side errors at once (Config.sync_errors). Group ops also have an
// instantiate stage (bind the executable to its group) and an initialize stage
// (refuse a closed group before every execution): xla_ffi/ffi_common.h.
#pragma once

#include <string>
#include <vector>

#include "xla_ffi/ffi_common.h"

namespace jax_ep::ffi_layer {

struct Registration {
  std::string name;  // FFI target
  void* execute = nullptr;
  void* instantiate = nullptr;  // null for ops without a group
  void* initialize = nullptr;
};
using HandlerTable = std::vector<Registration>;

// The execute binding every group op starts with: stream, device, the executable's
// group (ffi::State) and the op's attributes as one struct.
template <typename Attrs>
auto group_op_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Ctx<ffi::State<ExecState>>()
      .template Attrs<Attrs>();
}

// Defines NAME (command-buffer compatible) and NAME##Sync from the template FN<bool sync>.
#define JAX_EP_DEFINE_OP_HANDLERS(NAME, FN, BINDING)                                            \
  XLA_FFI_DEFINE_HANDLER(NAME, FN<false>, BINDING, {::xla::ffi::Traits::kCmdBufferCompatible}); \
  XLA_FFI_DEFINE_HANDLER(NAME##Sync, FN<true>, BINDING)

// Adds "jax_ep_<op>" and "jax_ep_<op>_sync" with the group stages.
void add_group_op(HandlerTable& table, const std::string& op, XLA_FFI_Handler* plain, XLA_FFI_Handler* sync);

void add_layout_handlers(HandlerTable& table);
void add_high_throughput_handlers(HandlerTable& table);
void add_low_latency_handlers(HandlerTable& table);

}  // namespace jax_ep::ffi_layer
