// Fused atom–atom message passing (spec §6 Step B): the per-receiver / per-channel logic shared by
// the C++ CPU launcher (message_passing_cpu.cpp) and the CUDA launcher (message_passing_cuda.cu).
// Everything here is a `__host__ __device__` inline function (MP_HD), templated on T = float or
// double; the launchers only schedule receivers and channels.
//
// The oracle is e3relax_fast/reference/message_passing.py. For an edge e = (j -> i) of crystal g:
//
//   r_e  = (p_j + (o0 C_g[0] + o1 C_g[1] + o2 C_g[2])) - p_i          (all in T)
//   d_e  = sqrt(max(r.r, 1e-8));  u_e = -r_e / d_e
//   f_er = env(x) exp(coeff (x - mu_r)^2),  x = d_e / cutoff,
//          env(x) = 1 - 21 x^5 + 35 x^6 - 15 x^7 for x < 1, else 0
//   gate = W f_e + b                                                    ((3H, R) W, (3H,) b)
//   [b1|b2|b3] = x_proj[j] * gate * (1/sqrt 3)
//   ds_i = sum_e b3;  dv_i = sum_e (b1 vec[j] + u_e (x) b2) * (1/sqrt H)
//
// Scheduling contract (both launchers): edges are receiver-sorted and rowptr is their receiver
// CSR; receiver i owns edges [rowptr[i], rowptr[i+1]) and is the only writer of ds[i], dv[i] (one
// store per element, no atomics). Edges are processed in tiles of EdgeTile<T>::value (28 float,
// 14 double: a receiver's usual 56 edges, 50 kept plus 6 self-images, are exactly 2 or 4 tiles):
// the geometry and the basis rows f of a tile are computed first (f stored r-major, f[r * tile +
// q], zero for the slots q >= ne of a partial tile), then every channel c evaluates its three gate
// rows for the whole tile (gate_rows_tile: one pass over r, each W element loaded once per tile
// and used for every edge of it) and adds the tile's messages in edge order. The tile size does
// not change any result: every sum has a fixed order (r ascending for a gate, edges ascending for a
// channel's outputs), so results are deterministic, and the CPU launcher performs the same
// operations in the same order as the CUDA kernel, up to the exp of each libm and FMA
// contraction (the CPU build disables it with -ffp-contract=off; the CUDA build keeps nvcc's
// default, so the GPU's gate sums are fused multiply-adds: same order, fewer roundings, within the
// tests' tolerances of the reference).
//
// Invalid input (rowptr not a CSR over [0, E], an edge of another receiver inside a receiver's
// range, a source atom or crystal index out of range) never reads out of bounds: the receiver's
// outputs are set to NaN and receiver() reports false (the CPU launcher turns that into an error,
// the CUDA launcher leaves the NaNs, as it never synchronises with the host).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MP_HD __host__ __device__ __forceinline__
#else
#define MP_HD inline
#endif

