// cpu_capability(): what this CPU supports (__builtin_cpu_supports), the MANUALCONV_CPU_CAPABILITY
// override, and two small operators that report the choice to Python:
//   torch.ops.manualconv.cpu_capability() -> str             (manualconv.cpu_capability())
//   torch.ops.manualconv.conv2d_selected_kernel(...) -> str  (select_conv2d_kernel's answer for a
//                                                             float32 geometry; tests)

#include "conv2d.h"

#include <torch/library.h>

#include <ATen/Context.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace manualconv {
namespace {

constexpr CpuCapability kCapabilities[] = {CpuCapability::Default, CpuCapability::Avx2,
                                           CpuCapability::Avx512};

// Whether this CPU can run code compiled for `capability`.
bool cpu_supports(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::Default:
      return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    case CpuCapability::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuCapability::Avx512:
      return cpu_supports(CpuCapability::Avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
#endif
    default:
      return false;
  }
}

// "avx512, avx2, default": what this CPU supports, best first.
std::string supported_names() {
  std::string names;
  for (int i = 2; i >= 0; --i) {
    if (!cpu_supports(kCapabilities[i])) continue;
    names += names.empty() ? "" : ", ";
    names += capability_name(kCapabilities[i]);
  }
  return names;
}

// The best capability of this CPU, or the one MANUALCONV_CPU_CAPABILITY names.
CpuCapability choose_capability() {
  const char* requested = std::getenv("MANUALCONV_CPU_CAPABILITY");
  if (requested == nullptr || requested[0] == '\0') {
    CpuCapability best = CpuCapability::Default;
    for (CpuCapability c : kCapabilities) best = cpu_supports(c) ? c : best;
    return best;
  }
  for (CpuCapability c : kCapabilities) {
    if (std::string(requested) != capability_name(c)) continue;
    TORCH_CHECK(cpu_supports(c), "MANUALCONV_CPU_CAPABILITY=", requested,
                ": this CPU does not support ", requested, " (it supports: ", supported_names(), ")");
    return c;
  }
  TORCH_CHECK(false, "MANUALCONV_CPU_CAPABILITY=", requested,
              " is not a capability: use avx512, avx2 or default (this CPU supports: ",
              supported_names(), ")");
  return CpuCapability::Default;  // (not reached)
}

// An AMD CPU with full-width 512-bit FMAs: family 0x1A (Zen 5) or later (cpuid leaf 1's family,
// with the extended family added as for every family 0xF and above).
bool amd_full_width_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  char vendor[13] = {};
  std::memcpy(vendor, &ebx, 4), std::memcpy(vendor + 4, &edx, 4), std::memcpy(vendor + 8, &ecx, 4);
  if (std::string(vendor) != "AuthenticAMD" || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const unsigned int base = (eax >> 8) & 0xF, extended = (eax >> 20) & 0xFF;
  return (base == 0xF ? base + extended : base) >= 0x1A;
#else
  return false;
#endif
}

bool detect_tiles_outrun_blas() {
  const char* requested = std::getenv("MANUALCONV_TILES_OUTRUN_BLAS");
  if (requested != nullptr && requested[0] != '\0') {
    const std::string value(requested);
    TORCH_CHECK(value == "0" || value == "1", "MANUALCONV_TILES_OUTRUN_BLAS=", value,
                " is not 0 or 1 (unset: detected from the CPU)");
    return value == "1";
  }
  return cpu_capability() == CpuCapability::Avx512 && at::hasMKL() && amd_full_width_avx512();
}

Conv2dPass pass_named(const std::string& name) {
  if (name == "forward") return Conv2dPass::Forward;
  if (name == "grad_input") return Conv2dPass::GradInput;
  TORCH_CHECK(name == "grad_weight", "conv2d_selected_kernel: pass must be forward, grad_input or ",
              "grad_weight, got ", name);
  return Conv2dPass::GradWeight;
}

const char* kernel_name(Conv2dKernel kernel) {
  switch (kernel) {
    case Conv2dKernel::NchwGemm: return "nchw_gemm";
    case Conv2dKernel::NhwcGemm: return "nhwc_gemm";
    case Conv2dKernel::NhwcGemmAvx2: return "nhwc_gemm_avx2";
    case Conv2dKernel::NhwcGemmAvx512: return "nhwc_gemm_avx512";
    case Conv2dKernel::DirectAvx2: return "direct_avx2";
    case Conv2dKernel::DirectAvx512: return "direct_avx512";
    case Conv2dKernel::Winograd: return "winograd";
    case Conv2dKernel::WinogradAvx2: return "winograd_avx2";
    case Conv2dKernel::WinogradAvx512: return "winograd_avx512";
    case Conv2dKernel::Winograd4x4: return "winograd4x4";
    case Conv2dKernel::Winograd4x4Avx2: return "winograd4x4_avx2";
    case Conv2dKernel::Winograd4x4Avx512: return "winograd4x4_avx512";
    case Conv2dKernel::Depthwise: return "depthwise";
  }
  return "?";
}

}  // namespace

const char* capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::Default: return "default";
    case CpuCapability::Avx2: return "avx2";
    case CpuCapability::Avx512: return "avx512";
  }
  return "?";
}

CpuCapability cpu_capability() {
  static const CpuCapability capability = choose_capability();  // a throw leaves it undecided
  return capability;
}

bool tiles_outrun_blas() {
  static const bool outrun = detect_tiles_outrun_blas();  // a throw leaves it undecided
  return outrun;
}

}  // namespace manualconv

// No tensor arguments: registered as composite (every dispatch key), with no fake kernel needed.
TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def("cpu_capability() -> str",
        []() { return std::string(manualconv::capability_name(manualconv::cpu_capability())); });
  m.def("tiles_outrun_blas() -> bool", []() { return manualconv::tiles_outrun_blas(); });
  m.def(
      "conv2d_selected_kernel(str pass_name, int[4] input_size, int[4] weight_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool channels_last) -> str",
      [](std::string pass_name, std::vector<int64_t> input_size, std::vector<int64_t> weight_size,
         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
         int64_t groups, bool channels_last) {
        const manualconv::Conv2dGeometry g = manualconv::check_conv2d(
            "conv2d_selected_kernel", input_size, "input_size", weight_size, "weight_size", stride,
            padding, dilation, groups);
        return std::string(manualconv::kernel_name(manualconv::select_conv2d_kernel(
            manualconv::pass_named(pass_name), g, at::kFloat, channels_last,
            manualconv::cpu_capability())));
      });
}
