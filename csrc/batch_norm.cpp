// batch_norm: per-channel batch statistics, the normalising affine map, and the derived backward.
//
//   statistics  μ_c = Σ x / N,  var_c = Σ (x − μ_c)² / N     over the N = n·H·W entries of channel c
//   apply       y = γ_c·(x − μ_c)·σ⁻¹_c + β_c  =  x·a_c + b_c,  a_c = γ_c·σ⁻¹_c,  b_c = β_c − μ_c·a_c
//   backward    training (μ, σ the batch's own):
//                 δx = γ_c·σ⁻¹_c/N · (N·δy − Σδy − x̂·Σ(δy·x̂)),   x̂ = (x − μ_c)·σ⁻¹_c
//               eval (μ, σ the running statistics, constants):  δx = γ_c·σ⁻¹_c·δy
//               both: ∂J/∂γ_c = Σ δy·x̂,  ∂J/∂β_c = Σ δy
//
// Statistics in one pass (normalization.h): Σx for μ, and Σ(x − K), Σ(x − K)² about K = the
// channel's first entry for the variance, in blocks of 32 rows in the input's precision added in
// double (the hot loops' note says why that is within the bound). The backward's two sums Σδy and
// Σδy·x̂ = σ⁻¹·Σδy·(x − μ) in one pass; δx in the same pass (eval) or a second one (training).
// Layouts: NCHW (each channel is n contiguous planes of H·W: channels are spread over threads, and
// the training backward writes a channel's δx right after its sums, while its planes are in
// cache) and channels-last NHWC (each pixel is a contiguous row of C channels: rows are spread
// over threads, each chunk of rows keeps its own per-channel sums, added in chunk order, and
// every pass reads its rows in memory order). Outputs have the input's layout. float32 and float64.
// Memory order, not last-rows-first: a second pass that started with the rows its first pass had
// read last (to find them in cache) walked memory backwards in 2 KiB blocks, which the hardware
// prefetchers do not follow. With x and δy out of cache, as in a training step (AMD EPYC Zen 4,
// AVX-512, 2 threads, NHWC (128, 16, 32, 32)): apply 0.97 → 0.45 ms, backward 1.66 → 0.89 ms
// (torch: 0.89 ms for its whole forward, 1.30 ms backward); a ResNet-20 step's 57 batch-norm
// applies took 28 → 15 ms, its backwards 50 → 39 ms.
// Speed (AMD EPYC Zen 4, AVX-512, forward + backward against torch's in one process, batch 128,
// machine shared so noisy; manualconv.bench rows): one thread, NCHW 64@32 train 58 vs 28 ms, eval
// 41 vs 22 ms, NHWC 64@32 train 47 vs 28 ms, NHWC 128@8 2.9 vs 2.2–2.9 ms; the version with the
// sums in baseline (SSE2) double code took 59, 46, 50 and 3.5 ms.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_capability.h"
#include "normalization.h"
#include "output_cache.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace manualconv {
namespace {

// ---------------------------------------------------------------------------------------------
// Arguments

// The (n, C, H, W) map as a dense tensor of one of the two layouts (a copy only for other strides).
at::Tensor dense_map(const at::Tensor& t, bool nhwc) {
  return manualconv::contiguous(t, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// An output of the dense map x's size and layout, written whole by the kernels. A tensor of its
// own, never a view (a permuted (n, H, W, C) block would be one, and autograd refuses in-place
// ops on a view a Function returned: mobilenet_v2's ReLU6(inplace=True) after batch norm).
at::Tensor output_like(const at::Tensor& x, bool nhwc) {
  return manualconv::empty(x.sizes(), x.options().memory_format(nhwc ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous));
}

// A per-channel vector: C entries of the input's dtype (made contiguous).
at::Tensor channel_vector(const at::Tensor& v, const at::Tensor& input, const char* op,
                          const char* name) {
  TORCH_CHECK(v.defined() && v.device().is_cpu(), op, ": ", name, " must be a defined CPU tensor");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == input.size(1), op, ": ", name, " must have size [",
              input.size(1), "] (one entry per channel), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == input.scalar_type(), op, ": ", name, " must have the input's dtype ",
              input.scalar_type(), ", got ", v.scalar_type());
  return v.contiguous();
}

// Where channel c's entries are: NCHW, plane (n, c) starts at (n·C + c)·P and is P = H·W long;
// NHWC, pixel r (of N·P) holds its C channels at r·C.
struct Map {
  int64_t n, C, P;
  bool nhwc;
  int64_t entries() const { return n * P; }  // per channel
};

Map map_of(const at::Tensor& t, bool nhwc) {
  return {t.size(0), t.size(1), t.size(2) * t.size(3), nhwc};
}

// Chunks of NHWC pixel rows, one per thread, each with its own partial sums.
int64_t row_chunks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 64));
}

