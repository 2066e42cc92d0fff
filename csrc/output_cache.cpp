// The output cache (output_cache.h): the CPU operators' large tensors are allocated from blocks
// that earlier tensors freed, as torch's CUDA caching allocator does on the GPU.
//
// Why. torch's CPU allocator hands every block to glibc's malloc, which returns large ones to the
// system when they are freed (mmap'd blocks from 32 MiB, and the heap's top above its trim
// threshold), so the next tensor of that size is faulted in again a 4 KiB page at a time, each
// page zeroed by the kernel. A training step frees and reallocates the same sizes every step.
// Measured (AMD EPYC Zen 4, 2 threads): a ResNet-20 step at batch 128 took 28.6 k page faults
// natively and 20.5 k with manualconv, and 231 / 244 ms; with glibc's trimming off
// (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_) neither faulted and they took 199 / 194 ms. A
// channels-last max pool's backward (64@32, batch 128) writes a 32 MiB δx: 8193 faults, 11.3 ms;
// the same kernel on memory already mapped, 2.8 ms.
//
// How. The blocks are taken from the system as segments (one per request the free blocks could not
// serve) and handed out whole or split: a request takes the smallest free block at least as large
// (best fit) and leaves the rest of it free, rounded to 4 KiB pages (a new segment is at least
// 16 MiB, kMinSegmentBytes); a freed block merges with its free neighbours in its segment (as
// torch's CUDA caching allocator does). Splitting matters:
// with whole blocks per size, an airbench step (batch 512) held 440 MB, the sum over its tensor
// sizes of the most alive at once, where at most 272 MB are ever in use together. Free memory is
// kept up to MANUALCONV_CPU_CACHE_MB MiB (default 1024; 0 turns the cache off), whole free
// segments beyond it given back, the least recently freed first;
// torch.ops.manualconv.output_cache_release() gives back every whole free segment
// (manualconv.empty_cache()). Requests under 1 MiB take at::empty's path: malloc's heap reuses
// them without faults. The profiler is told when a segment is taken from or given back to the
// system (its memory timeline then shows what the process holds, free blocks included).
//
// With it (same machine, benchmark against torch.nn in one process, native / manual time): the
// ResNet-20 step 0.96 → 1.07–1.12, airbench (batch 512) 0.99 → 1.29–1.37, held memory 1.01 and
// 0.73 → 0.93 of torch's; a ResNet-20 step alone took 5–13 k page faults instead of 20.5 k (the
// rest are torch's own tensors in it: ReLU's forward output, the residual adds' gradients).

#include "output_cache.h"

#include "layout_copy.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <pthread.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace manualconv {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;
constexpr size_t kPage = 4096;
// Segments of at least 16 MiB, so that smaller tensors share them. Held in a steady training
// step (AMD EPYC Zen 4; whole segments per request vs at least 16 / 64 / 256 MiB): ResNet-20,
// batch 128: 108 vs 96 / 128 / 256 MB; airbench, batch 512: 341 vs 347 / 320 / 512 MB.
constexpr size_t kMinSegmentBytes = size_t(16) << 20;
constexpr size_t kDefaultLimitMiB = 1024;

