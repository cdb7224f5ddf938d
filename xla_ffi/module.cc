// The nanobind module jax_ep._jax_ep_cuda: hands the FFI handlers (and the type of
// their per-executable state) to Python as capsules and exposes the runtime's group
// and buffer management (csrc/runtime).
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <utility>

#include "high_throughput/params.h"
#include "runtime/runtime.h"
#include "xla_ffi/handlers.h"

namespace nb = nanobind;
using namespace jax_ep;

namespace {

// The BufferSizes fields by name: Python's sizes dict must hold exactly these.
constexpr std::pair<const char*, int BufferSizes::*> kSizeFields[] = {
    {"num_ranks", &BufferSizes::num_ranks},
    {"max_tokens", &BufferSizes::max_tokens},
    {"ll_max_tokens", &BufferSizes::ll_max_tokens},
    {"hidden", &BufferSizes::hidden},
    {"elem_bytes", &BufferSizes::elem_bytes},
    {"num_topk", &BufferSizes::num_topk},
    {"num_local_experts", &BufferSizes::num_local_experts},
    {"low_latency", &BufferSizes::low_latency},
    {"num_nodes", &BufferSizes::num_nodes},
};

BufferSizes sizes_from(const nb::dict& py_sizes) {
  if (nb::len(py_sizes) != std::size(kSizeFields))
    throw std::invalid_argument("jax_ep: sizes must name exactly the fields of size_fields()");
  BufferSizes sizes;
  for (const auto& [name, field] : kSizeFields) {
    if (!py_sizes.contains(name)) throw std::invalid_argument(std::string("jax_ep: sizes lacks '") + name + "'");
    sizes.*field = nb::cast<int>(py_sizes[name]);
  }
  return sizes;
}

std::shared_ptr<GroupControl> live_group(const std::string& key) {
  auto group = find_group(key);
  if (!group) throw std::invalid_argument("jax_ep: no live group '" + key + "' in this process");
  return group;
}

DeviceState* state_of(const std::string& key, int device) {
  DeviceState* state = live_group(key)->on(device);
  if (!state)
    throw std::invalid_argument("jax_ep: group '" + key + "' has no state on device " + std::to_string(device));
  return state;
}

}  // namespace