// ---------------------------------------------------------------------------------------------
// The hot loops, plain C++ built for the capability the kernels use (run_for_cpu: AVX-512, AVX2
// or the baseline). Both layouts are read as rows of columns: NHWC, rows of C channels; NCHW, a
// plane cut into rows of kLanes entries (each column then a lane of the channel's sums). Each
// column's sums are taken over a block of kBlockRows rows in registers, kLanes columns at a time
// (so that no add waits on the last and the loop vectorises), and then added to the column's
// running sums. The order of every sum is fixed by kLanes, kBlockRows and the thread count, the
// same on every build. Each loop over the kLanes columns stays a loop (GCC unroll 1) for the
// compiler's loop vectoriser: fully unrolled, GCC 12's basic-block vectoriser left some of the
// sums scalar (objdump of batch_norm.o; NCHW statistics of (128, 128, 8, 8) took 0.6 ms, 0.16 ms
// as a loop).
//
// Precision: a block's sums are in the input's precision, a sum of at most kBlockRows = 32
// terms, so within 32·ε·Σ|terms| (ε = 2⁻²⁴ for float32); the blocks are added in double, which
// adds no error of that size however many there are (N·2⁻⁵³ ≪ 2⁻²⁴ for N = n·H·W up to 10⁸).
// That is within the n·ε·Σ|terms| bound of any order of summation (tests/oracle.py) and tighter
// than torch's own CPU kernels, which sum a whole plane (NCHW) or a thread's rows (NHWC) in
// float32 before their double total. Blocks in float32 take half the vector work of double
// (16 lanes a register, no conversions), which is what the small maps, held in cache, are bound by.

constexpr int kLanes = 16;          // one AVX-512 register of float32
constexpr int64_t kBlockRows = 32;  // rows summed in registers before the running sums

// eval: δx = δy·a_c over `rows` rows of C columns.
template <typename scalar_t>
__attribute__((always_inline)) inline void rows_scale(const scalar_t* dy, int64_t rows, int64_t C, const scalar_t* a,
                                                      scalar_t* __restrict dx) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) dx[r * C + c] = dy[r * C + c] * a[c];
  }
}

// Per column c of `rows` rows of C columns (`C` apart): Σx, Σ(x − K_c), Σ(x − K_c)², added to S, D, Q.
template <typename scalar_t>
__attribute__((always_inline)) inline void add_rows_sums(const scalar_t* x, int64_t rows, int64_t C, const scalar_t* K,
                                                         double* __restrict S, double* __restrict D,
                                                         double* __restrict Q) {
  for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
    const int64_t r1 = std::min(rows, r0 + kBlockRows);
    int64_t c0 = 0;
    for (; c0 + kLanes <= C; c0 += kLanes) {
      scalar_t sum[kLanes] = {}, shifted[kLanes] = {}, shifted_sq[kLanes] = {};
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = x + r * C + c0;
#pragma GCC unroll 1  // a loop for the vectoriser (see above)
        for (int l = 0; l < kLanes; ++l) {
          const scalar_t v = row[l], d = v - K[c0 + l];
          sum[l] += v, shifted[l] += d, shifted_sq[l] += d * d;
        }
      }
#pragma GCC unroll 1
      for (int l = 0; l < kLanes; ++l) S[c0 + l] += sum[l], D[c0 + l] += shifted[l], Q[c0 + l] += shifted_sq[l];
    }
    for (int64_t c = c0; c < C; ++c) {  // the columns past the last full group
      scalar_t sum = 0, shifted = 0, shifted_sq = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t v = x[r * C + c], d = v - K[c];
        sum += v, shifted += d, shifted_sq += d * d;
      }
      S[c] += sum, D[c] += shifted, Q[c] += shifted_sq;
    }
  }
}

