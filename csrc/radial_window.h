// The radial projection W e(d) + b on a window of centres (spec §4, §14): the rule shared by the
// fused CPU ops (message_passing_cpu*, lattice_message_cpu*). Its readable twin, with the
// derivation of the bound, is e3relax_fast/reference/radial_window.py; both choose the same window.
//
// e_k(d) = u(x) exp(coeff (x - mu_k)^2), x = d / cutoff. The Gaussians are as wide as their
// spacing, so a centre m spacings from x contributes exp(-m^2/2) of its peak: only the 2K+1
// centres nearest x matter. With the centres within `deviation` of a uniform grid mu_0 + k s,
// the window of x is [k0 - K, k0 + K], k0 = round((x - mu_0) / s), shifted inside [0, R) at the
// ends of the range (it then still holds every centre within K of k0). K is the smallest whose
// dropped Gaussians sum to at most kTailTarget of one peak (K = 7, 15 centres, for the model's
// basis). For x >= 1 the envelope is 0 and the projection is exactly the bias (no window).
// A basis without such a window (non-uniform centres, too few or too wide) is evaluated exactly:
// the "window" is then every centre.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace e3cpu {

constexpr double kTailTarget = 1e-12;   // reference/radial_window.py TAIL_TARGET
constexpr double kMaxDeviation = 0.25;  // reference/radial_window.py MAX_DEVIATION

struct RadialWindow {
  int64_t num_rbf = 0;
  int64_t size = 0;        // centres per window (num_rbf when exact)
  int64_t halfwidth = -1;  // K; -1: exact (the window is every centre)
  double first = 0.0, spacing = 1.0;
  double tail = 0.0;       // bound on the dropped Gaussians' sum (0 when exact)
};

// Largest sum of the Gaussians outside a window of half-width K (x within s/2 of the grid point
// k0; the centres m > K steps away on each side), as reference/radial_window.py tail_bound.
inline double tail_bound(int64_t K, double spacing, double deviation, double coeff) {
  double total = 0.0;
  for (int64_t m = K + 1;; ++m) {
    const double near = std::max((m - 0.5) * spacing - deviation, 0.0);
    const double far = (m + 0.5) * spacing - deviation;
    const double term = std::exp(coeff * near * near) + std::exp(coeff * far * far);
    total += term;
    if (term < 1e-30 * total || term == 0.0) return total;
  }
}

// The window of a basis (centres as doubles), or the exact evaluation when `exact` is asked or no
// window narrower than all the centres bounds the dropped terms by kTailTarget.
inline RadialWindow make_window(const double* centres, int64_t R, double coeff, bool exact) {
  RadialWindow w;
  w.num_rbf = R;
  w.size = R;
  if (exact || R < 2 || !(coeff < 0.0)) return w;
  const double spacing = (centres[R - 1] - centres[0]) / (double)(R - 1);
  if (!(spacing > 0.0)) return w;
  double deviation = 0.0;
  for (int64_t k = 0; k < R; ++k) deviation = std::max(deviation, std::fabs(centres[k] - (centres[0] + spacing * k)));
  if (!(deviation <= kMaxDeviation * spacing)) return w;
  for (int64_t K = 0; 2 * K + 1 < R; ++K) {
    const double tail = tail_bound(K, spacing, deviation, coeff);
    if (tail <= kTailTarget) {
      w.halfwidth = K;
      w.size = 2 * K + 1;
      w.first = centres[0];
      w.spacing = spacing;
      w.tail = tail;
      return w;
    }
  }
  return w;
}

// First centre of the window of scaled distance x (0 when exact). NaN gives 0 (its values are NaN).
inline int64_t window_start(const RadialWindow& w, double x) {
  if (w.halfwidth < 0) return 0;
  double t = std::nearbyint((x - w.first) / w.spacing);  // half to even, as torch.round
  if (!(t >= 0.0)) t = 0.0;
  t = std::min(t, (double)w.num_rbf);
  return std::clamp((int64_t)t - w.halfwidth, (int64_t)0, w.num_rbf - w.size);
}

// Polynomial envelope of exponent 5: 1 - 21 x^5 + 35 x^6 - 15 x^7 for x < 1, else 0.
template <class T>
inline T envelope(T x) {
  const T xp = x * x * x * x * x;
  const T u = (((T)1 + (T)-21 * xp) + ((T)35 * xp) * x) + (((T)-15 * xp) * x) * x;
  return x < (T)1 ? u : (T)0;
}

// The window's basis values env * exp(coeff (x - mu_{start + m})^2), m < w.size (scalar exp).
template <class T>
inline void window_values(const RadialWindow& w, const T* centres, T coeff, T x, T env, int64_t start, T* out) {
  for (int64_t m = 0; m < w.size; ++m) {
    const T t = x - centres[start + m];
    out[m] = env * std::exp(coeff * (t * t));
  }
}

}  // namespace e3cpu