namespace e3mp {

// Edges per tile (gate accumulators per channel and thread: 3 * value, in registers on the GPU;
// 84 floats or 42 doubles). A multiple of the vector width of the f loads (float4, double2).
template <class T>
struct EdgeTile;
template <>
struct EdgeTile<float> {
  static constexpr int value = 28;
};
template <>
struct EdgeTile<double> {
  static constexpr int value = 14;
};
constexpr double kNormEps = 1e-8;     // clamp of the squared norm (spec §1.3)

// All pointers are host pointers for the CPU launcher, device pointers for the CUDA launcher.
template <class T>
struct Params {
  const T* x_proj = nullptr;          // (N, 3H)
  const T* vec = nullptr;             // (N, 3, H)
  const T* pos = nullptr;             // (N, 3)
  const T* cells = nullptr;           // (G, 3, 3), rows = lattice vectors
  const int64_t* src = nullptr;       // edge_index[0] (E,)
  const int64_t* dst = nullptr;       // edge_index[1] (E,)
  const int64_t* offsets = nullptr;   // (E, 3)
  const int64_t* edge_graph = nullptr;  // (E,)
  const int64_t* rowptr = nullptr;    // (N + 1,)
  const T* weight = nullptr;          // W[c, r] = weight[c * w_stride_c + r * w_stride_r]
  int64_t w_stride_c = 0, w_stride_r = 0;
  const T* bias = nullptr;            // (3H,)
  const T* centres = nullptr;         // (R,)
  T coeff = 0, cutoff = 1, inv_sqrt3 = 0, inv_sqrt_h = 0;
  int64_t n_atoms = 0, n_graphs = 0, n_edges = 0, hidden = 0, num_rbf = 0;
  T* ds = nullptr;                    // (N, H) out
  T* dv = nullptr;                    // (N, 3, H) out
};

// --------------------------------------------------------------------------------------------
// Scalar maths, float and double
// --------------------------------------------------------------------------------------------
MP_HD float mexp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
MP_HD double mexp(double x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}
MP_HD float msqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
MP_HD double msqrt(double x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}
template <class T>
MP_HD T quiet_nan() {
#if defined(__CUDA_ARCH__)
  return (T)nan("");
#else
  return (T)std::nan("");
#endif
}

// --------------------------------------------------------------------------------------------
// Per edge
// --------------------------------------------------------------------------------------------
// Receiver i's edge range; false when rowptr is not a CSR over [0, E] there.
template <class T>
MP_HD bool edge_range(const Params<T>& p, int64_t i, int64_t& beg, int64_t& end) {
  beg = p.rowptr[i];
  end = p.rowptr[i + 1];
  const bool ok = beg >= 0 && beg <= end && end <= p.n_edges;
  if (!ok) beg = end = 0;
  return ok;
}

// Edge e belongs to receiver i and its indices are in range.
template <class T>
MP_HD bool edge_valid(const Params<T>& p, int64_t e, int64_t i) {
  const int64_t j = p.src[e], g = p.edge_graph[e];
  return p.dst[e] == i && j >= 0 && j < p.n_atoms && g >= 0 && g < p.n_graphs;
}

// Unit vector u = -r / |r|_safe and x = |r|_safe / cutoff of a valid edge e (receiver i).
template <class T>
MP_HD void edge_geometry(const Params<T>& p, int64_t e, int64_t i, T* u, T& x) {
  const int64_t j = p.src[e];
  const T* C = p.cells + 9 * p.edge_graph[e];
  const T o0 = (T)p.offsets[3 * e], o1 = (T)p.offsets[3 * e + 1], o2 = (T)p.offsets[3 * e + 2];
  T r[3];
  for (int k = 0; k < 3; ++k) {
    const T shift = (o0 * C[k] + o1 * C[3 + k]) + o2 * C[6 + k];
    r[k] = (p.pos[3 * j + k] + shift) - p.pos[3 * i + k];
  }
  T s = (r[0] * r[0] + r[1] * r[1]) + r[2] * r[2];
  if (!(s >= (T)kNormEps)) s = s != s ? s : (T)kNormEps;  // clamp, NaN propagates
  const T d = msqrt(s);
  for (int k = 0; k < 3; ++k) u[k] = -r[k] / d;
  x = d / p.cutoff;
}

// Polynomial envelope of exponent 5: 1 - 21 x^5 + 35 x^6 - 15 x^7 for x < 1, else 0.
template <class T>
MP_HD T envelope(T x) {
  const T xp = x * x * x * x * x;
  const T u = (((T)1 + (T)-21 * xp) + ((T)35 * xp) * x) + (((T)-15 * xp) * x) * x;
  return x < (T)1 ? u : (T)0;
}

// Basis value r of an edge with scaled distance x and envelope env.
template <class T>
MP_HD T rbf_value(const Params<T>& p, T x, T env, int64_t r) {
  const T t = x - p.centres[r];
  return env * mexp(p.coeff * (t * t));
}

// Basis row r of the slots of a tile, f[r * tile + q] for q < tile (CUDA: 16-byte shared loads,
// broadcast to the block; f 16-byte aligned, tile * sizeof(T) a multiple of 16).
template <class T>
MP_HD void load_f_row(const T* fr, T* v) {
  constexpr int kTile = EdgeTile<T>::value;
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int q = 0; q < kTile; q += 4) {
      const float4 x = *reinterpret_cast<const float4*>(fr + q);
      v[q] = x.x;
      v[q + 1] = x.y;
      v[q + 2] = x.z;
      v[q + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int q = 0; q < kTile; q += 2) {
      const double2 x = *reinterpret_cast<const double2*>(fr + q);
      v[q] = x.x;
      v[q + 1] = x.y;
    }
  }
#else
  for (int q = 0; q < kTile; ++q) v[q] = fr[q];
#endif
}

// Gate rows c, H + c, 2H + c of every slot q of a tile: g[q][m] = sum_r W[mH + c, r] f[r * tile + q]
// (r ascending) + b[mH + c]. Slots q >= ne have f = 0 and are ignored by the caller.
template <class T>
MP_HD void gate_rows_tile(const Params<T>& p, const T* f, int64_t c, T (*g)[3]) {
  constexpr int kTile = EdgeTile<T>::value;
  const int64_t H = p.hidden;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int q = 0; q < kTile; ++q) g[q][0] = g[q][1] = g[q][2] = (T)0;
  const T* w0 = p.weight + c * p.w_stride_c;
  const T* w1 = p.weight + (H + c) * p.w_stride_c;
  const T* w2 = p.weight + (2 * H + c) * p.w_stride_c;
  for (int64_t r = 0; r < p.num_rbf; ++r) {
    const int64_t off = r * p.w_stride_r;
    const T a0 = w0[off], a1 = w1[off], a2 = w2[off];
    T v[kTile];
    load_f_row(f + r * kTile, v);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int q = 0; q < kTile; ++q) {
      g[q][0] += a0 * v[q];
      g[q][1] += a1 * v[q];
      g[q][2] += a2 * v[q];
    }
  }
  const T b0 = p.bias[c], b1 = p.bias[H + c], b2 = p.bias[2 * H + c];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int q = 0; q < kTile; ++q) {
    g[q][0] += b0;
    g[q][1] += b1;
    g[q][2] += b2;
  }
}

