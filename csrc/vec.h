// Float vectors for the per-ISA kernels, one interface for every lane count:
//   Vec::kLanes, Vec::zero(), Vec::load(p), v.store(p), v.add_to(p) (p[i] += v[i]), Vec::splat(p)
//   (p[0] in every lane, as a Vec::Splat), fma(splat, v, acc) = splat·v + acc.
// Vec8: one AVX register (__m256); Vec16x2: 16 lanes as two AVX halves (so the 16-lane code runs
// on AVX2); Vec16: one AVX-512 register (__m512).
//
// Included ONLY by the per-ISA translation units (conv2d_direct_avx2.cpp, conv2d_direct_avx512.cpp),
// inside their `#pragma GCC target` region and an anonymous namespace, after <immintrin.h>: every
// function here then has internal linkage and that unit's instruction set, so none can be merged
// with another unit's copy by the linker. The unit defines MANUALCONV_VEC_AVX512 before including
// it when the AVX-512 type is wanted.

struct Vec8 {
  static constexpr int kLanes = 8;
  using Splat = __m256;
  __m256 v;
  static Vec8 zero() { return {_mm256_setzero_ps()}; }
  static Vec8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Splat splat(const float* p) { return _mm256_broadcast_ss(p); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void add_to(float* p) const { _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), v)); }
};
inline Vec8 fma(Vec8::Splat s, Vec8 w, Vec8 acc) { return {_mm256_fmadd_ps(s, w.v, acc.v)}; }

struct Vec16x2 {
  static constexpr int kLanes = 16;
  using Splat = __m256;  // one broadcast serves both halves
  __m256 lo, hi;
  static Vec16x2 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Vec16x2 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static Splat splat(const float* p) { return _mm256_broadcast_ss(p); }
  void store(float* p) const { _mm256_storeu_ps(p, lo), _mm256_storeu_ps(p + 8, hi); }
  void add_to(float* p) const {
    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), lo));
    _mm256_storeu_ps(p + 8, _mm256_add_ps(_mm256_loadu_ps(p + 8), hi));
  }
};
inline Vec16x2 fma(Vec16x2::Splat s, Vec16x2 w, Vec16x2 acc) {
  return {_mm256_fmadd_ps(s, w.lo, acc.lo), _mm256_fmadd_ps(s, w.hi, acc.hi)};
}

#ifdef MANUALCONV_VEC_AVX512
struct Vec16 {
  static constexpr int kLanes = 16;
  using Splat = __m512;
  __m512 v;
  static Vec16 zero() { return {_mm512_setzero_ps()}; }
  static Vec16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Splat splat(const float* p) { return _mm512_set1_ps(*p); }  // (an embedded {1to16} operand)
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void add_to(float* p) const { _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), v)); }
};
inline Vec16 fma(Vec16::Splat s, Vec16 w, Vec16 acc) { return {_mm512_fmadd_ps(s, w.v, acc.v)}; }
#endif
