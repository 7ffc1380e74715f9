// Backend `cpu` of the atom–atom message op (spec §6 Step B), forward: the launcher (threads over
// receivers, the preparation of each receiver's edges) and the portable channel loop. The AVX-512
// channel loop is in message_passing_cpu_avx512.cpp, the backward in message_passing_backward_cpu.cpp;
// fused_cpu.h describes the layout.

#include <cmath>
#include <limits>
#include <vector>

#include "fused_cpu.h"
#include "radius_graph_api.h"  // e3rg::cpu_simd_avx512

namespace e3cpu {

template <class T>
void message_channels_portable(const Kernel<T>& k, const Prepared<T>& p, T* ds, T* dv) {
  constexpr int L = 16;  // channels per block (the loops over l vectorise)
  const int64_t H = k.hidden, C = 3 * H;
  for (int64_t c0 = 0; c0 < H; c0 += L) {
    const int n = (int)std::min<int64_t>(L, H - c0);
    T as[L] = {}, av[3][L] = {};
    for (const Tile& t : p.tiles) {
      T g[kTile][3][L];
      for (int q = 0; q < t.count; ++q)
        for (int m = 0; m < 3; ++m)
          for (int l = 0; l < n; ++l) g[q][m][l] = k.bias[m * H + c0 + l];
      for (int64_t r = 0; r < t.rows; ++r) {
        const T* wr = k.wt + (t.kmin + r) * C + c0;
        const T* gr = p.G.data() + t.g + r * kTile;
        for (int q = 0; q < t.count; ++q) {
          const T f = gr[q];
          for (int m = 0; m < 3; ++m)
            for (int l = 0; l < n; ++l) g[q][m][l] += wr[m * H + l] * f;
        }
      }
      for (int q = 0; q < t.count; ++q) {
        const int64_t e = t.first + q, j = p.src[e];
        const T* u = p.u.data() + 3 * e;
        const T* xj = k.x_proj + C * j + c0;
        const T* vj = k.vec + C * j + c0;
        for (int l = 0; l < n; ++l) {
          const T p1 = xj[l] * g[q][0][l], p2 = xj[H + l] * g[q][1][l];
          as[l] += xj[2 * H + l] * g[q][2][l];
          av[0][l] += p1 * vj[l] + u[0] * p2;
          av[1][l] += p1 * vj[H + l] + u[1] * p2;
          av[2][l] += p1 * vj[2 * H + l] + u[2] * p2;
        }
      }
    }
    for (int l = 0; l < n; ++l) {
      ds[c0 + l] = as[l] * k.scale_s;
      for (int m = 0; m < 3; ++m) dv[m * H + c0 + l] = av[m][l] * k.scale_v;
    }
  }
}

namespace {

// Receiver i's edges into p (geometry, windows, tiles); false when its input is invalid.
template <class T>
bool prepare_receiver(const MessageArgs<T>& a, const RadialWindow& w, ValuesFn<T> values_fn, int64_t i,
                      Prepared<T>& p) {
  if (!receiver_valid(a, i)) return false;
  const int64_t beg = a.rowptr[i], n = a.rowptr[i + 1] - beg;
  p.src.resize(n);
  p.u.resize(3 * n);
  p.start.resize(n);
  p.values.resize(n * w.size);
  const T cutoff = (T)a.cutoff, coeff = (T)a.coeff;
  for (int64_t q = 0; q < n; ++q) {
    const int64_t e = beg + q, j = a.src[e], g = a.edge_graph[e];
    const T* cell = a.cells + 9 * g;
    const T o0 = (T)a.offsets[3 * e], o1 = (T)a.offsets[3 * e + 1], o2 = (T)a.offsets[3 * e + 2];
    T r[3], x;
    for (int c = 0; c < 3; ++c) r[c] = (a.pos[3 * j + c] + ((o0 * cell[c] + o1 * cell[3 + c]) + o2 * cell[6 + c])) -
                                       a.pos[3 * i + c];
    unit_and_x(r, cutoff, p.u.data() + 3 * q, x);
    p.src[q] = j;
    edge_window(w, values_fn, a.centres, coeff, x, p.start[q], p.values.data() + q * w.size);
  }
  make_tiles(w, p, n);
  return true;
}

template <class T>
int64_t run(const MessageArgs<T>& a, int num_threads, bool exact, Path path) {
  const int64_t H = a.hidden, R = a.num_rbf, C = 3 * H;
  std::vector<double> mu(a.centres, a.centres + R);
  const RadialWindow w = make_window(mu.data(), R, a.coeff, exact);
  // Reused across calls (one per calling thread): no allocation or page faults per call.
  static thread_local std::vector<T> wt;
  wt.resize((size_t)(R * C));
  transpose_weight(a.weight, a.w_stride_c, a.w_stride_r, C, R, wt.data());
  const Kernel<T> k{a.x_proj, a.vec, wt.data(), a.bias, H, (T)(1.0 / std::sqrt(3.0)),
                    (T)(1.0 / (std::sqrt(3.0) * std::sqrt((double)(H > 0 ? H : 1))))};
  ValuesFn<T> values_fn = &window_values<T>;
  void (*channels)(const Kernel<T>&, const Prepared<T>&, T*, T*) = &message_channels_portable<T>;
#ifdef E3CPU_AVX512_PATH
  if (path == Path::Auto && e3rg::cpu_simd_avx512()) {
    values_fn = &window_values_avx512;
    channels = &message_channels_avx512;
  }
#endif
  const int nt = threads_for((double)a.n_edges * (double)C * (double)w.size, num_threads);
  return parallel_chunks<Prepared<T>>(a.n_atoms, nt, [&](int64_t s, int64_t e, Prepared<T>& p) {
    int64_t bad = 0;
    for (int64_t i = s; i < e; ++i) {
      if (prepare_receiver(a, w, values_fn, i, p)) {
        channels(k, p, a.ds + H * i, a.dv + C * i);
      } else {
        std::fill(a.ds + H * i, a.ds + H * (i + 1), std::numeric_limits<T>::quiet_NaN());
        std::fill(a.dv + C * i, a.dv + C * (i + 1), std::numeric_limits<T>::quiet_NaN());
        ++bad;
      }
    }
    return bad;
  });
}

}  // namespace

int64_t message_passing(const MessageArgs<float>& a, int num_threads, bool exact, Path path) {
  return run(a, num_threads, exact, path);
}
int64_t message_passing(const MessageArgs<double>& a, int num_threads, bool exact, Path path) {
  return run(a, num_threads, exact, path);
}

}  // namespace e3cpu
