// Backend `cpu` of the lattice -> atom message op (spec §6 Steps 0 and A.1-3), forward only: the
// launcher (threads over atoms, each atom's geometry and window) and the portable channel loop; the
// AVX-512 loop is in lattice_message_cpu_avx512.cpp. For atom i of crystal g and lattice node k:
// q = C_g[k] - p~_i (p~_i = p_i - centres[g], or p_i), w = -q / |q|_safe, gate = W e(|q|) + b,
// ds_i = x3 g3 / sqrt 3 and v_out_i = (x1 g1 vec_i + w (x) x2 g2) / (sqrt 3 sqrt H) (not residual).
// The projection runs on the window of radial_window.h, or exactly (fused_cpu.h).

#include <cmath>
#include <limits>
#include <vector>

#include "fused_cpu.h"
#include "radius_graph_api.h"  // e3rg::cpu_simd_avx512

namespace e3cpu {

template <class T>
void lattice_channels_portable(const Kernel<T>& k, int64_t atom, const T* dir, int64_t start, const T* values,
                               int64_t size, T* ds, T* v_out) {
  constexpr int L = 16;  // channels per block (the loops over l vectorise)
  const int64_t H = k.hidden, C = 3 * H;
  const T* x = k.x_proj + C * atom;
  const T* v = k.vec + C * atom;
  for (int64_t c0 = 0; c0 < H; c0 += L) {
    const int n = (int)std::min<int64_t>(L, H - c0);
    T g[3][L];
    for (int m = 0; m < 3; ++m)
      for (int l = 0; l < n; ++l) g[m][l] = k.bias[m * H + c0 + l];
    for (int64_t r = 0; start >= 0 && r < size; ++r) {
      const T* wr = k.wt + (start + r) * C + c0;
      for (int m = 0; m < 3; ++m)
        for (int l = 0; l < n; ++l) g[m][l] += wr[m * H + l] * values[r];
    }
    for (int l = 0; l < n; ++l) {
      const T p1 = x[c0 + l] * g[0][l], p2 = x[H + c0 + l] * g[1][l];
      ds[c0 + l] = x[2 * H + c0 + l] * g[2][l] * k.scale_s;
      for (int m = 0; m < 3; ++m) v_out[m * H + c0 + l] = (p1 * v[m * H + c0 + l] + dir[m] * p2) * k.scale_v;
    }
  }
}

namespace {

template <class T>
int64_t run(const LatticeArgs<T>& a, int num_threads, bool exact, Path path) {
  const int64_t H = a.hidden, R = a.num_rbf, C = 3 * H;
  std::vector<double> mu(a.rbf_centres, a.rbf_centres + R);
  const RadialWindow w = make_window(mu.data(), R, a.coeff, exact);
  static thread_local std::vector<T> wt;  // reused across calls (see message_passing_cpu.cpp)
  wt.resize((size_t)(R * C));
  transpose_weight(a.weight, a.w_stride_c, a.w_stride_r, C, R, wt.data());
  const Kernel<T> k{a.x_proj, a.vec, wt.data(), a.bias, H, (T)(1.0 / std::sqrt(3.0)),
                    (T)(1.0 / (std::sqrt(3.0) * std::sqrt((double)(H > 0 ? H : 1))))};
  ValuesFn<T> values_fn = &window_values<T>;
  void (*channels)(const Kernel<T>&, int64_t, const T*, int64_t, const T*, int64_t, T*, T*) =
      &lattice_channels_portable<T>;
#ifdef E3CPU_AVX512_PATH
  if (path == Path::Auto && e3rg::cpu_simd_avx512()) {
    values_fn = &window_values_avx512;
    channels = &lattice_channels_avx512;
  }
#endif
  const T cutoff = (T)a.cutoff, coeff = (T)a.coeff;
  const int nt = threads_for((double)a.n_atoms * (double)C * (double)w.size, num_threads);
  return parallel_chunks<std::vector<T>>(a.n_atoms, nt, [&](int64_t s, int64_t e, std::vector<T>& vals) {
    vals.resize((size_t)w.size);
    int64_t bad = 0;
    for (int64_t i = s; i < e; ++i) {
      const int64_t g = a.graph_index[i];
      if (g < 0 || g >= a.n_graphs) {
        std::fill(a.ds + H * i, a.ds + H * (i + 1), std::numeric_limits<T>::quiet_NaN());
        std::fill(a.v_out + C * i, a.v_out + C * (i + 1), std::numeric_limits<T>::quiet_NaN());
        ++bad;
        continue;
      }
      T q[3], dir[3], x;
      for (int c = 0; c < 3; ++c) {
        const T p = a.centres ? a.pos[3 * i + c] - a.centres[3 * g + c] : a.pos[3 * i + c];
        q[c] = a.cells[9 * g + 3 * a.k + c] - p;
      }
      unit_and_x(q, cutoff, dir, x);
      int64_t start;
      edge_window(w, values_fn, a.rbf_centres, coeff, x, start, vals.data());
      channels(k, i, dir, start, vals.data(), w.size, a.ds + H * i, a.v_out + C * i);
    }
    return bad;
  });
}

}  // namespace

int64_t lattice_message(const LatticeArgs<float>& a, int num_threads, bool exact, Path path) {
  return run(a, num_threads, exact, path);
}
int64_t lattice_message(const LatticeArgs<double>& a, int num_threads, bool exact, Path path) {
  return run(a, num_threads, exact, path);
}

}  // namespace e3cpu
