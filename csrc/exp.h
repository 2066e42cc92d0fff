// The float32 exponential of the elementwise kernels (gelu.cpp, activations.cpp), written out so
// that their loops vectorise lane by lane (no call into libm):
//
//   e^a (a ≤ 0): Cody–Waite reduction a = n·ln2 + r, |r| ≤ ½ln2, n = round(a/ln2), ln2 split in a
//     part exact in n·ln2_hi and a remainder (W. J. Cody, W. Waite, "Software Manual for the
//     Elementary Functions", 1980, ch. 6); e^r by a degree-6 polynomial E; 2ⁿ built in the exponent
//     bits. a < −87 gives 0 (the result would be below FLT_MIN, subnormal in torch: < 2e-38).
//   E is a minimax fit in relative error (Lawson's iteratively reweighted least squares on 4000
//     Chebyshev nodes of r, numpy float64, against exp; coefficients rounded to float32): fit
//     error 1.9e-9. Its first two coefficients are exactly 1, so e^r − 1 = r + r²·(E₂ + E₃r + …)
//     is the same polynomial less its first two terms: eˣ − 1 without the cancellation of
//     e^r − 1 for small r (ELU's α(eˣ − 1) near 0, as torch's expm1).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

namespace manualconv {

// c[0] + c[1]·t + … + c[N−1]·t^(N−1) by Horner's rule
template <size_t N>
inline float polynomial(const float (&c)[N], float t) {
  float acc = c[N - 1];
  for (size_t k = N - 1; k-- > 0;) acc = acc * t + c[k];
  return acc;
}

// E(r) ≈ e^r on |r| ≤ ½ln2 (E₀ = E₁ = 1)
constexpr float kExpPolynomial[] = {1.000000000e+00f, 1.000000000e+00f, 4.999999106e-01f, 1.666641980e-01f,
                                    4.166822508e-02f, 8.374815807e-03f, 1.383684226e-03f};
// (E(r) − 1 − r)/r² = E₂ + E₃r + …
constexpr float kExpm1Tail[] = {4.999999106e-01f, 1.666641980e-01f, 4.166822508e-02f, 8.374815807e-03f,
                                1.383684226e-03f};

// e^(a + a_lo) for a ≤ 0 (or NaN: NaN), a_lo a correction ≪ ulp(a) (the rounding error of a's
// product): a + a_lo = n·ln2 + r, 2ⁿ·E(r)
inline float exp_nonpositive(float a, float a_lo = 0.0f) {
  constexpr float kMin = -87.0f;                 // e^−87 = 1.6e-38: 2ⁿ stays normal (n ≥ −126)
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;          // 1.5·2²³: v + kRound rounds v to an integer
  constexpr float kLn2Hi = 0.693145751953125f;   // 0x3F317200: n·kLn2Hi is exact for |n| < 2⁸
  constexpr float kLn2Lo = 1.42860676533018704e-6f;
  const float b = a < kMin ? kMin : a;           // (NaN stays NaN)
  const float k = b * kLog2e + kRound;           // its low mantissa bits hold n
  const float n = k - kRound;
  const float r = ((b - n * kLn2Hi) - n * kLn2Lo) + a_lo;
  const uint32_t n_bits = std::bit_cast<uint32_t>(k) - std::bit_cast<uint32_t>(kRound);
  const float two_n = std::bit_cast<float>((n_bits + 127u) << 23);  // 2ⁿ
  const float e = polynomial(kExpPolynomial, r) * two_n;
  return a < kMin ? 0.0f : e;
}

// e^a − 1 for a ≤ 0 (or NaN: NaN): on −½ln2 ≤ a ≤ 0 (n = 0, r = a) a + a²·(E₂ + E₃a + …); below,
// e^a − 1 with e^a ≤ 1/√2 (a difference of at most a few ulp of its result, no cancellation)
inline float expm1_nonpositive(float a) {
  constexpr float kHalfLn2 = 0.346573590279972655f;
  const float near_zero = a + a * a * polynomial(kExpm1Tail, a);
  const float far = exp_nonpositive(a) - 1.0f;
  return a >= -kHalfLn2 ? near_zero : far;  // (NaN: far, NaN)
}

}  // namespace manualconv
