// The nanobind module jax_ep._jax_ep_cuda: hands the FFI handlers to Python as
// capsules and exposes the runtime's buffer management (csrc/runtime).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "runtime/runtime.h"
#include "xla_ffi/handlers.h"

namespace nb = nanobind;
using namespace jax_ep;

namespace {

// The buffer sizes Python passes (Group fields), as the layout takes them.
BufferSizes sizes_of(int num_ranks, int max_tokens, int hidden, int elem_bytes, int num_topk, int num_local_experts,
                     bool low_latency, int num_nodes) {
  return BufferSizes{num_ranks,         max_tokens,          hidden,   elem_bytes, num_topk,
                     num_local_experts, low_latency ? 1 : 0, num_nodes};
}

}  // namespace

NB_MODULE(_jax_ep_cuda, m) {
  m.doc() = "jax_ep CUDA kernels: XLA FFI handlers and communication buffers";

  m.def("registrations", [] {
    ffi_layer::HandlerTable table;
    ffi_layer::add_layout_handlers(table);
    ffi_layer::add_high_throughput_handlers(table);
    ffi_layer::add_low_latency_handlers(table);
    nb::dict out;
    for (auto& [name, fn] : table) out[name.c_str()] = nb::capsule(fn);
    return out;
  });

  m.def(
      "buffer_bytes",
      [](int num_ranks, int max_tokens, int hidden, int elem_bytes, int num_topk, int num_local_experts,
         bool low_latency, int num_nodes) {
        return make_layout(sizes_of(num_ranks, max_tokens, hidden, elem_bytes, num_topk, num_local_experts, low_latency,
                                    num_nodes))
            .total_bytes;
      },
      nb::arg("num_ranks"), nb::arg("max_tokens"), nb::arg("hidden"), nb::arg("elem_bytes"), nb::arg("num_topk"),
      nb::arg("num_local_experts"), nb::arg("low_latency"), nb::arg("num_nodes") = 1,
      "Bytes of one rank's communication buffer for these sizes.");

  m.def(
      "register_state",
      [](int64_t group_id, int device, int num_ranks, int max_tokens, int hidden, int elem_bytes, int num_topk,
         int num_local_experts, bool low_latency, int num_nodes, int first_rank, int num_local_ranks, int send_blocks,
         int copy_blocks, double timeout_s, int fault_inject_rank, std::vector<uint64_t> peer_bases, uint64_t net_ops) {
        DeviceStateConfig cfg;
        cfg.group_id = group_id;
        cfg.device = device;
        cfg.sizes =
            sizes_of(num_ranks, max_tokens, hidden, elem_bytes, num_topk, num_local_experts, low_latency, num_nodes);
        cfg.net_ops = net_ops;
        cfg.first_rank = first_rank;
        cfg.num_local_ranks = num_local_ranks;
        cfg.send_blocks = send_blocks;
        cfg.copy_blocks = copy_blocks;
        cfg.timeout_s = timeout_s;
        cfg.fault_inject_rank = fault_inject_rank;
        cfg.peer_bases = std::move(peer_bases);
        register_state(cfg);
      },
      nb::arg("group_id"), nb::arg("device"), nb::arg("num_ranks"), nb::arg("max_tokens"), nb::arg("hidden"),
      nb::arg("elem_bytes"), nb::arg("num_topk"), nb::arg("num_local_experts"), nb::arg("low_latency"),
      nb::arg("num_nodes"), nb::arg("first_rank"), nb::arg("num_local_ranks"), nb::arg("send_blocks"),
      nb::arg("copy_blocks"), nb::arg("timeout_s"), nb::arg("fault_inject_rank"), nb::arg("peer_bases"),
      nb::arg("net_ops") = 0,
      "Registers a group's state on one device (buffers of every rank must already be mapped there).");

  m.def("unregister_group", &unregister_group, nb::arg("group_id"));
  m.def(
      "pending_error",
      [](int64_t group_id, int device) {
        DeviceState* s = group_id == 0 ? default_state(device) : find_state(group_id, device);
        return s ? take_error(s) : std::string();
      },
      nb::arg("group_id"), nb::arg("device"),
      "Text of a device-side error recorded for the group on that device ('' if none).");
  m.def(
      "call_stats",
      [](int64_t group_id, int device) {
        DeviceState* s = find_state(group_id, device);
        if (s == nullptr)
          throw std::invalid_argument("group " + std::to_string(group_id) + " has no state on device " +
                                      std::to_string(device));
        nb::dict out;
        out["handler_calls_captured"] = s->calls_captured.load();
        out["handler_calls_direct"] = s->calls_direct.load();
        nb::list ranks;
        for (int local = 0; local < s->num_local_ranks; ++local) {
          std::vector<uint64_t> c = read_counters(s, local);
          nb::dict ops;
          ops["ht_dispatch"] = c[kHtDispatchSeq];
          ops["ht_combine"] = c[kHtCombineSeq];
          ops["ll_dispatch"] = c[kLlDispatchSendSeq];
          ops["ll_combine"] = c[kLlCombineSendSeq];
          ranks.append(ops);
        }
        out["ops_per_local_rank"] = ranks;
        return out;
      },
      nb::arg("group_id"), nb::arg("device"),
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
        std::string h = ipc_handle(device, ptr);
        return nb::bytes(h.data(), h.size());
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
}
