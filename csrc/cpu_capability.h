// The instruction set the CPU kernels run with: detected once, overridable by the environment.
#pragma once

namespace manualconv {

// The instruction sets a kernel can be compiled for, in increasing order: Default (portable code:
// the GEMM kernels, what non-x86 builds get), Avx2 (AVX2 + FMA: 8 float lanes), Avx512 (AVX-512
// F, BW, DQ, VL: 16 float lanes).
enum class CpuCapability { Default, Avx2, Avx512 };

// "default", "avx2", "avx512" (the values MANUALCONV_CPU_CAPABILITY takes).
const char* capability_name(CpuCapability capability);

// The capability the kernels use (cpu_capability.cpp): the highest one this CPU supports, or the
// one MANUALCONV_CPU_CAPABILITY names (as ATen's ATEN_CPU_CAPABILITY); decided on the first call.
// An unknown value, or one this CPU does not support, throws (a RuntimeError at `import
// manualconv`, which calls torch.ops.manualconv.cpu_capability()).
CpuCapability cpu_capability();

}  // namespace manualconv
