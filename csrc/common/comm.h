// The per-launch view of a group's communication state, filled by the FFI layer
// from the runtime's DeviceState.
#pragma once

#include <cstdint>

#include "common/buffer_layout.h"
#include "common/error_record.h"

namespace jax_ep {

constexpr int kMaxRanks = 64;  // destination sets are 64-bit masks
constexpr int kMaxTopk = 32;   // one lane per top-k slot

struct NetOps;  // internode launchers (nvshmem/launchers.h), from the NVSHMEM module

// What every launch needs to reach its peers (high-throughput and low-latency kernels).
struct CommContext {
  // Base of each rank's buffer ([num_ranks] used), carried in the launch parameters:
  // a table in device memory would add a dependent global load to the start of every
  // kernel, which is most of an empty low-latency kernel's time.
  uint8_t* peers[kMaxRanks] = {};
  BufferLayout layout;
  ErrorSink err;                // where kernels report timeouts and bad input
  const int* closed = nullptr;  // device word: 1 once the group is closed (kernels return at once)
  uint64_t timeout_ns = 0;
  int num_ranks = 1;
  int first_rank = 0;          // ranks [first_rank, first_rank + num_local_ranks) run here
  int num_local_ranks = 1;     // > 1 only in loopback
  int send_blocks = 1;         // blocks per rank of the send kernels (constant per group)
  int copy_blocks = 1;         // blocks per rank of the local copy kernels
  int fault_inject_rank = -1;  // testing: this rank never sends
  // 1 when a peer is another GPU: flags are released/acquired at system scope. 0 when
  // every rank runs in this launch (loopback, EP=1): GPU scope is enough and cheaper.
  int sys_scope = 1;
  // 1: the low-latency ops may run send and receive in one launch (DeviceStateConfig).
  int ll_one_launch = 0;
  int num_sms = 1;      // the device's SMs (host side: sizes a one-launch op's grid)
  int cooperative = 0;  // 1: the device takes cooperative launches (host side: one-wave dispatch, one-launch LL ops)
  // Host-side table of the launchers that use NVSHMEM (set when layout.sizes.num_nodes
  // > 1); kernels never read it.
  const NetOps* net = nullptr;
};

}  // namespace jax_ep
