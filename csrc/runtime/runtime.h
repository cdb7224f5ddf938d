// Host-side state of the kernels: per group, its buffers' peer tables and error
// records on every local device. Plain CUDA runtime C++, no XLA or Python.
//
// Ownership (docs/protocol.md, "Ordering and lifetime"): a GroupControl is shared by
// the registry of live groups (until Group.close()) and by every compiled executable
// that uses the group (the FFI handlers' per-executable state). Closing marks it
// closed, so handlers refuse and kernels already captured in a CUDA graph return at
// their first instruction; the communication buffers themselves belong to Python,
// which frees them once close() has drained the devices. What a closed group's
// kernels may still read (the closed flag, the error record) lives as long as the
// last executable.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <shared_mutex>
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

// Words kernels read or write that must outlive the group's buffers (device memory).
struct DeviceWords {
  int claim;   // error claim (see ErrorSink)
  int closed;  // 1 once the group is closed: kernels return at once
};

// One group's state on one device (the ranks this device runs).
struct DeviceState {
  std::string key;  // the group's key (error messages)
  int device = 0;
  BufferLayout layout;
  int num_ranks = 1;
  int first_rank = 0;
  int num_local_ranks = 1;
  int send_blocks = 1;
  int copy_blocks = 1;
  uint64_t timeout_ns = 0;
  int fault_inject_rank = -1;
  int ll_one_launch = 0;              // see DeviceStateConfig
  int num_sms = 0;                    // the device's SMs (looked up once, when the state is made)
  int cooperative = 0;                // 1: the device takes cooperative launches (looked up with num_sms)
  std::vector<uint8_t*> peers;        // [num_ranks] buffer bases (null: another node), copied into each launch
  const NetOps* net = nullptr;        // the NVSHMEM module's launchers (groups spanning nodes)
  ErrorRecord* err_host = nullptr;    // pinned, mapped
  ErrorRecord* err_device = nullptr;  // its device alias
  DeviceWords* words = nullptr;       // device memory
  bool claim_reset_pending = false;   // an input error was taken: re-arm the claim
  // Handler calls, split by whether XLA was capturing the stream into a command buffer
  // (CUDA graph): a replayed graph runs the kernels without calling the handler again,
  // so ops executed (the device sequence counters) minus handler calls = replays.
  std::atomic<int64_t> calls_captured{0};
  std::atomic<int64_t> calls_direct{0};

  ErrorSink sink() const { return ErrorSink{err_device, &words->claim}; }
  const int* closed_flag() const { return &words->closed; }

  DeviceState();
  ~DeviceState();
  // DeviceStates alive in this process (a leak check for tests: closed groups and the
  // executables that used them must release theirs).
  static int64_t live_count();
  DeviceState(const DeviceState&) = delete;
  DeviceState& operator=(const DeviceState&) = delete;
};

struct DeviceStateConfig {
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
  // The low-latency ops may run their send and receive phases in one launch: the
  // receive phase waits inside the kernel for every rank's send phase, which is safe
  // only when no other process runs ranks of the group on this GPU (under MPS two
  // such kernels could each hold part of the SMs and wait for each other).
  bool ll_one_launch = false;
};

// A group in this process: its states on the local devices and whether it is closed.
class GroupControl {
 public:
  GroupControl(std::string key, uint64_t instance) : key_(std::move(key)), instance_(instance) {}
  const std::string& key() const { return key_; }
  uint64_t instance() const { return instance_; }  // unique in this process
  bool closed() const { return closed_.load(std::memory_order_acquire); }
  // The group's state on `device`, or nullptr when it has no rank there.
  DeviceState* on(int device) const;
  std::vector<int> devices() const;
  // Held (shared) by a handler from its closed check through its launches; close()
  // takes it exclusively, so no launch of a closed group is ever enqueued.
  std::shared_mutex& launch_mutex() { return launch_mu_; }

  void add(std::unique_ptr<DeviceState> state);
  // Refuses new launches, raises the device flags, waits for the devices to drain.
  void close();

 private:
  std::string key_;
  uint64_t instance_;
  std::atomic<bool> closed_{false};
  std::shared_mutex launch_mu_;
  std::vector<std::unique_ptr<DeviceState>> states_;  // filled before any handler runs
};

// --- the registry of live groups, by key -----------------------------------------
// Creates the live group with this key (a stale one with that key is closed first).
std::shared_ptr<GroupControl> create_group(const std::string& key);
// The live group with this key, or nullptr.
std::shared_ptr<GroupControl> find_group(const std::string& key);
// Keys of the live groups (error messages).
std::vector<std::string> live_group_keys();
// Closes that instance of the group and forgets it (nothing if a newer instance holds the
// key: the old one was closed when it was replaced); executables keep a closed control.
void close_group(const std::string& key, uint64_t instance);
// Adds the group's state on one device (buffers of every rank must already be mapped there).
void register_state(GroupControl& group, const DeviceStateConfig& cfg);

// State with only an error record, for ops that need no buffers (dispatch_layout).
DeviceState* default_state(int device);

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
// Whether `device` takes cooperative launches (every block of the grid resident at once).
bool cooperative_launches(int device);
// The GPU's UUID (hex): ranks of different processes compare them to find a shared GPU.
std::string device_uuid(int device);
// (free, total) bytes of device memory (tests: nothing leaks across groups).
std::pair<size_t, size_t> device_memory(int device);

// Loads every kernel on `device` now (module loading takes a driver-wide lock; doing
// it while a peer's kernel spins could deadlock) and sets shared-memory limits.
void preload_kernels(int device);

}  // namespace jax_ep
