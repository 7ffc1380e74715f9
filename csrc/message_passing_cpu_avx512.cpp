// AVX-512 path of backend `cpu` of the atom–atom message op (fused_cpu.h describes the layout),
// chosen by the launcher (message_passing_cpu.cpp) when the CPU has AVX-512; Path::Portable forces
// the portable loop so that the tests compare both with the reference. Differences from the
// portable path: the window's Gaussians in one vector exp (Vec<T>::exp), and the gates of a
// whole tile (3 kTile vectors) kept in registers while each WT row is loaded once, with FMAs.

#include "fused_cpu_avx512.h"

namespace e3cpu {

#ifdef E3CPU_AVX512_PATH
namespace {

template <class T>
E3CPU_AVX512 void values(const RadialWindow& w, const T* centres, T coeff, T x, T env, int64_t start, T* out) {
  using V = Vec<T>;
  for (int64_t m = 0; m < w.size; m += V::kLanes) {
    const auto mask = V::mask(w.size - m);
    const auto t = V::sub(V::set1(x), V::load(centres + start + m, mask));
    V::store(out + m, V::mul(V::set1(env), V::exp(V::mul(V::set1(coeff), V::mul(t, t)))), mask);
  }
}

// One block of up to V::kLanes channels [c0, c0 + n) of one receiver.
template <class T>
E3CPU_AVX512 inline void channel_block(const Kernel<T>& k, const Prepared<T>& p, int64_t c0, typename Vec<T>::M mask,
                                       T* ds, T* dv) {
  using V = Vec<T>;
  const int64_t H = k.hidden, C = 3 * H;
  const typename V::V b0 = V::load(k.bias + c0, mask), b1 = V::load(k.bias + H + c0, mask),
                      b2 = V::load(k.bias + 2 * H + c0, mask);
  typename V::V as = V::zero(), a0 = V::zero(), a1 = V::zero(), a2 = V::zero();
  for (const Tile& t : p.tiles) {
    typename V::V g[kTile][3];
#pragma GCC unroll 8
    for (int q = 0; q < kTile; ++q) {
      g[q][0] = b0;
      g[q][1] = b1;
      g[q][2] = b2;
    }
    const T* wr = k.wt + t.kmin * C + c0;
    const T* gr = p.G.data() + t.g;
    for (int64_t r = 0; r < t.rows; ++r, wr += C, gr += kTile) {
      const typename V::V w0 = V::load(wr, mask), w1 = V::load(wr + H, mask), w2 = V::load(wr + 2 * H, mask);
#pragma GCC unroll 8
      for (int q = 0; q < kTile; ++q) {
        const typename V::V f = V::set1(gr[q]);
        g[q][0] = V::fma(w0, f, g[q][0]);
        g[q][1] = V::fma(w1, f, g[q][1]);
        g[q][2] = V::fma(w2, f, g[q][2]);
      }
    }
#pragma GCC unroll 8
    for (int q = 0; q < kTile; ++q) {
      if (q >= t.count) break;
      const int64_t e = t.first + q, j = p.src[e];
      const T* u = p.u.data() + 3 * e;
      const T* xj = k.x_proj + C * j + c0;
      const T* vj = k.vec + C * j + c0;
      const typename V::V p1 = V::mul(V::load(xj, mask), g[q][0]), p2 = V::mul(V::load(xj + H, mask), g[q][1]);
      as = V::fma(V::load(xj + 2 * H, mask), g[q][2], as);
      a0 = V::add(a0, V::fma(p1, V::load(vj, mask), V::mul(V::set1(u[0]), p2)));
      a1 = V::add(a1, V::fma(p1, V::load(vj + H, mask), V::mul(V::set1(u[1]), p2)));
      a2 = V::add(a2, V::fma(p1, V::load(vj + 2 * H, mask), V::mul(V::set1(u[2]), p2)));
    }
  }
  const typename V::V ss = V::set1(k.scale_s), sv = V::set1(k.scale_v);
  V::store(ds + c0, V::mul(as, ss), mask);
  V::store(dv + c0, V::mul(a0, sv), mask);
  V::store(dv + H + c0, V::mul(a1, sv), mask);
  V::store(dv + 2 * H + c0, V::mul(a2, sv), mask);
}

template <class T>
E3CPU_AVX512 void channels(const Kernel<T>& k, const Prepared<T>& p, T* ds, T* dv) {
  using V = Vec<T>;
  for (int64_t c0 = 0; c0 < k.hidden; c0 += V::kLanes) channel_block(k, p, c0, V::mask(k.hidden - c0), ds, dv);
}

}  // namespace

void window_values_avx512(const RadialWindow& w, const float* centres, float coeff, float x, float env,
                          int64_t start, float* out) {
  values(w, centres, coeff, x, env, start, out);
}
void window_values_avx512(const RadialWindow& w, const double* centres, double coeff, double x, double env,
                          int64_t start, double* out) {
  values(w, centres, coeff, x, env, start, out);
}
void message_channels_avx512(const Kernel<float>& k, const Prepared<float>& p, float* ds, float* dv) {
  channels(k, p, ds, dv);
}
void message_channels_avx512(const Kernel<double>& k, const Prepared<double>& p, double* ds, double* dv) {
  channels(k, p, ds, dv);
}
#endif  // E3CPU_AVX512_PATH

}  // namespace e3cpu
