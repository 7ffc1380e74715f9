// AVX-512 path of backend `cpu` of the lattice -> atom message op, chosen by the launcher
// (lattice_message_cpu.cpp) when the CPU has AVX-512 (Path::Portable forces the portable loop):
// per block of 16 (8) channels, the three gate vectors accumulate the window's WT rows with FMAs.

#include "fused_cpu_avx512.h"

namespace e3cpu {

#ifdef E3CPU_AVX512_PATH
namespace {

template <class T>
E3CPU_AVX512 void channels(const Kernel<T>& k, int64_t atom, const T* dir, int64_t start, const T* values,
                           int64_t size, T* ds, T* v_out) {
  using V = Vec<T>;
  const int64_t H = k.hidden, C = 3 * H;
  const T* x = k.x_proj + C * atom;
  const T* v = k.vec + C * atom;
  const typename V::V d0 = V::set1(dir[0]), d1 = V::set1(dir[1]), d2 = V::set1(dir[2]);
  const typename V::V ss = V::set1(k.scale_s), sv = V::set1(k.scale_v);
  for (int64_t c0 = 0; c0 < H; c0 += V::kLanes) {
    const auto mask = V::mask(H - c0);
    typename V::V g0 = V::load(k.bias + c0, mask), g1 = V::load(k.bias + H + c0, mask),
                  g2 = V::load(k.bias + 2 * H + c0, mask);
    const T* wr = k.wt + (start >= 0 ? start : 0) * C + c0;
    for (int64_t r = 0; start >= 0 && r < size; ++r, wr += C) {
      const typename V::V f = V::set1(values[r]);
      g0 = V::fma(V::load(wr, mask), f, g0);
      g1 = V::fma(V::load(wr + H, mask), f, g1);
      g2 = V::fma(V::load(wr + 2 * H, mask), f, g2);
    }
    const typename V::V p1 = V::mul(V::load(x + c0, mask), g0), p2 = V::mul(V::load(x + H + c0, mask), g1);
    V::store(ds + c0, V::mul(V::mul(V::load(x + 2 * H + c0, mask), g2), ss), mask);
    V::store(v_out + c0, V::mul(V::fma(p1, V::load(v + c0, mask), V::mul(d0, p2)), sv), mask);
    V::store(v_out + H + c0, V::mul(V::fma(p1, V::load(v + H + c0, mask), V::mul(d1, p2)), sv), mask);
    V::store(v_out + 2 * H + c0, V::mul(V::fma(p1, V::load(v + 2 * H + c0, mask), V::mul(d2, p2)), sv), mask);
  }
}

}  // namespace

void lattice_channels_avx512(const Kernel<float>& k, int64_t atom, const float* dir, int64_t start,
                             const float* values, int64_t size, float* ds, float* v_out) {
  channels(k, atom, dir, start, values, size, ds, v_out);
}
void lattice_channels_avx512(const Kernel<double>& k, int64_t atom, const double* dir, int64_t start,
                             const double* values, int64_t size, double* ds, double* v_out) {
  channels(k, atom, dir, start, values, size, ds, v_out);
}
#endif  // E3CPU_AVX512_PATH

}  // namespace e3cpu
