// Host-side state of the kernels: communication buffers, peer pointer tables and
// error records, per (group, device). Plain CUDA runtime C++, no XLA or Python.
//
// Python creates everything at Group construction, outside jit; the FFI handlers
// only look states up (never allocate, never synchronise in the fast path).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/buffer_layout.h"
#include "common/error_record.h"

namespace jax_ep {

struct NetOps;

// A CUDA call that failed, with the call's text; thrown by the runtime functions.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

void check_cuda(cudaError_t err, const char* what);

struct DeviceState {
  int64_t group_id = 0;
  int device = 0;
  BufferLayout layout;
  int num_ranks = 1;
  int first_rank = 0;
  int num_local_ranks = 1;
  int send_blocks = 1;
  int copy_blocks = 1;
  uint64_t timeout_ns = 0;
  int fault_inject_rank = -1;
  std::vector<uint8_t*> peers;        // [num_ranks] buffer bases (null: another node), copied into each launch
  const NetOps* net = nullptr;        // the NVSHMEM module's launchers (groups spanning nodes)
  ErrorRecord* err_host = nullptr;    // pinned, mapped
  ErrorRecord* err_device = nullptr;  // its device alias
  int* err_claim = nullptr;           // device memory (see ErrorSink)
  bool claim_reset_pending = false;   // an input error was taken: re-arm the claim
  // Handler calls, split by whether XLA was capturing the stream into a command buffer
  // (CUDA graph): a replayed graph runs the kernels without calling the handler again,
  // so ops executed (the device sequence counters) minus handler calls = replays.
  std::atomic<int64_t> calls_captured{0};
  std::atomic<int64_t> calls_direct{0};

  ErrorSink sink() const { return ErrorSink{err_device, err_claim}; }

  ~DeviceState();
};

struct DeviceStateConfig {
  int64_t group_id;
  int device;
  BufferSizes sizes;
  int first_rank;
  int num_local_ranks;
  int send_blocks;
  int copy_blocks;
  double timeout_s;
  int fault_inject_rank;
  std::vector<uint64_t> peer_bases;  // [num_ranks] buffer base of every rank, valid on `device` (0: another node)
  uint64_t net_ops = 0;              // address of the NVSHMEM module's NetOps (sizes.num_nodes > 1)
};

// Registers (and owns) a state; replaces an existing one for the same key.
DeviceState* register_state(const DeviceStateConfig& cfg);
// nullptr when absent. Thread-safe: handlers of different devices call it concurrently.
DeviceState* find_state(int64_t group_id, int device);
// State with only an error record, for ops that need no buffers (group id 0).
DeviceState* default_state(int device);
void unregister_group(int64_t group_id);

// Human-readable description of a recorded error ("" when none).
std::string describe_error(const ErrorRecord& rec);
// Error text of a state, clearing non-sticky input errors once reported.
std::string take_error(DeviceState* state);
// Re-arms the error claim on `stream` after take_error cleared an input error
// (stream-ordered, so it is also captured correctly in a CUDA graph).
cudaError_t rearm_error_claim(DeviceState* state, cudaStream_t stream);

// Counts a handler call on `stream` (captured into a CUDA graph or run directly).
void count_call(DeviceState* state, cudaStream_t stream);
// The private counters (sequence numbers per op kind, Counter order) of local rank
// `local` of a state; synchronous copy, for diagnostics outside jit.
std::vector<uint64_t> read_counters(DeviceState* state, int local);

// Buffers (one allocation per rank, zeroed).
uint64_t alloc_buffer(int device, size_t bytes);
void free_buffer(int device, uint64_t ptr);
// Zeroes `bytes` at `ptr` on `device` and waits (buffers allocated elsewhere, e.g. NVSHMEM).
void zero_buffer(int device, uint64_t ptr, size_t bytes);
std::string ipc_handle(int device, uint64_t ptr);
uint64_t ipc_open(int device, const std::string& handle);
void ipc_close(int device, uint64_t ptr);
void enable_peer_access(int device, int peer);
int num_sms(int device);

// Loads every kernel on `device` now (module loading takes a driver-wide lock; doing
// it while a peer's kernel spins could deadlock) and sets shared-memory limits.
void preload_kernels(int device);

}  // namespace jax_ep
