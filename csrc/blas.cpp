// gemm(): see blas.h.

#include "blas.h"

#include <climits>
#include <cstdlib>
#include <cstring>

// The Fortran BLAS interface (column-major, 32-bit integers). Declared weak: where torch's BLAS
// does not export them the addresses are null and gemm() uses at::addmm_ instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace manualconv {
namespace {

bool aten_requested() {
  static const bool requested = [] {
    const char* env = std::getenv("MANUALCONV_BLAS");
    return env != nullptr && std::strcmp(env, "aten") == 0;
  }();
  return requested;
}

bool fits_int(std::initializer_list<int64_t> values) {
  for (int64_t v : values) {
    if (v > INT_MAX) return false;
  }
  return true;
}

// A (rows × cols) matrix with row stride ld, viewed as a tensor (no copy).
template <typename scalar_t>
at::Tensor matrix_view(const scalar_t* data, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  at::Tensor t = at::from_blob(const_cast<scalar_t*>(data), {trans ? cols : rows, trans ? rows : cols},
                               {ld, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  return trans ? t.t() : t;
}

template <typename scalar_t>
void gemm_aten(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, scalar_t alpha,
               const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, scalar_t beta,
               scalar_t* c, int64_t ldc) {
  at::AutoDispatchBelowADInplaceOrView guard;
  at::Tensor c_t = matrix_view(c, m, n, ldc, false);
  c_t.addmm_(matrix_view(a, m, k, lda, trans_a), matrix_view(b, k, n, ldb, trans_b), beta, alpha);
}

// Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: the Fortran call swaps A and B.
template <typename scalar_t, typename Fn>
void gemm_impl(Fn* fortran_gemm, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
               scalar_t alpha, const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb,
               scalar_t beta, scalar_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (fortran_gemm == nullptr || aten_requested() || !fits_int({m, n, k, lda, ldb, ldc})) {
    gemm_aten(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  // a leading dimension must be at least 1 even for an empty (k = 0) operand
  const int LDA = static_cast<int>(std::max<int64_t>(lda, 1));
  const int LDB = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int LDC = static_cast<int>(std::max<int64_t>(ldc, 1));
  fortran_gemm(&tb, &ta, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  gemm_impl(sgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc) {
  gemm_impl(dgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace manualconv