// Per column c of `rows` rows of C columns: Σδy and Σδy·(x − μ_c), added to Sd, Sx; with dx (eval
// mode), δx = δy·a_c written in the same pass.
template <typename scalar_t>
__attribute__((always_inline)) inline void add_rows_delta_sums(const scalar_t* dy, const scalar_t* x, int64_t rows,
                                                               int64_t C, const scalar_t* mu, double* __restrict Sd,
                                                               double* __restrict Sx, scalar_t* dx, const scalar_t* a) {
  for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
    const int64_t r1 = std::min(rows, r0 + kBlockRows);
    int64_t c0 = 0;
    for (; c0 + kLanes <= C; c0 += kLanes) {
      scalar_t s_dy[kLanes] = {}, s_dy_xmu[kLanes] = {};
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t *d_row = dy + r * C + c0, *x_row = x + r * C + c0;
#pragma GCC unroll 1  // a loop for the vectoriser (see above)
        for (int l = 0; l < kLanes; ++l) s_dy[l] += d_row[l], s_dy_xmu[l] += d_row[l] * (x_row[l] - mu[c0 + l]);
      }
#pragma GCC unroll 1
      for (int l = 0; l < kLanes; ++l) Sd[c0 + l] += s_dy[l], Sx[c0 + l] += s_dy_xmu[l];
    }
    for (int64_t c = c0; c < C; ++c) {  // the columns past the last full group
      scalar_t s_dy = 0, s_dy_xmu = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t d = dy[r * C + c];
        s_dy += d, s_dy_xmu += d * (x[r * C + c] - mu[c]);
      }
      Sd[c] += s_dy, Sx[c] += s_dy_xmu;
    }
    if (dx) rows_scale(dy + r0 * C, r1 - r0, C, a, dx + r0 * C);  // the block's rows, still in cache
  }
}

// NCHW: Σx, Σ(x − K), Σ(x − K)² of one channel, its n planes of P contiguous entries `stride` apart,
// each plane as rows of kLanes entries (a block may run on from one plane into the next; a
// plane's last P mod kLanes entries are added in double on their own).
template <typename scalar_t>
__attribute__((always_inline)) inline ShiftedSums planes_sums(const scalar_t* x, int64_t n, int64_t P, int64_t stride,
                                                              scalar_t K) {
  double sum[kLanes] = {}, shifted[kLanes] = {}, shifted_sq[kLanes] = {};
  scalar_t b_sum[kLanes] = {}, b_shifted[kLanes] = {}, b_shifted_sq[kLanes] = {};  // the block's
  auto end_block = [&] {
    for (int l = 0; l < kLanes; ++l) {
      sum[l] += b_sum[l], shifted[l] += b_shifted[l], shifted_sq[l] += b_shifted_sq[l];
      b_sum[l] = b_shifted[l] = b_shifted_sq[l] = 0;
    }
  };
  ShiftedSums s;
  const int64_t rows = P / kLanes;
  int64_t in_block = 0;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* plane = x + i * stride;
    for (int64_t r = 0; r < rows; ++r) {
#pragma GCC unroll 1  // a loop for the vectoriser (see above)
      for (int l = 0; l < kLanes; ++l) {
        const scalar_t v = plane[r * kLanes + l], d = v - K;
        b_sum[l] += v, b_shifted[l] += d, b_shifted_sq[l] += d * d;
      }
      if (++in_block == kBlockRows) end_block(), in_block = 0;
    }
    for (int64_t p = rows * kLanes; p < P; ++p) s.add(plane[p], K);
  }
  end_block();
  for (int l = 0; l < kLanes; ++l) s.merge({sum[l], shifted[l], shifted_sq[l]});
  return s;
}

// NCHW: Σδy and Σδy·(x − μ) of one channel, its n planes of P contiguous entries `stride` apart
// (rows and blocks as planes_sums); with dx (eval mode), δx = δy·a written in the same pass.
template <typename scalar_t>
__attribute__((always_inline)) inline std::pair<double, double> planes_delta_sums(const scalar_t* dy, const scalar_t* x,
                                                                                  int64_t n, int64_t P, int64_t stride,
                                                                                  scalar_t mu, scalar_t* dx, scalar_t a) {
  double s_dy[kLanes] = {}, s_dy_xmu[kLanes] = {};
  scalar_t b_dy[kLanes] = {}, b_dy_xmu[kLanes] = {};  // the block's
  auto end_block = [&] {
    for (int l = 0; l < kLanes; ++l) s_dy[l] += b_dy[l], s_dy_xmu[l] += b_dy_xmu[l], b_dy[l] = b_dy_xmu[l] = 0;
  };
  double total_dy = 0, total_dy_xmu = 0;
  const int64_t rows = P / kLanes;
  int64_t in_block = 0;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t *d_plane = dy + i * stride, *x_plane = x + i * stride;
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t *d_row = d_plane + r * kLanes, *x_row = x_plane + r * kLanes;
#pragma GCC unroll 1  // a loop for the vectoriser (see above)
      for (int l = 0; l < kLanes; ++l) b_dy[l] += d_row[l], b_dy_xmu[l] += d_row[l] * (x_row[l] - mu);
      if (++in_block == kBlockRows) end_block(), in_block = 0;
    }
    for (int64_t p = rows * kLanes; p < P; ++p) {
      total_dy += d_plane[p], total_dy_xmu += static_cast<double>(d_plane[p]) * (x_plane[p] - mu);
    }
    if (dx) {  // eval: δx = δy·a, the plane still in cache
      scalar_t* __restrict out = dx + i * stride;
      for (int64_t p = 0; p < P; ++p) out[p] = d_plane[p] * a;
    }
  }
  end_block();
  for (int l = 0; l < kLanes; ++l) total_dy += s_dy[l], total_dy_xmu += s_dy_xmu[l];
  return {total_dy, total_dy_xmu};
}

