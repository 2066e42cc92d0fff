// Row-major GEMM on raw pointers: C (m × n, row stride ldc) = α·op(A)·op(B) + β·C, where
// op(A) is m × k (A stored k × m when trans_a) and op(B) is k × n (B stored n × k when trans_b).
//
// The conv kernels call it once per block of samples, often on small matrices (an 8×8 map has
// only 64 pixels), where the cost of wrapping pointers into tensors and dispatching at::mm
// would rival the multiply itself. It calls the BLAS that torch links (the Fortran sgemm_/
// dgemm_ symbols, e.g. MKL's in the x86 wheels) directly when that exports them, and falls back
// to at::addmm_ on tensor views otherwise (or when MANUALCONV_BLAS=aten is set, which the tests
// use to check that path). Inside an at::parallel_for region the BLAS runs on one thread.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace manualconv {

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc);

}  // namespace manualconv
