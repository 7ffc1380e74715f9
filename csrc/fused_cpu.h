// The fused CPU backend `cpu` of the gated message ops: the atom–atom message
// (message_passing_cpu*.cpp, spec §6 Step B; its backward for training in
// message_passing_backward_cpu.cpp) and the lattice -> atom message (lattice_message_cpu*.cpp,
// Steps 0 and A.1-3; forward only). Their oracles are
// e3relax_fast/reference/{message_passing,lattice_message}.py.
//
// Why fused: the reference materialises E x 3H edge tensors (the gate W e(d) + b, the gathered
// source projection, their product, the message vectors) and reads them back; here a receiver's
// edges are handled in registers and L1, and only node-sized outputs are written. The radial
// projection runs on the window of radial_window.h (15 of the 128 centres), or exactly.
//
// Layout of the work. The launcher transposes W once per call to WT (R, 3H), so that the 16 (or
// 8) consecutive channels of a SIMD vector are contiguous in each basis row. Per receiver:
//   1. prepare (here, shared by both paths): per edge the source j, the unit vector u, and its
//      window (first centre, values); edges are grouped in tiles of up to kTile consecutive edges
//      whose windows lie within kTileSlack centres of one another, and each tile gets a dense
//      (rows x kTile) matrix G of the values of its edges on the union of their windows (zero
//      where an edge's own window does not reach);
//   2. per block of channels (the paths: portable C++ in message_passing_cpu.cpp, AVX-512 in
//      message_passing_cpu_avx512.cpp): the tile's gates g[q] = b + sum_r WT[kmin + r] G[r][q]
//      (each WT row loaded once per tile, kTile FMAs per load), then each edge's message is added
//      to the receiver's sums in edge order; one store per output element, no atomics.
// The lattice op has one such "edge" per atom (to its crystal's lattice point k): per block of
// channels, its three gates from the window's WT rows, then ds and v_out, in registers.
// Results do not depend on the thread count (a receiver or atom is computed by one thread).
//
// Scale factors are applied once per output: ds = (1/sqrt 3) sum x2 g2,
// dv = (1/sqrt 3)(1/sqrt H) sum (x0 g0 v_j + u x1 g1).
//
// Invalid input (rowptr not a CSR over [0, E], an edge of another receiver inside a receiver's
// range, a source atom or crystal index out of range) never reads out of bounds: the receiver's
// outputs are NaN and the launcher reports the count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "radial_window.h"
#include "thread_pool.h"

// The AVX-512 paths are built on x86-64 with GCC-compatible compilers and run when the CPU has
// AVX-512 F/DQ/VL/BW (e3rg::cpu_simd_avx512); their functions carry this target attribute rather
// than the files a -mavx512 flag (radius_graph_cpu_internal.h says why).
#if defined(__x86_64__) && defined(__GNUC__)
#define E3CPU_AVX512_PATH 1
#define E3CPU_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))
#endif

