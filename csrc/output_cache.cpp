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
// How. The blocks are carved from one arena: a range of virtual memory as large as the machine's
// physical memory, reserved at the first request (MAP_NORESERVE: only the pages written are backed)
// and tiled by blocks from its start to its top. A request takes the smallest free block at least
// as large (best fit) and leaves the rest of it free, rounded to 4 KiB pages; with none, the top
// grows (the free block at the top, if any, growing into the request); a freed block merges with
// its free neighbours (as torch's CUDA caching allocator does). One arena instead of separate
// segments lets any freed memory serve any later request: with 16 MiB-and-up segments each merged
// only within itself, an airbench step (batch 512) held 348 MiB, with the arena 278, where 272 are
// ever in use together (AMD EPYC Zen 5; torch.nn's step 374: memory ratio 0.93 -> 0.74; mobilenet_v2
// 0.80 -> 0.74; ResNet-20 189 both ways, its step times unchanged). Free memory is kept up to
// MANUALCONV_CPU_CACHE_MB MiB (default 1024; 0 turns the cache off): beyond it the least recently
// freed blocks are given back (madvise: their pages return to the system, their addresses stay the
// arena's, and a request they serve later is faulted in again); a free block at the top lowers the
// top instead. torch.ops.manualconv.output_cache_release() gives back every free block
// (manualconv.empty_cache()). Requests under 1 MiB take at::empty's path: malloc's heap reuses them
// without faults; so do requests the arena cannot hold (full, or not reserved where the system
// refuses the mapping). The profiler is told when the memory the cache holds grows or shrinks (its
// memory timeline then shows what the process holds, free blocks included).
//
// With it (AMD EPYC Zen 4, benchmark against torch.nn in one process, native / manual time): the
// ResNet-20 step 0.96 → 1.07–1.12, airbench (batch 512) 0.99 → 1.29–1.37; a ResNet-20 step alone
// took 5–13 k page faults instead of 20.5 k (the rest are torch's own tensors in it: ReLU's forward
// output, the residual adds' gradients).

#include "output_cache.h"

#include "layout_copy.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace manualconv {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;
constexpr size_t kPage = 4096;
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

size_t round_to_pages(size_t nbytes) { return (nbytes + kPage - 1) / kPage * kPage; }

// A piece of the arena: handed out, free (its pages held), or given back (free, its pages returned
// to the system); prev / next: its neighbours in address order (nullptr at the arena's start / top)
enum class State { InUse, Free, GivenBack };

struct Block {
  char* data;
  size_t size;
  State state = State::InUse;
  Block* prev = nullptr;
  Block* next = nullptr;
  uint64_t freed_at = 0;  // the release counter when it was last freed (oldest given back first)
};

struct BySizeThenAddress {
  bool operator()(const Block* a, const Block* b) const {
    return a->size != b->size ? a->size < b->size : a->data < b->data;
  }
};
using BlockSet = std::set<Block*, BySizeThenAddress>;