// Rows [first, last) of chunk k of `chunks` (NHWC: a thread's share, with its own partial sums).
std::pair<int64_t, int64_t> chunk_rows(int64_t rows, int64_t chunks, int64_t k) {
  return {rows * k / chunks, rows * (k + 1) / chunks};
}

// ---------------------------------------------------------------------------------------------
// Statistics

template <typename scalar_t>
void statistics_kernel(const scalar_t* x, const Map& m, scalar_t* mean, scalar_t* var) {
  const int64_t count = m.entries();
  if (count == 0) {  // no entries: 0/0, as the plain sums give
    for (int64_t c = 0; c < m.C; ++c) mean[c] = var[c] = std::numeric_limits<scalar_t>::quiet_NaN();
    return;
  }
  auto finish = [&](int64_t c, const ShiftedSums& s) {
    const auto [mu, v] = mean_and_var(s, count);
    mean[c] = static_cast<scalar_t>(mu);
    var[c] = static_cast<scalar_t>(v);
  };
  if (!m.nhwc) {
    at::parallel_for(0, m.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const scalar_t K = x[c * m.P];  // the channel's first entry
        finish(c, run_for_cpu([&] { return planes_sums(x + c * m.P, m.n, m.P, m.C * m.P, K); }));
      }
    });
    return;
  }
  // per chunk of rows, the three sums of every channel in separate arrays, added in chunk order
  const int64_t rows = m.entries(), chunks = row_chunks(rows), C = m.C;
  const scalar_t* K = x;  // K_c = pixel 0's value of channel c
  std::vector<double> sum(chunks * C, 0.0), shifted(chunks * C, 0.0), shifted_sq(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto [first, last] = chunk_rows(rows, chunks, k);
      run_for_cpu([&] {
        add_rows_sums(x + first * C, last - first, C, K, sum.data() + k * C, shifted.data() + k * C,
                      shifted_sq.data() + k * C);
      });
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    ShiftedSums total;
    for (int64_t k = 0; k < chunks; ++k) {
      total.merge({sum[k * C + c], shifted[k * C + c], shifted_sq[k * C + c]});
    }
    finish(c, total);
  }
}

// ---------------------------------------------------------------------------------------------
// y = x·a_c + b_c (the apply step)

template <typename scalar_t>
void channel_affine_kernel(const scalar_t* x, const Map& m, const scalar_t* a, const scalar_t* b,
                           scalar_t* y) {
  if (!m.nhwc) {
    at::parallel_for(0, m.n * m.C, 1, [&](int64_t begin, int64_t end) {
      run_for_cpu([&] {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t c = plane % m.C;
          run_affine(x + plane * m.P, m.P, a[c], b[c], y + plane * m.P);
        }
      });
    });
    return;
  }
  // each thread the rows whose statistics it summed, in memory order (see the top)
  const int64_t rows = m.entries(), chunks = row_chunks(rows), C = m.C;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto [first, last] = chunk_rows(rows, chunks, k);
      run_for_cpu([&] { rows_affine(x + first * C, last - first, C, a, b, y + first * C); });
    }
  });
}

