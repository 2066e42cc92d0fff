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

// Whether the direct kernels' register tiles outrun torch's BLAS on this CPU, so that
// select_conv2d_kernel gives them wider layers and NCHW convs (conv2d.cpp, with the measurements).
// Detected: the capability is avx512, torch's BLAS is MKL, and the CPU is an AMD one that runs
// 512-bit FMAs at full width (family 0x1A, Zen 5, on). MKL runs its AVX2 code on CPUs not made by
// Intel: on 2 Zen 5 cores its SGEMM gave 206-223 GFLOP/s where the AVX-512 tiles reached 340-390
// (and torch's oneDNN convs 490). Zen 4 (family 0x19) splits each 512-bit FMA in two 256-bit
// halves, so there the tiles' peak is MKL's AVX2 peak, as on every AVX2 CPU; an Intel AVX-512 CPU
// has MKL's AVX-512 code. MANUALCONV_TILES_OUTRUN_BLAS=1|0 overrides the detection (the tests run
// both branches on any CPU with tiles); decided on the first call.
bool tiles_outrun_blas();

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
