// What the oneDNN kernels share: one CPU engine, dtype mapping, per-thread scratch memory
// and a cache of primitives built once per shape.
#ifndef SORA_JAX_KERNELS_ONEDNN_COMMON_H_
#define SORA_JAX_KERNELS_ONEDNN_COMMON_H_

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace sora {

namespace ffi = xla::ffi;

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

inline ffi::ErrorOr<dnnl::memory::data_type> DnnlType(ffi::DataType type, const char* what) {
  switch (type) {
    case ffi::DataType::F32:
      return dnnl::memory::data_type::f32;
    case ffi::DataType::BF16:
      return dnnl::memory::data_type::bf16;
    default:
      return ffi::Unexpected(
          ffi::Error::InvalidArgument(std::string(what) + ": only float32 and bfloat16"));
  }
}

// Scratch memory reused by every call on a thread (oneDNN scratchpads, weights in
// oneDNN's layouts): grown, never shrunk, so steady-state calls do not allocate. Each
// buffer ends in a guard of known bytes, checked after every call (Overrun): a kernel
// writing past what it asked for fails that call, naming it, instead of corrupting the
// heap to crash later somewhere else.
class ThreadScratch {
 public:
  static constexpr size_t kGuard = 256;
  static constexpr unsigned char kCanary = 0xA5;

  char* Get(int slot, size_t bytes) {
    if (buffers_.size() <= size_t(slot)) {
      buffers_.resize(slot + 1);
      used_.resize(slot + 1, 0);
    }
    if (buffers_[slot].size() < bytes + kGuard) buffers_[slot].resize(bytes + kGuard);
    std::memset(buffers_[slot].data() + bytes, kCanary, kGuard);
    used_[slot] = bytes;
    return buffers_[slot].data();
  }
  dnnl::memory Memory(int slot, const dnnl::memory::desc& desc) {
    return dnnl::memory(desc, Engine(), Get(slot, desc.get_size()));
  }
  // The first slot whose guard was written since its Get, or -1.
  int Overrun() const {
    for (size_t slot = 0; slot < buffers_.size(); ++slot) {
      const char* guard = buffers_[slot].data() + used_[slot];
      for (size_t i = 0; i < kGuard && !buffers_[slot].empty(); ++i) {
        if (static_cast<unsigned char>(guard[i]) != kCanary) return int(slot);
      }
    }
    return -1;
  }

 private:
  std::vector<std::vector<char>> buffers_;
  std::vector<size_t> used_;
};

inline ThreadScratch& Scratch() {
  thread_local ThreadScratch scratch;
  return scratch;
}

inline dnnl::memory::desc Bytes(size_t n) {
  return {{int64_t(n)}, dnnl::memory::data_type::u8, dnnl::memory::format_tag::x};
}

// Plans (primitives and the layouts they chose) by a key of their shapes, built once.
template <typename Plan>
class PlanCache {
 public:
  template <typename Make>
  const Plan& Get(const std::string& key, Make make) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(key);
    if (it == plans_.end()) it = plans_.emplace(key, make()).first;
    return *it->second;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<std::string, std::unique_ptr<Plan>> plans_;
};

template <typename... Ints>
std::string Key(Ints... values) {
  std::string key;
  for (int64_t v : {int64_t(values)...}) key += std::to_string(v) + ",";
  return key;
}

}  // namespace sora

#endif  // SORA_JAX_KERNELS_ONEDNN_COMMON_H_