// a_c = γ_c·σ⁻¹_c, b_c = β_c − μ_c·a_c (γ = 1, β = 0 when absent), in double, rounded once.
template <typename scalar_t>
void affine_coefficients(const at::Tensor& mean, const at::Tensor& invstd,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         std::vector<scalar_t>& a, std::vector<scalar_t>& b) {
  const int64_t C = mean.size(0);
  const scalar_t* mu = mean.const_data_ptr<scalar_t>();
  const scalar_t* is = invstd.const_data_ptr<scalar_t>();
  const scalar_t* g = weight ? weight->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* be = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
  a.resize(C), b.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t ac = g ? static_cast<scalar_t>(g[c] * is[c]) : is[c];
    a[c] = ac;
    b[c] = (be ? be[c] : scalar_t(0)) - mu[c] * ac;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// Σδy and Σ δy·x̂ of one channel.
struct DeltaSums {
  double dy = 0, dy_xhat = 0;
};

// (Σδy, Σδy·x̂) from Σδy and Σδy·(x − μ): Σδy·x̂ = σ⁻¹·Σδy·(x − μ), as torch scales its dot product
// (no entries: 0, whatever σ⁻¹ is).
DeltaSums delta_sums_of(double s_dy, double s_dy_xmu, double is, int64_t count) {
  return {s_dy, count == 0 ? 0.0 : s_dy_xmu * is};
}

// training: δx = (δy − Σδy/N − (x − μ)·σ⁻¹·Σ(δy·x̂)/N)·γσ⁻¹
//   (the derived formula with x̂ = (x − μ)·σ⁻¹), as (x − μ)·u_c + δy·v_c + w_c: u_c, v_c, w_c of channel c.
template <typename scalar_t>
void grad_input_coefficients(const DeltaSums& s, int64_t count, double is, double gamma, scalar_t& u, scalar_t& v,
                             scalar_t& w) {
  const double scale = gamma * is;
  const double k = s.dy_xhat * is / count, mean_dy = s.dy / count;
  u = static_cast<scalar_t>(-k * scale);
  v = static_cast<scalar_t>(scale);
  w = static_cast<scalar_t>(-mean_dy * scale);
}

// The backward's sums Σδy, Σδy·x̂ = σ⁻¹·Σδy·(x − μ) per channel, and δx: in eval mode δx = δy·a_c
// (a_c = γ_c·σ⁻¹_c) written in the pass that sums; in training the derived formula, in a second
// pass (NCHW: right after the channel's sums, while its planes are still in cache).
template <typename scalar_t>
std::vector<DeltaSums> backward_kernel(const scalar_t* dy, const scalar_t* x, const Map& m, const scalar_t* mean,
                                       const scalar_t* invstd, const scalar_t* weight, bool training, scalar_t* dx) {
  const int64_t count = m.entries(), C = m.C;
  std::vector<scalar_t> a(C);
  for (int64_t c = 0; c < C; ++c) a[c] = weight ? static_cast<scalar_t>(weight[c] * invstd[c]) : invstd[c];
  auto gamma = [&](int64_t c) { return weight ? static_cast<double>(weight[c]) : 1.0; };
  std::vector<DeltaSums> sums(C);
  if (!m.nhwc) {
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t first = c * m.P, stride = C * m.P;  // plane (0, c), and from one sample to the next
        const auto [s_dy, s_dy_xmu] = run_for_cpu([&] {
          return planes_delta_sums(dy + first, x + first, m.n, m.P, stride, mean[c],
                                   training ? nullptr : dx + first, a[c]);
        });
        sums[c] = delta_sums_of(s_dy, s_dy_xmu, invstd[c], count);
        if (!training || count == 0) continue;
        scalar_t u, v, w;
        grad_input_coefficients(sums[c], count, invstd[c], gamma(c), u, v, w);
        run_for_cpu([&] {
          for (int64_t i = 0; i < m.n; ++i) {
            const int64_t offset = first + i * stride;
            run_grad_input(dy + offset, x + offset, m.P, mean[c], u, v, w, dx + offset);
          }
        });
      }
    });
    return sums;
  }
  // per chunk of rows, Σδy and Σδy·(x − μ) of every channel in separate arrays, added in chunk order
  const int64_t rows = count, chunks = row_chunks(rows);
  std::vector<double> s_dy(chunks * C, 0.0), s_dy_xmu(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto [first, last] = chunk_rows(rows, chunks, k);
      run_for_cpu([&] {
        add_rows_delta_sums(dy + first * C, x + first * C, last - first, C, mean, s_dy.data() + k * C,
                            s_dy_xmu.data() + k * C, training ? nullptr : dx + first * C, a.data());
      });
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double total_dy = 0, total_dy_xmu = 0;
    for (int64_t k = 0; k < chunks; ++k) total_dy += s_dy[k * C + c], total_dy_xmu += s_dy_xmu[k * C + c];
    sums[c] = delta_sums_of(total_dy, total_dy_xmu, invstd[c], count);
  }
  if (!training || count == 0) return sums;
  std::vector<scalar_t> u(C), v(C), w(C);
  for (int64_t c = 0; c < C; ++c) grad_input_coefficients(sums[c], count, invstd[c], gamma(c), u[c], v[c], w[c]);
  // each thread the rows it summed, in memory order (see the top)
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto [first, last] = chunk_rows(rows, chunks, k);
      run_for_cpu([&] {
        rows_grad_input(dy + first * C, x + first * C, last - first, C, mean, u.data(), v.data(), w.data(),
                        dx + first * C);
      });
    }
  });
  return sums;
}