NB_MODULE(_jax_ep_cuda, m) {
  m.doc() = "jax_ep CUDA kernels: XLA FFI handlers and communication buffers";

  m.def(
      "registrations",
      [] {
        ffi_layer::HandlerTable table;
        ffi_layer::add_layout_handlers(table);
        ffi_layer::add_high_throughput_handlers(table);
        ffi_layer::add_low_latency_handlers(table);
        nb::dict out;
        for (const auto& entry : table) {
          if (entry.instantiate == nullptr) {
            out[entry.name.c_str()] = nb::capsule(entry.execute);
            continue;
          }
          nb::dict stages;
          stages["instantiate"] = nb::capsule(entry.instantiate);
          stages["initialize"] = nb::capsule(entry.initialize);
          stages["execute"] = nb::capsule(entry.execute);
          out[entry.name.c_str()] = stages;
        }
        return out;
      },
      "FFI target name -> execute capsule, or a dict of stage capsules for group ops.");

  m.def(
      "exec_state_type",
      [] {
        static XLA_FFI_TypeInfo info = xla::ffi::MakeTypeInfo<ffi_layer::ExecState>();
        nb::dict out;
        out["type_id"] = nb::capsule(&ffi_layer::ExecState::id);
        out["type_info"] = nb::capsule(&info);
        return out;
      },
      "The group ops' per-executable state type, for jax.ffi.register_ffi_type.");

  m.def(
      "size_fields",
      [] {
        std::vector<std::string> out;
        for (const auto& [name, field] : kSizeFields) out.push_back(name);
        return out;
      },
      "Names of a group's sizes (the keys of `sizes` in buffer_bytes / register_state).");

  m.def(
      "layout_kinds",
      [] {
        nb::dict out;
        for (int i = 0; i < int(std::size(kLayoutNames)); ++i) out[kLayoutNames[i]] = i;
        return out;
      },
      "Dispatch layout name -> the id the FFI handlers take.");

  m.def(
      "buffer_bytes", [](const nb::dict& sizes) { return make_layout(sizes_from(sizes)).total_bytes; },
      nb::arg("sizes"), "Bytes of one rank's communication buffer for these sizes.");

  m.def(
      "create_group", [](const std::string& key) { return create_group(key)->instance(); }, nb::arg("key"),
      "Makes the live group with this key (programs compiled from now on bind to it); returns its "
      "instance number, for close_group.");
  m.def(
      "register_state",
      [](const std::string& key, int device, const nb::dict& sizes, int first_rank, int num_local_ranks,
         int send_blocks, int copy_blocks, double timeout_s, int fault_inject_rank, std::vector<uint64_t> peer_bases,
         uint64_t net_ops, bool ll_one_launch) {
        DeviceStateConfig cfg;
        cfg.device = device;
        cfg.sizes = sizes_from(sizes);
        cfg.first_rank = first_rank;
        cfg.num_local_ranks = num_local_ranks;
        cfg.send_blocks = send_blocks;
        cfg.copy_blocks = copy_blocks;
        cfg.timeout_s = timeout_s;
        cfg.fault_inject_rank = fault_inject_rank;
        cfg.peer_bases = std::move(peer_bases);
        cfg.net_ops = net_ops;
        cfg.ll_one_launch = ll_one_launch;
        register_state(*live_group(key), cfg);
      },
      nb::arg("key"), nb::arg("device"), nb::arg("sizes"), nb::arg("first_rank"), nb::arg("num_local_ranks"),
      nb::arg("send_blocks"), nb::arg("copy_blocks"), nb::arg("timeout_s"), nb::arg("fault_inject_rank"),
      nb::arg("peer_bases"), nb::arg("net_ops") = 0, nb::arg("ll_one_launch") = false,
      "Adds a group's state on one device (buffers of every rank must already be mapped there).");
  m.def("close_group", &close_group, nb::arg("key"), nb::arg("instance"),
        "Closes the group (programs that use it fail cleanly from now on) and drains its devices; "
        "its buffers may be freed afterwards.");
  m.def("live_groups", &live_group_keys);
  m.def(
      "pending_error",
      [](const std::string& key, int device) {
        DeviceState* state = key.empty() ? default_state(device) : state_of(key, device);
        return take_error(state);
      },
      nb::arg("key"), nb::arg("device"),
      "Text of a device-side error recorded for the group (key '' = group-less ops) on that device ('' if none).");
  m.def(
      "call_stats",
      [](const std::string& key, int device) {
        DeviceState* state = state_of(key, device);
        nb::dict out;
        out["handler_calls_captured"] = state->calls_captured.load();
        out["handler_calls_direct"] = state->calls_direct.load();
        nb::list ranks;
        for (int local = 0; local < state->num_local_ranks; ++local) {
          std::vector<uint64_t> counters = read_counters(state, local);
          nb::dict ops;
          ops["high_throughput_dispatch"] = counters[kHtDispatchSeq];
          ops["high_throughput_combine"] = counters[kHtCombineSeq];
          ops["low_latency_dispatch"] = counters[kLlDispatchSendSeq];
          ops["low_latency_combine"] = counters[kLlCombineSendSeq];
          ranks.append(ops);
        }
        out["ops_per_local_rank"] = ranks;
        return out;
      },
      nb::arg("key"), nb::arg("device"),
      "Handler calls (captured into a CUDA graph / direct) and ops executed per local rank.");
  m.def(
      "init_device", [](int device) { default_state(device); }, nb::arg("device"),
      "Prepares a device for group-less ops (error record, kernels loaded).");

  m.def("alloc_buffer", &alloc_buffer, nb::arg("device"), nb::arg("bytes"));
  m.def("free_buffer", &free_buffer, nb::arg("device"), nb::arg("ptr"));
  m.def("zero_buffer", &zero_buffer, nb::arg("device"), nb::arg("ptr"), nb::arg("bytes"));
  m.def(
      "ipc_handle",
      [](int device, uint64_t ptr) {
        std::string handle = ipc_handle(device, ptr);
        return nb::bytes(handle.data(), handle.size());
      },
      nb::arg("device"), nb::arg("ptr"));
  m.def(
      "ipc_open",
      [](int device, nb::bytes handle) {
        return ipc_open(device, std::string(static_cast<const char*>(handle.data()), handle.size()));
      },
      nb::arg("device"), nb::arg("handle"));
  m.def("ipc_close", &ipc_close, nb::arg("device"), nb::arg("ptr"));
  m.def("enable_peer_access", &enable_peer_access, nb::arg("device"), nb::arg("peer"));
  m.def("num_sms", &num_sms, nb::arg("device"));
  m.def("device_uuid", &device_uuid, nb::arg("device"), "The GPU's UUID, in hex.");
  m.def("device_memory", &device_memory, nb::arg("device"), "(free, total) bytes of device memory.");
  m.def("live_device_states", &DeviceState::live_count,
        "Group states alive in this process (closed groups are released with their last program).");
}
