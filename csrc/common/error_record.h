// The host-visible record a kernel fills when a wait times out or input is bad.
//
// It lives in pinned host memory mapped into the device (cudaHostAllocMapped),
// one per (group, device). The first failing thread wins the `code` word with a
// compare-and-swap and fills the rest; the host reads it without synchronising
// the device (see docs/protocol.md, "Failure reporting").
#pragma once

#include <cstdint>

namespace jax_ep {

enum ErrorCode : int {
  kErrNone = 0,
  kErrTimeout = 1,    // a wait on a peer exceeded its budget (sticky: the group is unusable)
  kErrBadExpert = 2,  // an expert id outside [-1, num_experts)
  kErrTooManyTokens = 3,
};

// Which wait a timeout happened in; names are in phase_name().
enum Phase : int {
  kPhaseHtDispatchArrival = 1,
  kPhaseHtCombineArrival = 2,
  kPhaseLlDispatchSignal = 3,
  kPhaseLlCombineSignal = 4,
  kPhaseLlDispatchReuse = 5,  // a peer still receives the dispatch two ops back
  kPhaseLlCombineReuse = 6,
  kPhaseNetDispatchArrival = 7,  // a relay waits for a source node's tokens (NVSHMEM)
  kPhaseNetCombineArrival = 8,   // a home rank waits for a node's summed expert outputs
  kPhaseHtDispatchBarrier = 9,   // a one-wave dispatch's block waits for the rank's other blocks
};

// Where kernels report: the host-mapped record plus a claim word in device memory.
// Device threads race for the claim with an atomic on device memory (atomics on
// mapped host memory are not guaranteed); the winner fills the record, code last.
struct ErrorRecord;
struct ErrorSink {
  ErrorRecord* record = nullptr;  // device alias of the host-mapped record
  int* claim = nullptr;           // device memory, 0 = free; the runtime resets it
};

struct ErrorRecord {
  int code;
  int rank;   // rank that detected the error
  int peer;   // peer it waited for (timeouts) / token index (bad input)
  int phase;  // Phase (timeouts) / k (bad input)
  long long expected;
  long long observed;
  long long waited_ns;
};

inline const char* phase_name(int phase) {
  switch (phase) {
    case kPhaseHtDispatchArrival:
      return "high-throughput dispatch: waiting for the peer's tokens";
    case kPhaseHtCombineArrival:
      return "high-throughput combine: waiting for the peer's expert outputs";
    case kPhaseLlDispatchSignal:
      return "low-latency dispatch receive: waiting for the peer's token count";
    case kPhaseLlCombineSignal:
      return "low-latency combine receive: waiting for the peer's expert outputs";
    case kPhaseLlDispatchReuse:
      return "low-latency dispatch send: waiting for the peer to finish receiving the dispatch two ops back";
    case kPhaseLlCombineReuse:
      return "low-latency combine send: waiting for the peer to finish receiving the combine two ops back";
    case kPhaseNetDispatchArrival:
      return "internode dispatch: waiting for the tokens of the peer's node (NVSHMEM)";
    case kPhaseNetCombineArrival:
      return "internode combine: waiting for the summed expert outputs of the peer's node (NVSHMEM)";
    case kPhaseHtDispatchBarrier:
      return "high-throughput dispatch: waiting for the rank's other blocks (token counts)";
    default:
      return "unknown phase";
  }
}

}  // namespace jax_ep