// ---------------------------------------------------------------------------------------------
// Operators

std::tuple<at::Tensor, at::Tensor> batch_norm_statistics(const at::Tensor& input) {
  const char* op = "batch_norm_statistics";
  check_map(input, op, "input");
  const bool nhwc = is_channels_last(input);
  const at::Tensor x = dense_map(input, nhwc);
  at::Tensor mean = manualconv::empty({input.size(1)}, input.options());
  at::Tensor var = manualconv::empty({input.size(1)}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_batch_norm_statistics", [&] {
    statistics_kernel(x.const_data_ptr<scalar_t>(), map_of(x, nhwc), mean.data_ptr<scalar_t>(),
                      var.data_ptr<scalar_t>());
  });
  return {mean, var};
}

at::Tensor batch_norm_apply(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias) {
  const char* op = "batch_norm_apply";
  check_map(input, op, "input");
  const bool nhwc = is_channels_last(input);
  const at::Tensor x = dense_map(input, nhwc);
  const at::Tensor mu = channel_vector(mean, input, op, "mean");
  const at::Tensor is = channel_vector(invstd, input, op, "invstd");
  std::optional<at::Tensor> g, b;
  if (weight && weight->defined()) g = channel_vector(*weight, input, op, "weight");
  if (bias && bias->defined()) b = channel_vector(*bias, input, op, "bias");
  at::Tensor y = output_like(x, nhwc);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_batch_norm_apply", [&] {
    std::vector<scalar_t> a, shift;
    affine_coefficients<scalar_t>(mu, is, g, b, a, shift);
    channel_affine_kernel(x.const_data_ptr<scalar_t>(), map_of(x, nhwc), a.data(), shift.data(),
                          y.data_ptr<scalar_t>());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool training) {
  const char* op = "batch_norm_backward";
  check_map(input, op, "input");
  check_map(grad_output, op, "grad_output");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), op, ": grad_output must have the input's size ",
              input.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op,
              ": grad_output must have the input's dtype");
  const bool nhwc = is_channels_last(input);
  const at::Tensor x = dense_map(input, nhwc), dy = dense_map(grad_output, nhwc);
  const at::Tensor mu = channel_vector(mean, input, op, "mean");
  const at::Tensor is = channel_vector(invstd, input, op, "invstd");
  std::optional<at::Tensor> g;
  if (weight && weight->defined()) g = channel_vector(*weight, input, op, "weight");
  const int64_t C = input.size(1);
  at::Tensor grad_input = output_like(x, nhwc);
  at::Tensor grad_weight = manualconv::empty({C}, input.options()), grad_bias = manualconv::empty({C}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_batch_norm_backward", [&] {
    const Map m = map_of(x, nhwc);
    const scalar_t* mu_p = mu.const_data_ptr<scalar_t>();
    const scalar_t* is_p = is.const_data_ptr<scalar_t>();
    const scalar_t* g_p = g ? g->const_data_ptr<scalar_t>() : nullptr;
    const std::vector<DeltaSums> sums =
        backward_kernel(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), m, mu_p, is_p, g_p, training,
                        grad_input.data_ptr<scalar_t>());
    scalar_t* gw = grad_weight.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      gw[c] = static_cast<scalar_t>(sums[c].dy_xhat);  // Σ δy·x̂
      gb[c] = static_cast<scalar_t>(sums[c].dy);       // Σ δy
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def("batch_norm_statistics(Tensor input) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_apply(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias) "
      "-> Tensor");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, bool training) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("batch_norm_statistics", &manualconv::batch_norm_statistics);
  m.impl("batch_norm_apply", &manualconv::batch_norm_apply);
  m.impl("batch_norm_backward", &manualconv::batch_norm_backward);
}
