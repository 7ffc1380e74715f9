// Backend `cpu` of the atom–atom message op, backward (training): the gradients of the outputs of
// e3relax_fast/reference/message_passing.py with respect to all its float inputs. Nothing E-sized is
// saved by the forward: each edge's geometry, window and gate are computed again from the inputs.
//
// Per edge e = (j -> i), with s3 = 1/sqrt 3, sH = 1/sqrt H, gate = W f(d) + b and the three channel
// blocks b_k = x_j,k * gate_k * s3 (k = 1, 2, 3) of the forward (fused_cpu.h):
//   gb1 = sH sum_xyz gdv_i * v_j      gb2 = sH sum_xyz gdv_i * u      gb3 = gds_i
//   gvec_j += sH gdv_i * b1           gu = sH sum_c gdv_i * b2
//   gx_j += gb * gate * s3            ggate = gb * x_j * s3
//   gbias += ggate    gW += ggate f^T    gf = W^T ggate    gd = (gf . df/dx) / cutoff
// and through the geometry (r = p_j + o C_g - p_i, d = |r| with its square clamped below at 1e-8,
// where no gradient flows through d, u = -r / d):
//   gr = (gd + (gu . r) / d^2) r / d - gu / d;  gpos_j += gr, gpos_i -= gr, gcell_g += o (x) gr.
//
// One thread, edges in receiver order: the sums into the source atoms and into W do not depend on
// any thread count (training runs one thread per process). The radial projection uses the forward's
// window (radial_window.h: the derivatives of the dropped Gaussians are as negligible as they are),
// or every centre when `exact`. Channel loops are written for the compiler to vectorise; reductions
// over channels keep kLanes partial sums, added in a fixed order. The AVX-512 path is the same code
// compiled for AVX-512 (the whole body inlined into a function with that target): the lanes and the
// order of every sum are the source's, and no multiply-add is contracted (-ffp-contract=off), so
// both paths give the same bits.

#include <cmath>
#include <vector>

#include "fused_cpu.h"
#include "radius_graph_api.h"  // e3rg::cpu_simd_avx512