// Basis entry k = r * tile + q of a tile of ne edges (k < tile * R): f[k] = e_r(d_q) for q < ne,
// 0 for the empty slots. Consecutive k are consecutive slots of one row r (the CUDA kernel's
// threads over k store to consecutive shared addresses).
template <class T>
MP_HD void tile_basis_entry(const Params<T>& p, const T* x, const T* env, int ne, int64_t k, T* f) {
  constexpr int kTile = EdgeTile<T>::value;
  const int64_t r = k / kTile;
  const int q = (int)(k - r * kTile);
  f[k] = q < ne ? rbf_value(p, x[q], env[q], r) : (T)0;
}

// Channel c's running sums over a receiver's edges.
template <class T>
struct Acc {
  T s, v0, v1, v2;
};

// Adds the message of edge (source j, unit vector u, gate values g) to channel c's sums.
template <class T>
MP_HD void add_message(const Params<T>& p, int64_t j, const T* u, const T* g, int64_t c, Acc<T>& a) {
  const int64_t H = p.hidden;
  const T* xj = p.x_proj + 3 * H * j;
  const T b1 = (xj[c] * g[0]) * p.inv_sqrt3;
  const T b2 = (xj[H + c] * g[1]) * p.inv_sqrt3;
  const T b3 = (xj[2 * H + c] * g[2]) * p.inv_sqrt3;
  const T* vj = p.vec + 3 * H * j;
  a.s += b3;
  a.v0 += (b1 * vj[c] + u[0] * b2) * p.inv_sqrt_h;
  a.v1 += (b1 * vj[H + c] + u[1] * b2) * p.inv_sqrt_h;
  a.v2 += (b1 * vj[2 * H + c] + u[2] * b2) * p.inv_sqrt_h;
}

// The one store of channel c of receiver i (NaN when the receiver's input was invalid).
template <class T>
MP_HD void store(const Params<T>& p, int64_t i, int64_t c, const Acc<T>& a, bool ok) {
  const int64_t H = p.hidden;
  const T nan = quiet_nan<T>();
  p.ds[H * i + c] = ok ? a.s : nan;
  p.dv[3 * H * i + c] = ok ? a.v0 : nan;
  p.dv[3 * H * i + H + c] = ok ? a.v1 : nan;
  p.dv[3 * H * i + 2 * H + c] = ok ? a.v2 : nan;
}

// Tile preparation of edge e (slot q): source (or -1 when invalid), u, basis row f[q*ldf ...].
// The CPU launcher calls it per edge then per basis entry; the CUDA kernel splits it over threads
// (tile_geometry by one thread per edge, rbf_value by threads over (edge, r)).
template <class T>
MP_HD int64_t tile_geometry(const Params<T>& p, int64_t e, int64_t i, T* u, T& x, T& env) {
  if (!edge_valid(p, e, i)) {
    u[0] = u[1] = u[2] = (T)0;
    x = env = (T)0;
    return -1;
  }
  edge_geometry(p, e, i, u, x);
  env = envelope(x);
  return p.src[e];
}

// --------------------------------------------------------------------------------------------
// One receiver, sequentially (CPU). acc: H entries, f: EdgeTile<T>::value * R entries of scratch.
// --------------------------------------------------------------------------------------------
template <class T>
inline bool receiver(const Params<T>& p, int64_t i, Acc<T>* acc, T* f) {
  constexpr int kTile = EdgeTile<T>::value;
  const int64_t H = p.hidden, R = p.num_rbf;
  for (int64_t c = 0; c < H; ++c) acc[c] = Acc<T>{0, 0, 0, 0};
  int64_t beg, end;
  bool ok = edge_range(p, i, beg, end);
  int64_t js[kTile];
  T u[kTile][3], x[kTile], env[kTile];
  for (int64_t t = beg; ok && t < end; t += kTile) {
    const int ne = (int)(end - t < kTile ? end - t : kTile);
    for (int q = 0; q < ne; ++q) {
      js[q] = tile_geometry(p, t + q, i, u[q], x[q], env[q]);
      if (js[q] < 0) ok = false;
    }
    if (!ok) break;
    for (int64_t k = 0; k < kTile * R; ++k) tile_basis_entry(p, x, env, ne, k, f);
    T g[kTile][3];
    for (int64_t c = 0; c < H; ++c) {
      gate_rows_tile(p, f, c, g);
      for (int q = 0; q < ne; ++q) add_message(p, js[q], u[q], g[q], c, acc[c]);
    }
  }
  for (int64_t c = 0; c < H; ++c) store(p, i, c, acc[c], ok);
  return ok;
}

}  // namespace e3mp