// MANUALCONV_CPU_CACHE_MB: the most bytes of free blocks kept (0: no cache)
size_t limit_from_environment() {
  const char* value = std::getenv("MANUALCONV_CPU_CACHE_MB");
  if (value == nullptr || *value == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(value, &end, 10);
  TORCH_CHECK(end != value && *end == '\0' && mib >= 0,
              "MANUALCONV_CPU_CACHE_MB must be a whole number of MiB (0 turns the output cache "
              "off), got '", value, "'");
  return size_t(mib) << 20;
}

// A piece of a segment: handed out (free = false) or free; prev / next: its neighbours in the
// segment (nullptr at the segment's ends)
struct Block {
  char* data;
  size_t size;
  bool free = false;
  Block* prev = nullptr;
  Block* next = nullptr;
  uint64_t freed_at = 0;  // the release counter when it was last freed (oldest given back first)

  bool whole_segment() const { return prev == nullptr && next == nullptr; }
};

struct BySizeThenAddress {
  bool operator()(const Block* a, const Block* b) const {
    return a->size != b->size ? a->size < b->size : a->data < b->data;
  }
};

class OutputCache final : public c10::Allocator {
 public:
  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors outlive statics
    return *cache;
  }

  bool enabled() const { return limit_ > 0; }

  c10::DataPtr allocate(size_t nbytes) override {
    // (empty() sends only large requests here; a storage resized to a small size by torch gets
    // the default allocator's memory, which carries its own deleter)
    if (nbytes < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t size = (nbytes + kPage - 1) / kPage * kPage;
    std::lock_guard<std::mutex> lock(mutex_);
    Block key{nullptr, size};
    auto it = free_.lower_bound(&key);  // the smallest free block of at least `size` bytes
    Block* block = nullptr;
    if (it != free_.end()) {
      block = *it;
      free_.erase(it);
      free_bytes_ -= block->size;
      if (block->size - size >= kMinCachedBytes) split(block, size);
      ++hits_;
    } else {
      const size_t segment = std::max(size, std::min(kMinSegmentBytes, limit_));
      void* data = c10::alloc_cpu(segment);
      block = new Block{static_cast<char*>(data), segment};
      reserved_bytes_ += segment;
      report(data, static_cast<int64_t>(segment));
      if (segment - size >= kMinCachedBytes) split(block, size);
      ++misses_;
    }
    block->free = false;
    used_[block->data] = block;
    return {block->data, block->data, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &OutputCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Gives every whole free segment back to the system: [segments given back]
  int64_t release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t segments = 0;
    for (auto it = free_.begin(); it != free_.end();) {
      Block* block = *it;
      it = block->whole_segment() ? (++segments, give_back(it)) : std::next(it);
    }
    return segments;
  }

  // [free bytes, reserved bytes (free and in use), hits, misses, limit bytes]
  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(free_bytes_), int64_t(reserved_bytes_), hits_, misses_, int64_t(limit_)};
  }

 private:
  OutputCache() : limit_(limit_from_environment()) {
    // A child forked while another thread held the lock would wait on it for ever.
    pthread_atfork(nullptr, nullptr, [] { new (&instance().mutex_) std::mutex(); });
  }

  static void release(void* data) { instance().put_back(data); }

  // block = its first `size` bytes; the rest a new free block after it
  void split(Block* block, size_t size) {
    Block* rest = new Block{block->data + size, block->size - size};
    rest->free = true;
    rest->freed_at = block->freed_at;
    rest->prev = block;
    rest->next = block->next;
    if (block->next != nullptr) block->next->prev = rest;
    block->next = rest;
    block->size = size;
    free_.insert(rest);
    free_bytes_ += rest->size;
  }

  // into = into + its next neighbour (both free and out of free_); the neighbour is deleted
  static void merge_next(Block* into) {
    Block* next = into->next;
    into->size += next->size;
    into->next = next->next;
    if (next->next != nullptr) next->next->prev = into;
    delete next;
  }

  void put_back(void* data) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto used = used_.find(data);
    TORCH_INTERNAL_ASSERT(used != used_.end(), "manualconv output cache: freeing an unknown block");
    Block* block = used->second;
    used_.erase(used);
    free_bytes_ += block->size;
    if (block->next != nullptr && block->next->free) {
      free_.erase(block->next);
      merge_next(block);
    }
    if (block->prev != nullptr && block->prev->free) {
      Block* prev = block->prev;
      free_.erase(prev);
      merge_next(prev);
      block = prev;
    }
    block->free = true;
    block->freed_at = ++releases_;
    free_.insert(block);
    while (free_bytes_ > limit_) {  // whole free segments go back, the least recently freed first
      auto oldest = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if ((*it)->whole_segment() && (oldest == free_.end() || (*it)->freed_at < (*oldest)->freed_at)) {
          oldest = it;
        }
      }
      if (oldest == free_.end()) break;  // what is free is split among segments in use
      give_back(oldest);
    }
  }

  // Frees a whole free segment (the lock held); returns the next position in free_
  std::set<Block*, BySizeThenAddress>::iterator give_back(std::set<Block*, BySizeThenAddress>::iterator it) {
    Block* block = *it;
    free_bytes_ -= block->size;
    reserved_bytes_ -= block->size;
    report(block->data, -static_cast<int64_t>(block->size));
    c10::free_cpu(block->data);
    delete block;
    return free_.erase(it);
  }

  void report(void* data, int64_t delta) {  // (the lock held)
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(data, delta, reserved_bytes_, reserved_bytes_,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  const size_t limit_;
  std::mutex mutex_;
  std::set<Block*, BySizeThenAddress> free_;    // free blocks, by size
  std::unordered_map<void*, Block*> used_;      // blocks handed out, by address
  size_t free_bytes_ = 0, reserved_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  uint64_t releases_ = 0;
};

bool cacheable(const at::TensorOptions& options) {
  return options.device().is_cpu() && options.layout() == at::kStrided && !options.pinned_memory() &&
         OutputCache::instance().enabled();
}

}  // namespace

at::Tensor empty(at::IntArrayRef size, const at::TensorOptions& options,
                 std::optional<at::MemoryFormat> memory_format) {
  const size_t nbytes = at::detail::computeStorageNbytesContiguous(size, options.dtype().itemsize());
  if (nbytes < kMinCachedBytes || !cacheable(options)) return at::empty(size, options, memory_format);
  return at::detail::empty_generic(size, &OutputCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(),
                                   memory_format ? memory_format : options.memory_format_opt());
}

at::Tensor empty_like(const at::Tensor& t, std::optional<at::MemoryFormat> memory_format,
                      std::optional<at::ScalarType> dtype) {
  const at::TensorOptions options = t.options().dtype(dtype.value_or(t.scalar_type()));
  const at::MemoryFormat format = memory_format.value_or(at::MemoryFormat::Preserve);
  if (format != at::MemoryFormat::Preserve) return empty(t.sizes(), options, format);
  if (!t.is_non_overlapping_and_dense()) return empty(t.sizes(), options, t.suggest_memory_format());
  const size_t nbytes = at::detail::computeStorageNbytes(t.sizes(), t.strides(), options.dtype().itemsize());
  if (nbytes < kMinCachedBytes || !cacheable(options)) return at::empty_like(t, options);
  return at::detail::empty_strided_generic(t.sizes(), t.strides(), &OutputCache::instance(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), options.dtype().toScalarType());
}

at::Tensor contiguous(const at::Tensor& t, at::MemoryFormat memory_format) {
  if (t.is_contiguous(memory_format)) return t;
  at::Tensor copy = empty(t.sizes(), t.options(), memory_format);
  if (copy_between_layouts(t, copy)) return copy;  // NCHW ↔ channels-last: per-sample transposes
  return copy.copy_(t);
}

}  // namespace manualconv

// No tensor arguments: registered as composite (every dispatch key), with no fake kernel needed.
TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def("output_cache_info() -> int[]", []() { return manualconv::OutputCache::instance().info(); });
  m.def("output_cache_release() -> int", []() { return manualconv::OutputCache::instance().release_all(); });
}
