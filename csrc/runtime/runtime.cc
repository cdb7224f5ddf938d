#include "runtime/runtime.h"

#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "high_throughput/params.h"
#include "layout/layout.h"
#include "low_latency/params.h"
#include "nvshmem/launchers.h"

namespace jax_ep {
namespace {

// Restores the caller's current device (handlers and Python threads share devices).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

struct Registry {
  std::mutex mu;
  std::map<std::string, std::shared_ptr<GroupControl>> live;
  std::map<int, std::unique_ptr<DeviceState>> defaults;  // per device, for group-less ops
};

Registry& registry() {
  static Registry* reg = new Registry();  // never destroyed: handlers may run during exit
  return *reg;
}

void alloc_error_record(DeviceState* state) {
  void* host = nullptr;
  check_cuda(cudaHostAlloc(&host, sizeof(ErrorRecord), cudaHostAllocMapped | cudaHostAllocPortable),
             "cudaHostAlloc(error record)");
  std::memset(host, 0, sizeof(ErrorRecord));
  state->err_host = static_cast<ErrorRecord*>(host);
  void* dev = nullptr;
  check_cuda(cudaHostGetDevicePointer(&dev, host, 0), "cudaHostGetDevicePointer");
  state->err_device = static_cast<ErrorRecord*>(dev);
  check_cuda(cudaMalloc(&state->words, sizeof(DeviceWords)), "cudaMalloc(error claim)");
  check_cuda(cudaMemset(state->words, 0, sizeof(DeviceWords)), "cudaMemset(error claim)");
}

}  // namespace

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw CudaError(std::string("jax_ep: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

namespace {
std::atomic<int64_t> g_live_states{0};
}  // namespace

DeviceState::DeviceState() {
  g_live_states.fetch_add(1);
}

int64_t DeviceState::live_count() {
  return g_live_states.load();
}

DeviceState::~DeviceState() {
  g_live_states.fetch_sub(1);
  // may run at interpreter exit with a dead context: nothing to report then
  cudaSetDevice(device);
  if (words) cudaFree(words);
  if (err_host) cudaFreeHost(err_host);
}

DeviceState* GroupControl::on(int device) const {
  for (const auto& state : states_)
    if (state->device == device) return state.get();
  return nullptr;
}

std::vector<int> GroupControl::devices() const {
  std::vector<int> out;
  for (const auto& state : states_) out.push_back(state->device);
  return out;
}

void GroupControl::add(std::unique_ptr<DeviceState> state) {
  std::unique_lock<std::shared_mutex> lock(launch_mu_);
  for (auto& existing : states_) {
    if (existing->device == state->device) {
      existing = std::move(state);
      return;
    }
  }
  states_.push_back(std::move(state));
}

void GroupControl::close() {
  {
    std::unique_lock<std::shared_mutex> lock(launch_mu_);  // waits for launches in flight
    if (closed_.exchange(true, std::memory_order_acq_rel)) return;
  }
  // Kernels of this group that are still queued (a CUDA graph replayed without its
  // handlers) see the flag and return before touching a buffer; then drain the device.
  const DeviceWords closed{0, 1};
  for (const auto& state : states_) {
    DeviceGuard guard(state->device);
    check_cuda(cudaMemcpy(&state->words->closed, &closed.closed, sizeof(int), cudaMemcpyHostToDevice),
               "cudaMemcpy(closed flag)");
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (closing a group)");
  }
}

std::shared_ptr<GroupControl> create_group(const std::string& key) {
  // Python hands out keys (one live Group per key); an entry still here belongs to a
  // Group that Python already dropped whose finalizer has not run yet: close it now.
  static std::atomic<uint64_t> next_instance{1};
  std::shared_ptr<GroupControl> stale;
  auto group = std::make_shared<GroupControl>(key, next_instance.fetch_add(1));
  {
    Registry& reg = registry();
    std::lock_guard<std::mutex> lock(reg.mu);
    auto& slot = reg.live[key];
    stale = std::move(slot);
    slot = group;
  }
  if (stale) stale->close();
  return group;
}

std::shared_ptr<GroupControl> find_group(const std::string& key) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  auto it = reg.live.find(key);
  return it == reg.live.end() ? nullptr : it->second;
}

std::vector<std::string> live_group_keys() {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  std::vector<std::string> out;
  for (const auto& [key, group] : reg.live) out.push_back(key);
  return out;
}

void close_group(const std::string& key, uint64_t instance) {
  std::shared_ptr<GroupControl> group;
  {
    Registry& reg = registry();
    std::lock_guard<std::mutex> lock(reg.mu);
    auto it = reg.live.find(key);
    if (it == reg.live.end() || it->second->instance() != instance) return;
    group = std::move(it->second);
    reg.live.erase(it);
  }
  group->close();
}

void register_state(GroupControl& group, const DeviceStateConfig& cfg) {
  if (int(cfg.peer_bases.size()) != cfg.sizes.num_ranks) {
    throw std::invalid_argument("jax_ep: peer table has " + std::to_string(cfg.peer_bases.size()) + " entries for " +
                                std::to_string(cfg.sizes.num_ranks) + " ranks");
  }
  if (cfg.sizes.num_ranks > kMaxRanks) {
    throw std::invalid_argument("jax_ep: at most " + std::to_string(kMaxRanks) + " EP ranks are supported, got " +
                                std::to_string(cfg.sizes.num_ranks));
  }
  const int N = cfg.sizes.num_nodes;
  if (N < 1 || cfg.sizes.num_ranks % N != 0 || cfg.sizes.num_ranks / N > 32) {
    throw std::invalid_argument("jax_ep: " + std::to_string(cfg.sizes.num_ranks) + " ranks cannot form " +
                                std::to_string(N) + " nodes of equal size <= 32");
  }
  const NetOps* net = reinterpret_cast<const NetOps*>(cfg.net_ops);
  if (N > 1 && (net == nullptr || net->abi != kNetOpsAbi)) {
    throw std::invalid_argument(net == nullptr ? "jax_ep: a group spanning nodes needs the NVSHMEM module's launchers"
                                               : "jax_ep: the NVSHMEM module was built from another jax_ep version "
                                                 "(launcher table ABI " +
                                                     std::to_string(net->abi) + ", expected " +
                                                     std::to_string(kNetOpsAbi) + "); rebuild both");
  }
  DeviceGuard guard(cfg.device);
  auto state = std::make_unique<DeviceState>();
  state->key = group.key();
  state->net = N > 1 ? net : nullptr;
  state->device = cfg.device;
  state->num_sms = num_sms(cfg.device);
  state->cooperative = cooperative_launches(cfg.device);
  state->layout = make_layout(cfg.sizes);
  state->num_ranks = cfg.sizes.num_ranks;
  state->first_rank = cfg.first_rank;
  state->num_local_ranks = cfg.num_local_ranks;
  state->send_blocks = cfg.send_blocks;
  state->copy_blocks = cfg.copy_blocks;
  state->timeout_ns = uint64_t(cfg.timeout_s * 1e9);
  state->fault_inject_rank = cfg.fault_inject_rank;
  state->ll_one_launch = cfg.ll_one_launch;
  for (uint64_t base : cfg.peer_bases) state->peers.push_back(reinterpret_cast<uint8_t*>(base));
  alloc_error_record(state.get());
  preload_kernels(cfg.device);
  group.add(std::move(state));
}

DeviceState* default_state(int device) {
  Registry& reg = registry();
  {
    std::lock_guard<std::mutex> lock(reg.mu);
    auto it = reg.defaults.find(device);
    if (it != reg.defaults.end()) return it->second.get();
  }
  DeviceGuard guard(device);
  auto state = std::make_unique<DeviceState>();
  state->key = "(no group)";
  state->device = device;
  state->num_sms = num_sms(device);
  alloc_error_record(state.get());
  preload_kernels(device);
  std::lock_guard<std::mutex> lock(reg.mu);
  auto& slot = reg.defaults[device];
  if (!slot) slot = std::move(state);
  return slot.get();
}

std::string describe_error(const ErrorRecord& rec) {
  char buf[512];
  switch (rec.code) {
    case kErrNone:
      return "";
    case kErrTimeout:
      std::snprintf(buf, sizeof(buf),
                    "jax_ep: rank %d timed out after %.3f s waiting for rank %d in phase '%s' "
                    "(counter at %lld, needed %lld). The peer never arrived: it crashed, hangs, or runs a "
                    "different sequence of jax_ep ops. This group is unusable now; create a new "
                    "jax_ep.Group.",
                    rec.rank, double(rec.waited_ns) * 1e-9, rec.peer, phase_name(rec.phase), rec.observed,
                    rec.expected);
      return buf;
    case kErrBadExpert:
      std::snprintf(buf, sizeof(buf),
                    "jax_ep: topk_idx[%d, %d] = %lld is out of range [-1, %lld) (found on device by rank %d; "
                    "treated as masked)",
                    rec.peer, rec.phase, rec.observed, rec.expected, rec.rank);
      return buf;
    default:
      std::snprintf(buf, sizeof(buf), "jax_ep: device error code %d", rec.code);
      return buf;
  }
}

std::string take_error(DeviceState* state) {
  volatile ErrorRecord* rec = state->err_host;
  const int code = rec->code;
  if (code <= 0) return "";  // none, or being written right now
  ErrorRecord copy;
  std::memcpy(&copy, const_cast<ErrorRecord*>(state->err_host), sizeof(copy));
  copy.code = code;
  if (code != kErrTimeout) {  // input errors are reported once
    rec->code = kErrNone;
    state->claim_reset_pending = true;
  }
  return describe_error(copy);
}

cudaError_t rearm_error_claim(DeviceState* state, cudaStream_t stream) {
  if (!state->claim_reset_pending) return cudaSuccess;
  state->claim_reset_pending = false;
  return cudaMemsetAsync(&state->words->claim, 0, sizeof(int), stream);
}

void count_call(DeviceState* state, cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  // a failed query counts as direct: the count is a diagnostic, never a reason to fail
  if (cudaStreamIsCapturing(stream, &status) == cudaSuccess && status == cudaStreamCaptureStatusActive)
    state->calls_captured.fetch_add(1, std::memory_order_relaxed);
  else
    state->calls_direct.fetch_add(1, std::memory_order_relaxed);
}

std::vector<uint64_t> read_counters(DeviceState* state, int local) {
  if (local < 0 || local >= state->num_local_ranks)
    throw std::out_of_range("local rank " + std::to_string(local) + " not in [0, " +
                            std::to_string(state->num_local_ranks) + ")");
  DeviceGuard guard(state->device);
  std::vector<uint64_t> out(kNumCounters);
  const uint8_t* base = state->peers[state->first_rank + local] + state->layout.counters;
  check_cuda(cudaMemcpy(out.data(), base, out.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost),
             "cudaMemcpy(counters)");
  return out;
}

void zero_buffer(int device, uint64_t ptr, size_t bytes) {
  DeviceGuard guard(device);
  check_cuda(cudaMemset(reinterpret_cast<void*>(ptr), 0, bytes), "cudaMemset(communication buffer)");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

uint64_t alloc_buffer(int device, size_t bytes) {
  DeviceGuard guard(device);
  void* buffer = nullptr;
  check_cuda(cudaMalloc(&buffer, bytes), "cudaMalloc(communication buffer)");
  check_cuda(cudaMemset(buffer, 0, bytes), "cudaMemset(communication buffer)");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  return reinterpret_cast<uint64_t>(buffer);
}

void free_buffer(int device, uint64_t ptr) {
  DeviceGuard guard(device);
  check_cuda(cudaFree(reinterpret_cast<void*>(ptr)), "cudaFree(communication buffer)");
}

std::string ipc_handle(int device, uint64_t ptr) {
  DeviceGuard guard(device);
  cudaIpcMemHandle_t mem_handle;
  check_cuda(cudaIpcGetMemHandle(&mem_handle, reinterpret_cast<void*>(ptr)), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&mem_handle), sizeof(mem_handle));
}

uint64_t ipc_open(int device, const std::string& handle) {
  if (handle.size() != sizeof(cudaIpcMemHandle_t)) {
    throw std::invalid_argument("jax_ep: CUDA IPC handle has " + std::to_string(handle.size()) + " bytes, expected " +
                                std::to_string(sizeof(cudaIpcMemHandle_t)));
  }
  DeviceGuard guard(device);
  cudaIpcMemHandle_t mem_handle;
  std::memcpy(&mem_handle, handle.data(), sizeof(mem_handle));
  void* mapped = nullptr;
  check_cuda(cudaIpcOpenMemHandle(&mapped, mem_handle, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
  return reinterpret_cast<uint64_t>(mapped);
}

void ipc_close(int device, uint64_t ptr) {
  DeviceGuard guard(device);
  check_cuda(cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptr)), "cudaIpcCloseMemHandle");
}

void enable_peer_access(int device, int peer) {
  if (device == peer) return;
  DeviceGuard guard(device);
  int can = 0;
  check_cuda(cudaDeviceCanAccessPeer(&can, device, peer), "cudaDeviceCanAccessPeer");
  if (!can) {
    throw CudaError("jax_ep: GPU " + std::to_string(device) + " cannot access GPU " + std::to_string(peer) +
                    " as a peer (no NVLink/P2P path); the intranode kernels need peer access");
  }
  cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();  // clear the sticky-free status
    return;
  }
  check_cuda(err, "cudaDeviceEnablePeerAccess");
}

std::pair<size_t, size_t> device_memory(int device) {
  DeviceGuard guard(device);
  size_t free = 0, total = 0;
  check_cuda(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return {free, total};
}

int num_sms(int device) {
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return n;
}

bool cooperative_launches(int device) {
  int v = 0;
  check_cuda(cudaDeviceGetAttribute(&v, cudaDevAttrCooperativeLaunch, device), "cudaDeviceGetAttribute");
  return v != 0;
}

std::string device_uuid(int device) {
  cudaDeviceProp prop;
  check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned char b : prop.uuid.bytes) {
    out += hex[b >> 4];
    out += hex[b & 15];
  }
  return out;
}

void preload_kernels(int device) {
  DeviceGuard guard(device);
  check_cuda(prepare_layout_kernels(), "loading the layout kernel");
  check_cuda(prepare_ht_dispatch_kernels(), "loading the dispatch kernels");
  check_cuda(prepare_ht_combine_kernels(), "loading the combine kernels");
  check_cuda(prepare_ht_cached_dispatch_kernels(), "loading the cached dispatch kernel");
  check_cuda(prepare_ht_dispatch_here_kernels(), "loading the one-launch dispatch kernel");
  check_cuda(prepare_ll_kernels(), "loading the low-latency kernels");
  check_cuda(prepare_ht_forward_kernels(), "loading the internode kernels");
}

}  // namespace jax_ep