namespace e3cpu {

constexpr int kTile = 8;        // edges per tile (the AVX-512 path keeps 3 kTile gate vectors in registers)
constexpr int kTileSlack = 4;   // a tile's union of windows spans at most window size + this many centres
constexpr double kNormEps = 1e-8;  // clamp of the squared norm (spec §1.3)

enum class Path { Auto = 0, Portable = 1 };

// Pointers to C-contiguous arrays; WT is the launcher's transposed copy of W.
template <class T>
struct MessageArgs {
  const T* x_proj = nullptr;            // (N, 3H)
  const T* vec = nullptr;               // (N, 3, H)
  const T* pos = nullptr;               // (N, 3)
  const T* cells = nullptr;             // (G, 3, 3), rows = lattice vectors
  const int64_t* src = nullptr;         // edge_index[0] (E,)
  const int64_t* dst = nullptr;         // edge_index[1] (E,)
  const int64_t* offsets = nullptr;     // (E, 3)
  const int64_t* edge_graph = nullptr;  // (E,)
  const int64_t* rowptr = nullptr;      // (N + 1,)
  const T* weight = nullptr;            // W[c, r] = weight[c * w_stride_c + r * w_stride_r], (3H, R)
  int64_t w_stride_c = 0, w_stride_r = 0;
  const T* bias = nullptr;              // (3H,)
  const T* centres = nullptr;           // (R,)
  double coeff = 0.0, cutoff = 1.0;
  int64_t n_atoms = 0, n_graphs = 0, n_edges = 0, hidden = 0, num_rbf = 0;
  T* ds = nullptr;                      // (N, H) out
  T* dv = nullptr;                      // (N, 3, H) out
};

template <class T>
struct LatticeArgs {
  const T* x_proj = nullptr;             // (N, 3H)
  const T* vec = nullptr;                // (N, 3, H)
  const T* pos = nullptr;                // (N, 3)
  const T* cells = nullptr;              // (G, 3, 3)
  const int64_t* graph_index = nullptr;  // (N,)
  const T* centres = nullptr;            // (G, 3) per-crystal means subtracted first, or null (paper form)
  int64_t k = 0;                         // lattice node: row k of the cell
  const T* weight = nullptr;             // (3H, R), strides as MessageArgs
  int64_t w_stride_c = 0, w_stride_r = 0;
  const T* bias = nullptr;               // (3H,)
  const T* rbf_centres = nullptr;        // (R,)
  double coeff = 0.0, cutoff = 1.0;
  int64_t n_atoms = 0, n_graphs = 0, hidden = 0, num_rbf = 0;
  T* ds = nullptr;                       // (N, H) out: a3
  T* v_out = nullptr;                    // (N, 3, H) out: the replacement vector features
};

// The gradients of the atom–atom message (message_passing_backward_cpu.cpp): the inputs of
// MessageArgs (ds, dv unused) and the upstream gradients gds (N, H), gdv (N, 3, H); every output
// is accumulated into (the caller zeroes them). gweight is (3H, R) C-contiguous.
template <class T>
struct MessageGrads {
  const T* gds = nullptr;   // (N, H)
  const T* gdv = nullptr;   // (N, 3, H)
  T* gx_proj = nullptr;     // (N, 3H)
  T* gvec = nullptr;        // (N, 3, H)
  T* gpos = nullptr;        // (N, 3)
  T* gcells = nullptr;      // (G, 3, 3)
  T* gweight = nullptr;     // (3H, R)
  T* gbias = nullptr;       // (3H,)
};

// Launchers (message_passing_cpu.cpp, lattice_message_cpu.cpp): fill every output element;
// threads over receivers / atoms (num_threads <= 0: hardware concurrency). `exact`: evaluate the
// projection on every centre instead of the window. Return the number of receivers (atoms) whose
// input was invalid (their outputs are NaN).
int64_t message_passing(const MessageArgs<float>& a, int num_threads, bool exact, Path path);
int64_t message_passing(const MessageArgs<double>& a, int num_threads, bool exact, Path path);
// Backward of message_passing (one thread, edges in receiver order: the sums into source atoms and
// into W do not depend on any thread count; both paths give the same bits). Returns the number of
// invalid receivers (their edges add nothing; the launcher raises).
int64_t message_passing_backward(const MessageArgs<float>& a, const MessageGrads<float>& g, bool exact, Path path);
int64_t message_passing_backward(const MessageArgs<double>& a, const MessageGrads<double>& g, bool exact, Path path);
int64_t lattice_message(const LatticeArgs<float>& a, int num_threads, bool exact, Path path);
int64_t lattice_message(const LatticeArgs<double>& a, int num_threads, bool exact, Path path);

// ---------------------------------------------------------------------------------------------
// Internals shared by the launchers and their paths
// ---------------------------------------------------------------------------------------------
// What a channel loop reads: the inputs, WT and the window.
template <class T>
struct Kernel {
  const T* x_proj;
  const T* vec;
  const T* wt;    // (R, 3H)
  const T* bias;  // (3H,)
  int64_t hidden;
  T scale_s, scale_v;  // 1/sqrt 3 and 1/(sqrt 3 sqrt H)
};

// A receiver's edges grouped in tiles (see the header comment).
struct Tile {
  int64_t first = 0;  // index of the tile's first edge in Prepared's per-edge arrays
  int count = 0;      // edges
  int64_t kmin = 0;   // first basis row of the union of the windows
  int64_t rows = 0;   // rows of G (0: no edge has a window: every gate is the bias)
  int64_t g = 0;      // offset of G (rows x kTile) in Prepared::G
};

template <class T>
struct Prepared {
  std::vector<int64_t> src;  // per edge
  std::vector<T> u;          // per edge, 3
  std::vector<int64_t> start;  // per edge: first centre of its window, -1 without (x >= 1)
  std::vector<T> values;     // per edge: window size values
  std::vector<Tile> tiles;
  std::vector<T> G;
};

// Whether receiver i's edges can be read: rowptr[i..i+1] a range within [0, E], and each of its
// edges received by i from a source atom and in a crystal within range (forward and backward).
template <class T>
inline bool receiver_valid(const MessageArgs<T>& a, int64_t i) {
  const int64_t beg = a.rowptr[i], end = a.rowptr[i + 1];
  if (!(beg >= 0 && beg <= end && end <= a.n_edges)) return false;
  for (int64_t e = beg; e < end; ++e)
    if (a.dst[e] != i || a.src[e] < 0 || a.src[e] >= a.n_atoms || a.edge_graph[e] < 0 ||
        a.edge_graph[e] >= a.n_graphs)
      return false;
  return true;
}

// Unit vector u = -r / |r|_safe and x = |r|_safe / cutoff of r.
template <class T>
inline void unit_and_x(const T* r, T cutoff, T* u, T& x) {
  T s = (r[0] * r[0] + r[1] * r[1]) + r[2] * r[2];
  if (!(s >= (T)kNormEps)) s = s != s ? s : (T)kNormEps;  // clamp, NaN propagates
  const T d = std::sqrt(s);
  for (int k = 0; k < 3; ++k) u[k] = -r[k] / d;
  x = d / cutoff;
}

// The window's basis values of scaled distance x (window_values, or the AVX-512 path's vector form).
template <class T>
using ValuesFn = void (*)(const RadialWindow& w, const T* centres, T coeff, T x, T env, int64_t start, T* out);

// Window of a scaled distance x into start/values (start -1 when x >= 1: the projection is the bias).
template <class T>
inline void edge_window(const RadialWindow& w, ValuesFn<T> values_fn, const T* centres, T coeff, T x,
                        int64_t& start, T* values) {
  if (x >= (T)1) {
    start = -1;
    return;
  }
  start = window_start(w, (double)x);
  values_fn(w, centres, coeff, x, envelope(x), start, values);
}

// Groups edges [0, n) of p (their windows set) into tiles and fills each tile's G.
template <class T>
inline void make_tiles(const RadialWindow& w, Prepared<T>& p, int64_t n) {
  p.tiles.clear();
  int64_t total = 0;
  for (int64_t e = 0; e < n;) {
    Tile t;
    t.first = e;
    int64_t lo = 0, hi = 0;  // union [lo, hi) of the windows so far (empty while hi == lo)
    while (e < n && t.count < kTile) {
      const int64_t s = p.start[e];
      if (s >= 0) {
        const int64_t nlo = hi > lo ? std::min(lo, s) : s, nhi = hi > lo ? std::max(hi, s + w.size) : s + w.size;
        if (hi > lo && nhi - nlo > w.size + kTileSlack) break;
        lo = nlo;
        hi = nhi;
      }
      ++t.count;
      ++e;
    }
    t.kmin = lo;
    t.rows = hi - lo;
    t.g = total;
    total += t.rows * kTile;
    p.tiles.push_back(t);
  }
  p.G.assign((size_t)total, (T)0);
  for (const Tile& t : p.tiles) {
    for (int q = 0; q < t.count; ++q) {
      const int64_t e = t.first + q, s = p.start[e];
      if (s < 0) continue;
      const T* v = p.values.data() + e * w.size;
      T* g = p.G.data() + t.g + (s - t.kmin) * kTile + q;
      for (int64_t m = 0; m < w.size; ++m) g[m * kTile] = v[m];
    }
  }
}

// Transposes W (3H, R; any strides) into wt (R, 3H).
template <class T>
inline void transpose_weight(const T* w, int64_t stride_c, int64_t stride_r, int64_t C, int64_t R, T* wt) {
  constexpr int64_t kBlock = 32;  // cache blocking: a block of rows and columns at a time
  for (int64_t c0 = 0; c0 < C; c0 += kBlock)
    for (int64_t r0 = 0; r0 < R; r0 += kBlock)
      for (int64_t c = c0; c < std::min(C, c0 + kBlock); ++c)
        for (int64_t r = r0; r < std::min(R, r0 + kBlock); ++r) wt[r * C + c] = w[c * stride_c + r * stride_r];
}

// Threads worth waking for a call of `fmas` multiply-adds (the radial projections' count, which
// dominates): each must get at least kMinFmasPerThread (~0.1 ms of work), since waking a helper costs
// tens to hundreds of microseconds on a virtual machine (thread_pool.cpp) and a one-crystal call at
// H = 64 is smaller than that. num_threads <= 0: hardware concurrency.
constexpr double kMinFmasPerThread = 8e6;
inline int threads_for(double fmas, int num_threads) {
  const int nt = num_threads > 0 ? num_threads : (int)std::max(1u, std::thread::hardware_concurrency());
  return (int)std::clamp(fmas / kMinFmasPerThread, 1.0, (double)nt);
}

// Calls work(begin, end, scratch) over [0, n) in dynamic chunks on `nt` threads of the pool, with
// one Scratch per thread; work returns its count of invalid items.
template <class Scratch, class Work>
int64_t parallel_chunks(int64_t n, int nt, Work work) {
  if (n <= 0) return 0;
  const int64_t chunk = std::clamp<int64_t>(n / (8 * (int64_t)nt), 1, 16);
  nt = (int)std::min<int64_t>(nt, (n + chunk - 1) / chunk);
  std::atomic<int64_t> next{0}, bad{0};
  auto run = [&](int) {
    Scratch scratch;
    int64_t nbad = 0;
    for (int64_t s; (s = next.fetch_add(chunk)) < n;) nbad += work(s, std::min(n, s + chunk), scratch);
    bad += nbad;
  };
  if (nt <= 1) {
    run(0);
  } else {
    e3rg::run_parallel(nt, run);
  }
  return bad.load();
}

// Channel loops of the paths, per receiver (message) or atom (lattice); defined in the *_cpu.cpp
// (portable) and *_cpu_avx512.cpp files. `p` holds the receiver's prepared edges.
template <class T>
void message_channels_portable(const Kernel<T>& k, const Prepared<T>& p, T* ds, T* dv);
// Lattice: `dir` the atom's unit vector w, its window's first centre `start` (-1: none) and `values`.
template <class T>
void lattice_channels_portable(const Kernel<T>& k, int64_t atom, const T* dir, int64_t start, const T* values,
                               int64_t size, T* ds, T* v_out);
#ifdef E3CPU_AVX512_PATH
void message_channels_avx512(const Kernel<float>& k, const Prepared<float>& p, float* ds, float* dv);
void message_channels_avx512(const Kernel<double>& k, const Prepared<double>& p, double* ds, double* dv);
void lattice_channels_avx512(const Kernel<float>& k, int64_t atom, const float* dir, int64_t start,
                             const float* values, int64_t size, float* ds, float* v_out);
void lattice_channels_avx512(const Kernel<double>& k, int64_t atom, const double* dir, int64_t start,
                             const double* values, int64_t size, double* ds, double* v_out);
void window_values_avx512(const RadialWindow& w, const float* centres, float coeff, float x, float env,
                          int64_t start, float* out);
void window_values_avx512(const RadialWindow& w, const double* centres, double coeff, double x, double env,
                          int64_t start, double* out);
#endif

}  // namespace e3cpu