// The arena's address range: the machine's physical memory (at most a quarter of the process's
// address-space limit, RLIMIT_AS, where one is set, so that other allocations keep the rest), or
// the largest power-of-two share of it the system maps (halved down to 64 MiB); [nullptr, 0] where
// it maps none
std::pair<char*, size_t> reserve_arena() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  size_t bytes = pages > 0 && page > 0 ? size_t(pages) * size_t(page) : size_t(64) << 30;
  rlimit limit{};
  if (getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
    bytes = std::min(bytes, size_t(limit.rlim_cur / 4));
  }
  for (; bytes >= (size_t(64) << 20); bytes /= 2) {
    bytes = round_to_pages(bytes);
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base != MAP_FAILED) return {static_cast<char*>(base), bytes};
  }
  return {nullptr, 0};
}

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
    const size_t size = round_to_pages(nbytes);
    std::lock_guard<std::mutex> lock(mutex_);
    Block* block = take_free(size);
    if (block != nullptr) {
      ++hits_;
    } else {
      block = take_given_back(size);
      if (block == nullptr) block = grow(size);
      if (block == nullptr) return c10::GetCPUAllocator()->allocate(nbytes);  // the arena cannot hold it
      ++misses_;
    }
    block->state = State::InUse;
    used_[block->data] = block;
    return {block->data, block->data, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &OutputCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Gives every free block back to the system: [blocks given back]
  int64_t release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t blocks = 0;
    while (!free_.empty()) {
      give_back(*free_.begin());
      ++blocks;
    }
    return blocks;
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

  // The smallest free block of at least `size` bytes, cut to `size` (the rest stays free), out of
  // free_; nullptr if none
  Block* take_free(size_t size) {
    auto it = free_.lower_bound(size_key(size));
    if (it == free_.end()) return nullptr;
    Block* block = *it;
    free_.erase(it);
    free_bytes_ -= block->size;
    if (block->size - size >= kMinCachedBytes) split(block, size, free_, &free_bytes_);
    return block;
  }

  // The smallest given-back block of at least `size` bytes, cut to `size` (the rest stays given
  // back): its pages are held again (faulted in when written)
  Block* take_given_back(size_t size) {
    auto it = given_back_.lower_bound(size_key(size));
    if (it == given_back_.end()) return nullptr;
    Block* block = *it;
    given_back_.erase(it);
    if (block->size - size >= kMinCachedBytes) split(block, size, given_back_, nullptr);
    hold(block->data, int64_t(block->size));
    return block;
  }

  // A block of `size` bytes at the arena's top, taking in the free or given-back block there;
  // nullptr if the arena is full (or was never reserved)
  Block* grow(size_t size) {
    if (arena_ == nullptr && !arena_tried_) {
      arena_tried_ = true;
      std::tie(arena_, capacity_) = reserve_arena();
    }
    Block* tail = top_block_;
    const bool reuse_tail = tail != nullptr && tail->state != State::InUse;
    const size_t start = reuse_tail ? size_t(tail->data - arena_) : top_;
    if (arena_ == nullptr || start + size > capacity_) return nullptr;
    size_t held_before = 0;  // of the tail's bytes, those whose pages are held
    Block* block = tail;
    if (reuse_tail) {
      if (tail->state == State::Free) {
        free_.erase(tail);
        free_bytes_ -= tail->size;
        held_before = tail->size;
      } else {
        given_back_.erase(tail);
      }
      tail->size = size;
    } else {
      block = new Block{arena_ + top_, size};
      block->prev = tail;
      if (tail != nullptr) tail->next = block;
      top_block_ = block;
    }
    top_ = start + size;
    hold(block->data + held_before, int64_t(size - held_before));
    return block;
  }

  static Block* size_key(size_t size) {
    static thread_local Block key{nullptr, 0};
    key.size = size;
    return &key;
  }

  // block = its first `size` bytes; the rest a new block after it, in the same state, into `set`
  void split(Block* block, size_t size, BlockSet& set, size_t* set_bytes) {
    Block* rest = new Block{block->data + size, block->size - size};
    rest->state = block->state;
    rest->freed_at = block->freed_at;
    rest->prev = block;
    rest->next = block->next;
    if (block->next != nullptr) block->next->prev = rest;
    else top_block_ = rest;
    block->next = rest;
    block->size = size;
    set.insert(rest);
    if (set_bytes != nullptr) *set_bytes += rest->size;
  }

  // into = into + its next neighbour (both out of their sets); the neighbour is deleted
  void merge_next(Block* into) {
    Block* next = into->next;
    into->size += next->size;
    into->next = next->next;
    if (next->next != nullptr) next->next->prev = into;
    else top_block_ = into;
    delete next;
  }

  // block merged with its neighbours in `state` (taken out of `set`): the merged block
  Block* merge_with_neighbours(Block* block, State state, BlockSet& set) {
    if (block->next != nullptr && block->next->state == state) {
      set.erase(block->next);
      merge_next(block);
    }
    if (block->prev != nullptr && block->prev->state == state) {
      Block* prev = block->prev;
      set.erase(prev);
      merge_next(prev);
      block = prev;
    }
    return block;
  }

  void put_back(void* data) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto used = used_.find(data);
    TORCH_INTERNAL_ASSERT(used != used_.end(), "manualconv output cache: freeing an unknown block");
    Block* block = used->second;
    used_.erase(used);
    free_bytes_ += block->size;  // (its free neighbours' bytes are counted already)
    block = merge_with_neighbours(block, State::Free, free_);
    block->state = State::Free;
    block->freed_at = ++releases_;
    free_.insert(block);
    while (free_bytes_ > limit_) {  // the least recently freed blocks go back first
      give_back(*std::min_element(free_.begin(), free_.end(),
                                  [](const Block* a, const Block* b) { return a->freed_at < b->freed_at; }));
    }
  }

  // A free block's pages go back to the system (the lock held): at the top, the top comes down to
  // it; elsewhere it stays in the arena, given back, merged with given-back neighbours
  void give_back(Block* block) {
    free_.erase(block);
    free_bytes_ -= block->size;
    hold(block->data, -int64_t(block->size));
    madvise(block->data, block->size, MADV_DONTNEED);  // the pages are zero-filled when written again
    block->state = State::GivenBack;
    block = merge_with_neighbours(block, State::GivenBack, given_back_);
    if (block->next == nullptr) {  // the top: the arena ends where the block began
      top_ = size_t(block->data - arena_);
      top_block_ = block->prev;
      if (block->prev != nullptr) block->prev->next = nullptr;
      delete block;
    } else {
      given_back_.insert(block);
    }
  }

  // The pages held grow (delta > 0) or shrink by |delta| bytes at data (the lock held); the
  // profiler is told
  void hold(void* data, int64_t delta) {
    reserved_bytes_ += delta;
    if (delta != 0 && c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(data, delta, reserved_bytes_, reserved_bytes_,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  const size_t limit_;
  std::mutex mutex_;
  char* arena_ = nullptr;
  size_t capacity_ = 0, top_ = 0;  // the arena's bytes reserved, and those up to its top
  bool arena_tried_ = false;
  Block* top_block_ = nullptr;                  // the block ending at the top (nullptr: none)
  BlockSet free_, given_back_;                  // free blocks (their pages held), given-back blocks; by size
  std::unordered_map<void*, Block*> used_;      // blocks handed out, by address
  size_t free_bytes_ = 0, reserved_bytes_ = 0;  // free blocks' bytes; bytes held (free and in use)
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
