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

// f() (a loop written once in plain C++, e.g. a lambda over a kernel's channels) built for the
// capability the kernels use: its body inlined whole (flatten) into a function compiled for
// AVX-512 (F, BW, DQ, VL) or AVX2 + FMA, or as compiled (Default: the baseline, SSE2 on x86-64).
// The compiler vectorizes it for that instruction set, keeping the order of every sum. Where the
// target has FMA, GCC contracts a·b + c into one fused multiply-add (its default,
// -ffp-contract=fast, holds in ISO C++ mode too), which rounds once where the baseline build
// rounds twice: such loops may differ between builds in the last bit, within the same error
// bounds; loops without a multiply-add (the pools, the Winograd transforms) are bit-identical.
// The pools' channel loops, the Winograd transforms, GELU and group norm's sums run through it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
template <typename F>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"), flatten)) auto run_avx512(const F& f) {
  return f();
}
template <typename F>
__attribute__((target("avx2,fma"), flatten)) auto run_avx2(const F& f) {
  return f();
}
template <typename F>
inline auto run_for_cpu(const F& f) {
  switch (cpu_capability()) {
    case CpuCapability::Avx512: return run_avx512(f);
    case CpuCapability::Avx2: return run_avx2(f);
    case CpuCapability::Default: break;
  }
  return f();
}
#else
template <typename F>
inline auto run_for_cpu(const F& f) {
  return f();
}
#endif

}  // namespace manualconv
