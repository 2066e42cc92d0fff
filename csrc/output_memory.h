// Output tensors the kernels write whole, allocated so that their first touch is cheap.
//
// A CPU tensor of 32 MiB or more (glibc's largest mmap threshold: such a block is always a fresh
// mmap, unmapped again when freed) has every page faulted in, and zeroed by the kernel, when a
// kernel first writes it: with 4 KiB pages that is 8192 faults for a 128×64×32×32 float32 δx,
// and it costs more than the pooling itself. Advising the block to use 2 MiB pages (Linux's
// MADV_HUGEPAGE; transparent huge pages in "madvise" mode, the common default) turns them into 16.
// Measured (AMD EPYC Zen 4, one thread, CPU time of zeros_like on 128×64×32×32 float32):
// 14.2 ms with 4 KiB pages, 3.2 ms with 2 MiB pages (torch's THP_MEM_ALLOC_ENABLE=1 allocator,
// the same advice). It is advice only: where the kernel ignores it nothing changes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace manualconv {

// Asks for 2 MiB pages over the 2 MiB-aligned interior of [data, data + bytes), for blocks of
// 32 MiB or more (smaller ones may come from the heap, already touched and shared).
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge_page = uintptr_t(2) << 20;
  constexpr size_t always_mmapped = size_t(32) << 20;
  if (bytes < always_mmapped) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(data) + huge_page - 1) & ~(huge_page - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(huge_page - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice: may fail
#else
  (void)data, (void)bytes;
#endif
}

// at::empty(size, options), with a large CPU block advised to 2 MiB pages before its first touch.
inline at::Tensor empty_output(at::IntArrayRef size, const at::TensorOptions& options) {
  at::Tensor t = at::empty(size, options);
  if (t.device().is_cpu()) advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

}  // namespace manualconv
