// Where the CPU operators' large tensors come from (outputs, gradients, workspaces, layout
// copies): memory that earlier tensors freed, split best-fit for the next request and merged back
// when freed, instead of being handed back to the system and faulted in again, page by page
// (output_cache.cpp: why, how, and the measurements). Requests under 1 MiB, other devices and
// MANUALCONV_CPU_CACHE_MB=0 take at::empty's path.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace manualconv {

// at::empty(size, options, memory_format) on the cache (options' memory format if none is given)
at::Tensor empty(at::IntArrayRef size, const at::TensorOptions& options,
                 std::optional<at::MemoryFormat> memory_format = std::nullopt);

// at::empty_like(t, memory_format, dtype) on the cache: Preserve (the default) keeps a dense
// tensor's strides, as at::empty_like does; dtype (default: t's) may differ from t's
at::Tensor empty_like(const at::Tensor& t,
                      std::optional<at::MemoryFormat> memory_format = std::nullopt,
                      std::optional<at::ScalarType> dtype = std::nullopt);

// t.contiguous(memory_format), a copy's memory from the cache (t itself if already so laid out)
at::Tensor contiguous(const at::Tensor& t, at::MemoryFormat memory_format = at::MemoryFormat::Contiguous);

}  // namespace manualconv