namespace e3cpu {

namespace {

// Inlined into each path's entry point, so that the AVX-512 one compiles the whole body for its target.
#define E3CPU_INLINE inline __attribute__((always_inline))

constexpr int kLanes = 16;  // partial sums of a channel reduction (independent adds the compiler vectorises)

// sum_c a[c] * b[c] over n channels, in kLanes partial sums then in lane order.
template <class T>
E3CPU_INLINE T dot(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[c + l] * b[c + l];
  for (int l = 0; c < n; ++c, ++l) acc[l] += a[c] * b[c];
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// d/dx of the envelope 1 - 21 x^5 + 35 x^6 - 15 x^7 (radial_window.h envelope), 0 from x = 1 on.
template <class T>
E3CPU_INLINE T envelope_derivative(T x) {
  const T x4 = x * x * x * x;
  return x < (T)1 ? (((T)-105 * x4 + (T)210 * x4 * x) + (T)-105 * x4 * x * x) : (T)0;
}

// What one edge needs besides the inputs: its window's values f and derivatives df/dx, the gate
// and the gradients of the gate and of the basis.
template <class T>
struct Scratch {
  std::vector<T> f, df, gate, ggate, b2;
};

template <class T>
struct Edge {
  int64_t j, g;
  T r[3], u[3], d;
  bool clamped;  // |r|^2 below the clamp: d is a constant there
  int64_t start;  // first centre of the window, -1: none (x >= 1, the gate is the bias)
};

// Geometry and window of edge e (f, df filled for the window).
template <class T>
E3CPU_INLINE Edge<T> edge_geometry(const MessageArgs<T>& a, const RadialWindow& w, int64_t e, int64_t i, Scratch<T>& s) {
  Edge<T> ed;
  ed.j = a.src[e];
  ed.g = a.edge_graph[e];
  const T* cell = a.cells + 9 * ed.g;
  const T o0 = (T)a.offsets[3 * e], o1 = (T)a.offsets[3 * e + 1], o2 = (T)a.offsets[3 * e + 2];
  for (int c = 0; c < 3; ++c)
    ed.r[c] = (a.pos[3 * ed.j + c] + ((o0 * cell[c] + o1 * cell[3 + c]) + o2 * cell[6 + c])) - a.pos[3 * i + c];
  T sq = (ed.r[0] * ed.r[0] + ed.r[1] * ed.r[1]) + ed.r[2] * ed.r[2];
  ed.clamped = !(sq >= (T)kNormEps) && sq == sq;
  if (ed.clamped) sq = (T)kNormEps;
  ed.d = std::sqrt(sq);
  for (int c = 0; c < 3; ++c) ed.u[c] = -ed.r[c] / ed.d;
  const T x = ed.d / (T)a.cutoff, coeff = (T)a.coeff;
  ed.start = x >= (T)1 ? -1 : window_start(w, (double)x);
  if (ed.start >= 0) {
    const T env = envelope(x), denv = envelope_derivative(x);
    for (int64_t m = 0; m < w.size; ++m) {
      const T t = x - a.centres[ed.start + m];
      const T gauss = std::exp(coeff * (t * t));
      s.f[m] = env * gauss;
      s.df[m] = gauss * (denv + env * ((T)2 * coeff * t));
    }
  }
  return ed;
}

template <class T>
E3CPU_INLINE int64_t run_backward(const MessageArgs<T>& a, const MessageGrads<T>& g, bool exact) {
  const int64_t H = a.hidden, R = a.num_rbf, C = 3 * H;
  std::vector<double> mu(a.centres, a.centres + R);
  const RadialWindow w = make_window(mu.data(), R, a.coeff, exact);
  std::vector<T> wt((size_t)(R * C)), gwt((size_t)(R * C), (T)0);  // W and its gradient as (R, 3H)
  transpose_weight(a.weight, a.w_stride_c, a.w_stride_r, C, R, wt.data());
  Scratch<T> s{std::vector<T>(w.size), std::vector<T>(w.size), std::vector<T>(C), std::vector<T>(C),
               std::vector<T>(H)};
  const T s3 = (T)(1.0 / std::sqrt(3.0)), sh = (T)(1.0 / std::sqrt((double)(H > 0 ? H : 1)));
  int64_t bad = 0;
  for (int64_t i = 0; i < a.n_atoms; ++i) {
    if (!receiver_valid(a, i)) {
      ++bad;
      continue;
    }
    const int64_t beg = a.rowptr[i], end = a.rowptr[i + 1];
    const T* gds = g.gds + H * i;
    const T* gdv = g.gdv + C * i;
    for (int64_t e = beg; e < end; ++e) {
      const Edge<T> ed = edge_geometry(a, w, e, i, s);
      T* gate = s.gate.data();
      T* ggate = s.ggate.data();
      for (int64_t c = 0; c < C; ++c) gate[c] = a.bias[c];
      if (ed.start >= 0)
        for (int64_t m = 0; m < w.size; ++m) {
          const T* wr = wt.data() + (ed.start + m) * C;
          const T f = s.f[m];
          for (int64_t c = 0; c < C; ++c) gate[c] += wr[c] * f;
        }
      const T* xj = a.x_proj + C * ed.j;
      const T* vj = a.vec + C * ed.j;
      T* gxj = g.gx_proj + C * ed.j;
      T* gvj = g.gvec + C * ed.j;
      for (int64_t c = 0; c < H; ++c) {
        const T b1 = xj[c] * gate[c] * s3;
        s.b2[c] = xj[H + c] * gate[H + c] * s3;
        const T gb1 = sh * ((gdv[c] * vj[c] + gdv[H + c] * vj[H + c]) + gdv[2 * H + c] * vj[2 * H + c]);
        const T gb2 = sh * ((gdv[c] * ed.u[0] + gdv[H + c] * ed.u[1]) + gdv[2 * H + c] * ed.u[2]);
        const T gb3 = gds[c];
        for (int x = 0; x < 3; ++x) gvj[x * H + c] += sh * gdv[x * H + c] * b1;
        ggate[c] = gb1 * xj[c] * s3;
        ggate[H + c] = gb2 * xj[H + c] * s3;
        ggate[2 * H + c] = gb3 * xj[2 * H + c] * s3;
        gxj[c] += gb1 * gate[c] * s3;
        gxj[H + c] += gb2 * gate[H + c] * s3;
        gxj[2 * H + c] += gb3 * gate[2 * H + c] * s3;
      }
      const T gu[3] = {sh * dot(gdv, s.b2.data(), H), sh * dot(gdv + H, s.b2.data(), H),
                       sh * dot(gdv + 2 * H, s.b2.data(), H)};
      for (int64_t c = 0; c < C; ++c) g.gbias[c] += ggate[c];
      T gd = 0;
      if (ed.start >= 0) {
        for (int64_t m = 0; m < w.size; ++m) {
          const int64_t row = (ed.start + m) * C;
          const T f = s.f[m];
          T* gwr = gwt.data() + row;
          for (int64_t c = 0; c < C; ++c) gwr[c] += ggate[c] * f;
          gd += dot(wt.data() + row, ggate, C) * s.df[m];
        }
        gd /= (T)a.cutoff;
      }
      // Through d (unless clamped) and u = -r / d.
      const T ur = (gu[0] * ed.r[0] + gu[1] * ed.r[1]) + gu[2] * ed.r[2];
      const T radial = ed.clamped ? (T)0 : (gd + ur / (ed.d * ed.d)) / ed.d;
      T gr[3];
      for (int c = 0; c < 3; ++c) gr[c] = radial * ed.r[c] - gu[c] / ed.d;
      const T o[3] = {(T)a.offsets[3 * e], (T)a.offsets[3 * e + 1], (T)a.offsets[3 * e + 2]};
      T* gcell = g.gcells + 9 * ed.g;
      for (int c = 0; c < 3; ++c) {
        g.gpos[3 * ed.j + c] += gr[c];
        g.gpos[3 * i + c] -= gr[c];
        for (int p = 0; p < 3; ++p) gcell[3 * p + c] += o[p] * gr[c];
      }
    }
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < R; ++r) g.gweight[c * R + r] += gwt[r * C + c];
  return bad;
}

template <class T>
int64_t backward_portable(const MessageArgs<T>& a, const MessageGrads<T>& g, bool exact) {
  return run_backward(a, g, exact);
}

#ifdef E3CPU_AVX512_PATH
template <class T>
E3CPU_AVX512 int64_t backward_avx512(const MessageArgs<T>& a, const MessageGrads<T>& g, bool exact) {
  return run_backward(a, g, exact);
}
#endif

template <class T>
int64_t dispatch(const MessageArgs<T>& a, const MessageGrads<T>& g, bool exact, Path path) {
#ifdef E3CPU_AVX512_PATH
  if (path == Path::Auto && e3rg::cpu_simd_avx512()) return backward_avx512(a, g, exact);
#endif
  return backward_portable(a, g, exact);
}

}  // namespace

int64_t message_passing_backward(const MessageArgs<float>& a, const MessageGrads<float>& g, bool exact, Path path) {
  return dispatch(a, g, exact, path);
}
int64_t message_passing_backward(const MessageArgs<double>& a, const MessageGrads<double>& g, bool exact,
                                 Path path) {
  return dispatch(a, g, exact, path);
}

}  // namespace e3cpu
