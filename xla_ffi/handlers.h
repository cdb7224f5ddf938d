// The table of FFI handlers the nanobind module hands to jax.ffi.register_ffi_target.
// Every op has a plain handler (command-buffer compatible) and a "_sync" twin that
// waits for its kernels and reports device-side errors at once (Config.sync_errors).
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace jax_ep::ffi_layer {

using HandlerTable = std::vector<std::pair<std::string, void*>>;

void add_layout_handlers(HandlerTable& table);
void add_high_throughput_handlers(HandlerTable& table);
void add_low_latency_handlers(HandlerTable& table);

}  // namespace jax_ep::ffi_layer
