// Periodic radius graph with the deterministic per-centre top-K cut of spec §3: the per-centre
// logic shared by the C++ CPU launcher (radius_graph_cpu.cpp) and the CUDA launcher
// (radius_graph_cuda.cu). Everything here is a `__host__ __device__` inline function (RG_HD);
// the launchers only schedule centres and move data.
//
// The exact oracle is e3relax_fast/reference/radius_graph.py; its docstring fixes the contract
// this file reproduces bit for bit:
//
//   * candidates of centre i: every (j, o) with j in i's crystal, o in Z^3,
//     d = |p_j + o C - p_i| <= radius, except (i, 0);
//   * d in float64, in the order  dp = p_j - p_i;  shift = ((o0 a + o1 b) + o2 c);
//     r = dp + shift;  d = sqrt((rx rx + ry ry) + rz rz)  -- no FMA contraction (host code is
//     compiled with -ffp-contract=off, device code uses the __d*_rn intrinsics below);
//   * key (q, j, o0, o1, o2), q = round_half_even(d / 1e-6); keep the cap_i = max(0, K -
//     reserved_i) smallest keys, drop the kept periodic self-images (j == i), append the six
//     fixed self-image edges; edges receiver-sorted.
//
// Image enumeration (any superset of the candidate set gives the same result, because the exact
// distance test alone decides membership). With fractional coordinates f = p inv(C), s = floor(f),
// w = f - s, a neighbour image is u = (w_j - w_i) + o' (fractional, o' integer) and its offset for
// the given (unwrapped) positions is o = o' + s_i - s_j. A vector of length <= R has fractional
// component |u_k| <= reach_k = R ||inv(C)[:, k]||. Two enumeration schemes:
//
//   * brute force (small crystals): for every j of the crystal, o'_0 from the reach bound, then
//     o'_1 from the exact ellipse |P_c(u0 a + u1 b)| <= R (P_c: projection orthogonal to c), then
//     o'_2 from the exact sphere |u0 a + u1 b + u2 c| <= R, every bound evaluated with the radius
//     enlarged by a small margin. Only a few images per row fail the exact test.
//   * cell list (large crystals): the crystal's atoms are binned by wrapped fractional coordinate
//     into nb_k bins per axis (bin side ~ reach_k / 2); centre i visits the extended bins
//     B_k in [floor((w_ik - reach_k) nb_k), floor((w_ik + reach_k) nb_k)], each of which is bin
//     B_k mod nb_k seen through image o'_k = floor(B_k / nb_k). Every (j, o') is visited at most
//     once, the work per centre is O(atoms within the reach box): O(N) per crystal.
//   (The CPU launcher's default for small crystals is a third scheme, the symmetric "image box" of
//   radius_graph_cpu.cpp; the tests check all of them against the reference.)
//
// Selection. Sequential form: a sorted array of at most cap entries with insertion (topk_push);
// the CPU launcher instead collects a centre's candidates and selects with a counting sort on q
// (Selector, radius_graph_cpu_internal.h), same result. Warp form (CUDA, one warp per centre; also emulated on the
// CPU for the tests): pass 1 counts the candidates into a 256-bin histogram of q, which gives the
// bin T holding the cap-th key; pass 2 collects the candidates of bins < T (all kept) and of bin T
// (the boundary, at most kBoundaryCap) into shared memory; a rank sort on the total key order then
// places every kept entry, so the result does not depend on the order in which lanes found the
// candidates. A boundary bin with more than kBoundaryCap entries (hundreds of exactly tied or
// near-tied images) falls back to the sequential form on one lane.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RG_HD __host__ __device__ __forceinline__
#else
#define RG_HD inline
#endif

namespace e3rg {

// Quantum of the distance key q(d) = round(d / kQuantum).
constexpr double kQuantum = 1e-6;
// Margins of the image bounds (they only enlarge the enumerated superset). The bound radius is
// radius * (1 + kRelMargin) + kAbsMargin; kFracEps widens every fractional/integer range.
// Together they absorb the float64 rounding of f = p inv(C) and of the bounds for positions up
// to ~1e6 Å from the origin (kMaxCoord, checked by the launchers).
constexpr double kRelMargin = 1e-8;
constexpr double kAbsMargin = 1e-8;
constexpr double kFracEps = 1e-9;
constexpr double kMaxCoord = 1e6;
// Warp selection: histogram bins of q, capacity of the boundary bin, lanes per warp.
constexpr int kHistBins = 256;
constexpr int kBoundaryCap = 128;
constexpr int kWarp = 32;
// Error bits reported by the launchers.
constexpr int kErrSingularCell = 1;   // a cell is singular or not finite
constexpr int kErrCoordRange = 2;     // |p| > kMaxCoord or an offset does not fit in int32
constexpr int kErrBadPtr = 4;         // ptr is not a valid CSR over the atoms
constexpr int kErrBadReserved = 8;    // a reserved entry is negative

// --------------------------------------------------------------------------------------------
// Exact float64 arithmetic: one rounding per operation, never fused.
// --------------------------------------------------------------------------------------------
RG_HD double xmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
RG_HD double xadd(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
RG_HD double xsub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
RG_HD double xdiv(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
RG_HD double xsqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
// q(d) = round(d / 1e-6), half to even (the default rounding mode of llrint).
RG_HD long long quantize(double d) {
#if defined(__CUDA_ARCH__)
  return llrint(xdiv(d, kQuantum));
#else
  return std::llrint(xdiv(d, kQuantum));
#endif
}
// floor/ceil. Baseline x86-64 (SSE2, no roundsd) makes std::floor a library call; for the
// bounds' small arguments a truncating conversion is exact and much faster.
RG_HD double dfloor(double x) {
#if defined(__CUDA_ARCH__)
  return floor(x);
#else
  if (!(x > -1e15 && x < 1e15)) return std::floor(x);
  const double t = (double)(long long)x;  // truncation toward zero, exact here
  return t > x ? t - 1.0 : t;
#endif
}
RG_HD double dceil(double x) {
#if defined(__CUDA_ARCH__)
  return ceil(x);
#else
  if (!(x > -1e15 && x < 1e15)) return std::ceil(x);
  const double t = (double)(long long)x;
  return t < x ? t + 1.0 : t;
#endif
}
RG_HD double dsqrt_fast(double x) { return xsqrt(x); }  // bounds only (not part of the contract)
RG_HD double dabs(double x) { return x < 0 ? -x : x; }
RG_HD bool finite(double x) { return x == x && dabs(x) <= 1.7976931348623157e308; }
RG_HD long long floordiv(long long a, long long b) {  // b > 0
  long long q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// The six fixed self-image offsets of §3.4: (0,0,1), (0,1,0), (1,0,0), (0,1,1), (1,0,1), (1,1,0).
RG_HD int self_offset(int t, int k) {
  // bit pattern per t of (o0, o1, o2)
  const int pat = (t == 0) ? 1 : (t == 1) ? 2 : (t == 2) ? 4 : (t == 3) ? 3 : (t == 4) ? 5 : 6;
  return (pat >> (2 - k)) & 1;
}

// Exact length |p_j + o C - p_i| in the documented operation order. cell: 9 doubles, rows a, b, c.
RG_HD double edge_length(const double* pi, const double* pj, const double* cell, int o0, int o1, int o2) {
  const double f0 = (double)o0, f1 = (double)o1, f2 = (double)o2;
  double r[3];
  for (int k = 0; k < 3; ++k) {
    const double dp = xsub(pj[k], pi[k]);
    const double sh = xadd(xadd(xmul(f0, cell[k]), xmul(f1, cell[3 + k])), xmul(f2, cell[6 + k]));
    r[k] = xadd(dp, sh);
  }
  return xsqrt(xadd(xadd(xmul(r[0], r[0]), xmul(r[1], r[1])), xmul(r[2], r[2])));
}

// --------------------------------------------------------------------------------------------
// Per-crystal geometry
// --------------------------------------------------------------------------------------------
struct Cell {
  double C[9];        // rows a, b, c
  double inv[9];      // inv(C), row-major: f_k = sum_m p_m inv[3 m + k]
  double reach[3];    // max |u_k| of a fractional vector of length <= rb (plus kFracEps)
  double radius;      // the candidate radius (exact test d <= radius)
  double rb2;         // squared bound radius
  double aa, bb, cc, ab, ac, bc;  // metric tensor a.a, ...
  double paa, pab, pbb;           // metric of a and b projected orthogonal to c
  double inv_pbb, inv_cc;         // 1 / pbb, 1 / cc (bounds only)
  long long qmax;                 // q(radius): every candidate has q <= qmax
  double hscale;                  // kHistBins / (qmax + 1): histogram bin of q (warp form)
  int nb[3];                      // cell-list bins per axis (1, 1, 1 for brute force)
};

RG_HD double dot3(const double* x, const double* y) { return x[0] * y[0] + x[1] * y[1] + x[2] * y[2]; }

// Fills g from the 9 cell entries; returns false when the cell is singular or not finite.
RG_HD bool cell_setup(const double* C, double radius, Cell& g) {
  for (int k = 0; k < 9; ++k) g.C[k] = C[k];
  const double* a = C;
  const double* b = C + 3;
  const double* c = C + 6;
  // inv(C) = adj(C) / det(C); rows of adj^T are cross products.
  const double bxc[3] = {b[1] * c[2] - b[2] * c[1], b[2] * c[0] - b[0] * c[2], b[0] * c[1] - b[1] * c[0]};
  const double cxa[3] = {c[1] * a[2] - c[2] * a[1], c[2] * a[0] - c[0] * a[2], c[0] * a[1] - c[1] * a[0]};
  const double axb[3] = {a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]};
  const double det = dot3(a, bxc);
  if (!finite(det) || det == 0.0) return false;
  // f = p inv(C) with f_k = p . (cross_k / det): column k of inv(C) is cross_k / det.
  for (int m = 0; m < 3; ++m) {
    g.inv[3 * m + 0] = bxc[m] / det;
    g.inv[3 * m + 1] = cxa[m] / det;
    g.inv[3 * m + 2] = axb[m] / det;
  }
  const double rb = radius * (1.0 + kRelMargin) + kAbsMargin;
  g.radius = radius;
  g.rb2 = rb * rb;
  for (int k = 0; k < 3; ++k) {
    const double cn = dsqrt_fast(g.inv[k] * g.inv[k] + g.inv[3 + k] * g.inv[3 + k] + g.inv[6 + k] * g.inv[6 + k]);
    g.reach[k] = rb * cn * (1.0 + kRelMargin) + kFracEps;
    if (!finite(g.reach[k])) return false;
  }
  g.aa = dot3(a, a);
  g.bb = dot3(b, b);
  g.cc = dot3(c, c);
  g.ab = dot3(a, b);
  g.ac = dot3(a, c);
  g.bc = dot3(b, c);
  double pa[3], pb[3];
  for (int k = 0; k < 3; ++k) {
    pa[k] = a[k] - (g.ac / g.cc) * c[k];
    pb[k] = b[k] - (g.bc / g.cc) * c[k];
  }
  g.paa = dot3(pa, pa);
  g.pab = dot3(pa, pb);
  g.pbb = dot3(pb, pb);
  if (!(g.pbb > 0.0) || !(g.cc > 0.0)) return false;
  g.inv_pbb = 1.0 / g.pbb;
  g.inv_cc = 1.0 / g.cc;
  g.qmax = quantize(radius);
  g.hscale = (double)kHistBins / ((double)g.qmax + 1.0);
  g.nb[0] = g.nb[1] = g.nb[2] = 1;
  return true;
}

// Fractional coordinates of p: wrapped w in [0, 1] and integer shift s = floor(f).
// Returns false when |p| exceeds kMaxCoord or s does not fit comfortably in int32.
RG_HD bool atom_frac(const double* p, const Cell& g, double* w, int* s) {
  bool ok = true;
  for (int k = 0; k < 3; ++k) {
    if (!(dabs(p[k]) <= kMaxCoord)) ok = false;
  }
  for (int k = 0; k < 3; ++k) {
    const double f = p[0] * g.inv[k] + p[1] * g.inv[3 + k] + p[2] * g.inv[6 + k];
    double fl = dfloor(f);
    if (!(dabs(fl) < 1073741824.0)) {  // 2^30
      ok = false;
      fl = 0.0;
    }
    w[k] = ok ? f - fl : 0.0;
    s[k] = (int)fl;
  }
  return ok;
}

// Bins per axis for a crystal of n atoms: bin side ~ reach_k / 2 in fractional units, at most
// ~2 n bins in all (a 20 Å vacuum axis gets few bins).
RG_HD long long bins_along(double reach) {
  const double want = 2.0 / reach;
  return want >= 1024.0 ? 1024 : (want < 1.0 ? 1 : (long long)want);
}
// (Three scalars rather than an array: no dynamically indexed local array, hence no stack frame,
// in the CUDA kernels.)
RG_HD void choose_bins(Cell& g, long long n) {
  long long n0 = bins_along(g.reach[0]), n1 = bins_along(g.reach[1]), n2 = bins_along(g.reach[2]);
  const long long limit = 2 * n + 8;
  while (n0 * n1 * n2 > limit) {  // halve the axis with the most bins (the first of equals)
    if (n2 > n0 && n2 > n1) {
      n2 = (n2 + 1) / 2;
    } else if (n1 > n0) {
      n1 = (n1 + 1) / 2;
    } else {
      n0 = (n0 + 1) / 2;
    }
  }
  g.nb[0] = (int)n0;
  g.nb[1] = (int)n1;
  g.nb[2] = (int)n2;
}

RG_HD int bin_axis(double w, int nb) {
  int b = (int)dfloor(w * (double)nb);
  return b < 0 ? 0 : (b >= nb ? nb - 1 : b);
}
RG_HD int bin_of(const double* w, const Cell& g) {
  return (bin_axis(w[0], g.nb[0]) * g.nb[1] + bin_axis(w[1], g.nb[1])) * g.nb[2] + bin_axis(w[2], g.nb[2]);
}

// --------------------------------------------------------------------------------------------
// Candidates and keys
// --------------------------------------------------------------------------------------------
struct Cand {        // 24 bytes: key and identity of one candidate
  long long q;
  int j;             // global index of the neighbour
  int o[3];          // offset for the given positions
};
template <class A, class B>
RG_HD bool key_less(const A& x, const B& y) {
  if (x.q != y.q) return x.q < y.q;
  if (x.j != y.j) return x.j < y.j;
  if (x.o[0] != y.o[0]) return x.o[0] < y.o[0];
  if (x.o[1] != y.o[1]) return x.o[1] < y.o[1];
  return x.o[2] < y.o[2];
}

// Sequential bounded top-K: buf holds n <= cap entries sorted by key.
template <class E>
RG_HD void topk_push(E* buf, int& n, int cap, const E& c) {
  if (n == cap) {
    if (cap == 0 || !key_less(c, buf[n - 1])) return;
    --n;
  }
  int p = n;
  while (p > 0 && key_less(c, buf[p - 1])) {
    buf[p] = buf[p - 1];
    --p;
  }
  buf[p] = c;
  ++n;
}

// One centre: its index, crystal, position and wrapped coordinates.
struct Centre {
  int i;
  int start, n;      // atoms of the crystal: [start, start + n)
  double p[3];
  double w[3];
  int s[3];
};

// One (centre, neighbour) pair.
struct Pair {
  int j;
  double dp[3];      // p_j - p_i, exact
  double df[3];      // w_j - w_i
  int ds[3];         // s_i - s_j: o = o' + ds
};

RG_HD void make_pair(const Centre& c, int j, const double* pos, const double* wfrac, const int* shift, Pair& pr) {
  pr.j = j;
  for (int k = 0; k < 3; ++k) {
    pr.dp[k] = xsub(pos[3 * j + k], c.p[k]);
    pr.df[k] = wfrac[3 * j + k] - c.w[k];
    pr.ds[k] = c.s[k] - shift[3 * j + k];
  }
}

// o'_0 range of a pair from the reach bound.
RG_HD void range0(const Cell& g, const Pair& pr, int& lo, int& hi) {
  lo = (int)dceil(-g.reach[0] - pr.df[0]);
  hi = (int)dfloor(g.reach[0] - pr.df[0]);
}
// o'_1 range given u0 = df0 + o'_0: |P_c(u0 a + u1 b)|^2 <= rb^2. Returns false if empty.
RG_HD bool range1(const Cell& g, double u0, double df1, int& lo, int& hi) {
  const double bq = g.pab * u0;
  const double disc = bq * bq - g.pbb * (g.paa * u0 * u0 - g.rb2);
  if (disc < 0.0) return false;
  const double h = dsqrt_fast(disc);
  const double v0 = (-bq - h) * g.inv_pbb, v1 = (-bq + h) * g.inv_pbb;
  lo = (int)dceil(v0 - df1 - kFracEps);
  hi = (int)dfloor(v1 - df1 + kFracEps);
  return lo <= hi;
}
// o'_2 range given u0, u1: |u0 a + u1 b + u2 c|^2 <= rb^2. Returns false if empty.
RG_HD bool range2(const Cell& g, double u0, double u1, double df2, int& lo, int& hi) {
  const double yc = u0 * g.ac + u1 * g.bc;
  const double yy = u0 * u0 * g.aa + 2.0 * u0 * u1 * g.ab + u1 * u1 * g.bb;
  const double disc = yc * yc - g.cc * (yy - g.rb2);
  if (disc < 0.0) return false;
  const double h = dsqrt_fast(disc);
  const double v0 = (-yc - h) * g.inv_cc, v1 = (-yc + h) * g.inv_cc;
  lo = (int)dceil(v0 - df2 - kFracEps);
  hi = (int)dfloor(v1 - df2 + kFracEps);
  return lo <= hi;
}

// Exact tests of the images (o'_0, o'_1, o'_2 in [lo2, hi2]) of a pair; sink(q, j, o0, o1, o2, d)
// for each candidate. The row part of the shift, o0 a + o1 b, is the same rounded value the
// documented order produces, so hoisting it out of the o2 loop is exact.
template <class Sink>
RG_HD void scan_row(const Cell& g, const Centre& c, const Pair& pr, int o0w, int o1w, int lo2, int hi2, Sink& sink) {
  const int o0 = o0w + pr.ds[0], o1 = o1w + pr.ds[1];
  const double f0 = (double)o0, f1 = (double)o1;
  double row[3];
  for (int k = 0; k < 3; ++k) row[k] = xadd(xmul(f0, g.C[k]), xmul(f1, g.C[3 + k]));
  const bool self_row = (pr.j == c.i) && o0 == 0 && o1 == 0;
  for (int o2w = lo2; o2w <= hi2; ++o2w) {
    const int o2 = o2w + pr.ds[2];
    const double f2 = (double)o2;
    const double rx = xadd(pr.dp[0], xadd(row[0], xmul(f2, g.C[6])));
    const double ry = xadd(pr.dp[1], xadd(row[1], xmul(f2, g.C[7])));
    const double rz = xadd(pr.dp[2], xadd(row[2], xmul(f2, g.C[8])));
    const double d = xsqrt(xadd(xadd(xmul(rx, rx), xmul(ry, ry)), xmul(rz, rz)));
    if (d <= g.radius && !(self_row && o2 == 0)) sink(quantize(d), pr.j, o0, o1, o2, d);
  }
}

// All candidate images of one pair (brute-force scheme).
template <class Sink>
RG_HD void scan_pair(const Cell& g, const Centre& c, const Pair& pr, Sink& sink) {
  int lo0, hi0;
  range0(g, pr, lo0, hi0);
  for (int o0w = lo0; o0w <= hi0; ++o0w) {
    const double u0 = pr.df[0] + (double)o0w;
    int lo1, hi1;
    if (!range1(g, u0, pr.df[1], lo1, hi1)) continue;
    for (int o1w = lo1; o1w <= hi1; ++o1w) {
      const double u1 = pr.df[1] + (double)o1w;
      int lo2, hi2;
      if (range2(g, u0, u1, pr.df[2], lo2, hi2)) scan_row(g, c, pr, o0w, o1w, lo2, hi2, sink);
    }
  }
}

// One image (o'_0, o'_1, o'_2) of a pair (cell-list scheme): cheap reach pre-filter, then exact.
template <class Sink>
RG_HD void scan_point(const Cell& g, const Centre& c, const Pair& pr, int o0w, int o1w, int o2w, Sink& sink) {
  const double u0 = pr.df[0] + (double)o0w;
  const double u1 = pr.df[1] + (double)o1w;
  const double u2 = pr.df[2] + (double)o2w;
  if (dabs(u0) > g.reach[0] || dabs(u1) > g.reach[1] || dabs(u2) > g.reach[2]) return;
  scan_row(g, c, pr, o0w, o1w, o2w, o2w, sink);
}

// Extended-bin range of a centre along axis k (cell-list scheme).
RG_HD void bin_range(const Cell& g, const Centre& c, int k, long long& lo, long long& hi) {
  const double nb = (double)g.nb[k];
  lo = (long long)dfloor((c.w[k] - g.reach[k] - kFracEps) * nb);
  hi = (long long)dfloor((c.w[k] + g.reach[k] + kFracEps) * nb);
}

// All candidates of the atoms in extended bin (B0, B1, B2). bin_start: per-bin CSR offsets (size
// nbins + 1) into bin_atoms (global indices, sorted by bin).
template <class Sink>
RG_HD void scan_bin(const Cell& g, const Centre& c, long long B0, long long B1, long long B2, const int* bin_start,
                    const int* bin_atoms, const double* pos, const double* wfrac, const int* shift, Sink& sink) {
  const long long O0 = floordiv(B0, g.nb[0]), O1 = floordiv(B1, g.nb[1]), O2 = floordiv(B2, g.nb[2]);
  const int b = (int)(((B0 - O0 * g.nb[0]) * g.nb[1] + (B1 - O1 * g.nb[1])) * g.nb[2] + (B2 - O2 * g.nb[2]));
  for (int t = bin_start[b]; t < bin_start[b + 1]; ++t) {
    Pair pr;
    make_pair(c, bin_atoms[t], pos, wfrac, shift, pr);
    scan_point(g, c, pr, (int)O0, (int)O1, (int)O2, sink);
  }
}

// --------------------------------------------------------------------------------------------
// Work items of the warp form: a centre's enumeration split into independent items.
//   brute force: item t = (x0 * n1 + x1) * n + jl  ->  neighbour start + jl, row (o'_0, o'_1) =
//                (box0 + x0, box1 + x1) of the centre's box (superset of every pair's ranges);
//   cell list:   item t = extended bin (B0, B1, B2) of the centre's bin box.
// --------------------------------------------------------------------------------------------
struct Items {
  long long count;
  long long lo[3];   // box origin (brute force: o'_0, o'_1; cell list: B0, B1, B2)
  long long ext[3];  // box extents
  bool binned;
};

RG_HD void centre_items(const Cell& g, const Centre& c, bool binned, Items& it) {
  it.binned = binned;
  if (binned) {
    long long cnt = 1;
    for (int k = 0; k < 3; ++k) {
      long long lo, hi;
      bin_range(g, c, k, lo, hi);
      it.lo[k] = lo;
      it.ext[k] = hi - lo + 1;
      cnt *= it.ext[k];
    }
    it.count = cnt;
  } else {
    // df_k = w_jk - w_ik lies in [-w_ik, 1 - w_ik], so o'_k in [ceil(-reach - 1 + w_ik), floor(reach + w_ik)].
    long long cnt = c.n;
    for (int k = 0; k < 2; ++k) {
      const long long lo = (long long)dceil(-g.reach[k] - 1.0 + c.w[k] - kFracEps);
      const long long hi = (long long)dfloor(g.reach[k] + c.w[k] + kFracEps);
      it.lo[k] = lo;
      it.ext[k] = hi - lo + 1;
      cnt *= it.ext[k];
    }
    it.lo[2] = 0;
    it.ext[2] = 1;
    it.count = cnt;
  }
}

template <class Sink>
RG_HD void scan_item(const Cell& g, const Centre& c, const Items& it, long long t, const int* bin_start,
                     const int* bin_atoms, const double* pos, const double* wfrac, const int* shift, Sink& sink) {
  if (it.binned) {
    const long long x2 = t % it.ext[2];
    const long long r = t / it.ext[2];
    const long long x1 = r % it.ext[1];
    const long long x0 = r / it.ext[1];
    scan_bin(g, c, it.lo[0] + x0, it.lo[1] + x1, it.lo[2] + x2, bin_start, bin_atoms, pos, wfrac, shift, sink);
    return;
  }
  const long long jl = t % c.n;
  const long long r = t / c.n;
  const int o1w = (int)(it.lo[1] + r % it.ext[1]);
  const int o0w = (int)(it.lo[0] + r / it.ext[1]);
  Pair pr;
  make_pair(c, c.start + (int)jl, pos, wfrac, shift, pr);
  int lo0, hi0;
  range0(g, pr, lo0, hi0);
  if (o0w < lo0 || o0w > hi0) return;
  const double u0 = pr.df[0] + (double)o0w;
  int lo1, hi1;
  if (!range1(g, u0, pr.df[1], lo1, hi1) || o1w < lo1 || o1w > hi1) return;
  const double u1 = pr.df[1] + (double)o1w;
  int lo2, hi2;
  if (range2(g, u0, u1, pr.df[2], lo2, hi2)) scan_row(g, c, pr, o0w, o1w, lo2, hi2, sink);
}

// --------------------------------------------------------------------------------------------
// Warp form of the selection. Per-warp scratch (shared memory on the GPU):
// --------------------------------------------------------------------------------------------
// Candidate counts are 64-bit (a centre's candidates can pass 2^31 at large radii); the kept and
// boundary counts are bounded by cap and kBoundaryCap.
struct WarpScratch {
  unsigned long long hist[kHistBins];
  unsigned long long part[kWarp];
  unsigned long long ncand;
  int nkept, nbound, nsel;
  Cand bound[kBoundaryCap];
  // followed by Cand kept[cap_max]
};

// Histogram bin of a key: monotone non-decreasing in q (a product with a positive constant, then
// truncation), identical on host and device, so bins order the keys.
RG_HD int hist_bin(long long q, double hscale) {
  const double x = (double)q * hscale;
  const int b = (int)x;
  return b < 0 ? 0 : (b >= kHistBins ? kHistBins - 1 : b);
}

#if defined(__CUDA_ARCH__)
#define RG_ATOMIC_ADD(ptr, v) atomicAdd((ptr), (v))
#else
template <class T>
inline T rg_host_fetch_add(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
#define RG_ATOMIC_ADD(ptr, v) rg_host_fetch_add((ptr), (v))
#endif

// ORs error bits into status[0] (atomically on the GPU).
RG_HD void set_status(int64_t* status, int bits) {
#if defined(__CUDA_ARCH__)
  atomicOr(reinterpret_cast<unsigned long long*>(status), (unsigned long long)bits);
#else
  *status |= bits;
#endif
}

// Pass 1 sink: count and histogram.
struct HistSink {
  WarpScratch* ws;
  double hscale;
  unsigned long long count;
  RG_HD void operator()(long long q, int, int, int, int, double) {
    ++count;
    RG_ATOMIC_ADD(&ws->hist[hist_bin(q, hscale)], 1ull);
  }
};

// Pass 2 sink: collect bins < T (kept) and bin T (boundary).
struct CollectSink {
  WarpScratch* ws;
  Cand* kept;
  double hscale;
  int T;
  RG_HD void operator()(long long q, int j, int o0, int o1, int o2, double) {
    const int b = hist_bin(q, hscale);
    if (b > T) return;
    Cand e;
    e.q = q;
    e.j = j;
    e.o[0] = o0;
    e.o[1] = o1;
    e.o[2] = o2;
    if (b < T) {
      kept[RG_ATOMIC_ADD(&ws->nkept, 1)] = e;
    } else {
      ws->bound[RG_ATOMIC_ADD(&ws->nbound, 1)] = e;
    }
  }
};

// Threshold of the warp form, computed identically by every lane after pass 1.
struct Threshold {
  int T;                // bin holding the cap-th key; kHistBins when every candidate is kept
  int below;            // candidates in bins < T (< cap, or all of them when they fit)
  int need;             // how many of bin T are kept
  long long bcount;     // candidates in bin T
};

// Step A (lane-parallel): partial sums of 8 bins per lane.
RG_HD void warp_hist_part(WarpScratch* ws, int lane) {
  constexpr int per = kHistBins / kWarp;
  unsigned long long s = 0;
  for (int b = lane * per; b < (lane + 1) * per; ++b) s += ws->hist[b];
  ws->part[lane] = s;
}

// Step B (every lane, same result).
RG_HD Threshold warp_threshold(const WarpScratch* ws, int cap) {
  Threshold th;
  const unsigned long long total = ws->ncand;
  const unsigned long long ucap = cap < 0 ? 0 : (unsigned long long)cap;
  if (total <= ucap) {
    th.T = kHistBins;
    th.below = (int)total;
    th.need = 0;
    th.bcount = 0;
    return th;
  }
  constexpr int per = kHistBins / kWarp;
  unsigned long long cum = 0;
  int l = 0;
  while (l < kWarp - 1 && cum + ws->part[l] < ucap) {
    cum += ws->part[l];
    ++l;
  }
  int b = l * per;
  while (b < (l + 1) * per - 1 && cum + ws->hist[b] < ucap) {
    cum += ws->hist[b];
    ++b;
  }
  // Bin b holds the keys with ranks cum .. cum + hist[b] - 1 and cum < cap <= cum + hist[b]
  // (requires 1 <= cap < total): the cap kept keys are the cum keys of the bins < b and the
  // cap - cum >= 1 smallest keys of bin b.
  th.T = b;
  th.below = (int)cum;
  th.need = cap - (int)cum;
  th.bcount = (long long)ws->hist[b];
  return th;
}

// Final step (lane-parallel over entries): writes the kept non-self entries of centre i, in key
// order, to out[0 ..), and counts them into ws->nsel (atomically). kept[0, below) are all kept;
// of bound[0, bcount) the need smallest are kept.
RG_HD void warp_finalize(WarpScratch* ws, const Cand* kept, const Threshold& th, int i, int lane, int* out) {
  int self_below = 0;
  for (int t = 0; t < th.below; ++t) self_below += (kept[t].j == i);
  const int nonself_below = th.below - self_below;
  for (int t = lane; t < th.below; t += kWarp) {
    const Cand e = kept[t];
    if (e.j == i) continue;
    int pos = 0;
    for (int u = 0; u < th.below; ++u) pos += (kept[u].j != i) && key_less(kept[u], e);
    int* dst = out + 4 * pos;
    dst[0] = e.j;
    dst[1] = e.o[0];
    dst[2] = e.o[1];
    dst[3] = e.o[2];
  }
  if (lane == 0) RG_ATOMIC_ADD(&ws->nsel, nonself_below);
  const int bcount = (int)th.bcount;  // <= kBoundaryCap here
  for (int t = lane; t < bcount; t += kWarp) {
    const Cand e = ws->bound[t];
    int rank = 0, pos = 0;
    for (int u = 0; u < bcount; ++u) {
      const bool lt = key_less(ws->bound[u], e);
      rank += lt;
      pos += lt && (ws->bound[u].j != i);
    }
    if (rank >= th.need || e.j == i) continue;
    int* dst = out + 4 * (nonself_below + pos);
    dst[0] = e.j;
    dst[1] = e.o[0];
    dst[2] = e.o[1];
    dst[3] = e.o[2];
    RG_ATOMIC_ADD(&ws->nsel, 1);
  }
}

// Sequential fallback of the warp form (one lane): top-K by insertion into a Cand buffer of cap
// entries (the warp's kept[] area, unused in that case).
struct TopKSink {
  Cand* buf;
  int n;
  int cap;
  unsigned long long count;
  RG_HD void operator()(long long q, int j, int o0, int o1, int o2, double) {
    ++count;
    Cand e;
    e.q = q;
    e.j = j;
    e.o[0] = o0;
    e.o[1] = o1;
    e.o[2] = o2;
    topk_push(buf, n, cap, e);
  }
};

// Per-centre setup from the global arrays. ptr: CSR of crystals (n_graphs + 1 entries).
RG_HD int crystal_of(const int64_t* ptr, int n_graphs, long long i) {
  // last g with ptr[g] <= i (skipping empty crystals)
  int lo = 0, hi = n_graphs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (ptr[mid] <= i) lo = mid; else hi = mid - 1;
  }
  return lo;
}

RG_HD void make_centre(int i, long long start, long long n, const double* pos, const double* wfrac, const int* shift,
                       Centre& c) {
  c.i = i;
  c.start = (int)start;
  c.n = (int)n;
  for (int k = 0; k < 3; ++k) {
    c.p[k] = pos[3 * i + k];
    c.w[k] = wfrac[3 * i + k];
    c.s[k] = shift[3 * i + k];
  }
}

// Slot t of the output of centre i (GPU emit step, also used by the CPU emulation): writes the
// edge at position e of the outputs. kept: (K x 4) int quadruples (j, o0, o1, o2) of centre i.
RG_HD void emit_slot(int i, int t, int kc, const int* kept, const double* pos, const double* cell, long long e,
                     int64_t* edge_index, long long n_edges_cap, int64_t* offsets, double* dist) {
  int j, o0, o1, o2;
  if (t < kc) {
    j = kept[4 * t];
    o0 = kept[4 * t + 1];
    o1 = kept[4 * t + 2];
    o2 = kept[4 * t + 3];
  } else {
    j = i;
    o0 = self_offset(t - kc, 0);
    o1 = self_offset(t - kc, 1);
    o2 = self_offset(t - kc, 2);
  }
  edge_index[e] = j;
  edge_index[n_edges_cap + e] = i;
  offsets[3 * e] = o0;
  offsets[3 * e + 1] = o1;
  offsets[3 * e + 2] = o2;
  dist[e] = edge_length(pos + 3 * i, pos + 3 * j, cell, o0, o1, o2);
}

// --------------------------------------------------------------------------------------------
// The warp form, step by step. The CUDA kernel runs each step on all 32 lanes of a warp with a
// __syncwarp() between steps; the CPU emulation (radius_graph_warp_emulation.cpp, algo=1) runs
// each step for lane = 0..31 in turn. Same functions, same step sequence:
//
//   warp_begin;          | sync
//   warp_pass1;          | sync
//   warp_hist_part;      | sync
//   th = warp_threshold  (every lane; warp-uniform decisions below)
//   if cap == 0:                  nothing to keep
//   elif th.bcount > kBoundaryCap: lane 0: warp_fallback
//   else:                warp_pass2; | sync;  warp_finalize
//   | sync; lane 0 stores ws->ncand, ws->nsel | sync
// --------------------------------------------------------------------------------------------
struct WarpArgs {
  const double* pos;
  const double* wfrac;
  const int* shift;
  const int* bin_start;   // crystal's bin CSR (binned crystals only)
  const int* bin_atoms;
};

RG_HD void warp_begin(WarpScratch* ws, int lane) {
  for (int b = lane; b < kHistBins; b += kWarp) ws->hist[b] = 0;
  if (lane == 0) {
    ws->ncand = 0;
    ws->nkept = 0;
    ws->nbound = 0;
    ws->nsel = 0;
  }
}

RG_HD void warp_pass1(WarpScratch* ws, const Cell& g, const Centre& c, const Items& it, const WarpArgs& a, int lane) {
  HistSink sink{ws, g.hscale, 0ull};
  for (long long t = lane; t < it.count; t += kWarp)
    scan_item(g, c, it, t, a.bin_start, a.bin_atoms, a.pos, a.wfrac, a.shift, sink);
  RG_ATOMIC_ADD(&ws->ncand, sink.count);
}

RG_HD void warp_pass2(WarpScratch* ws, Cand* kept, const Cell& g, const Centre& c, const Items& it,
                      const WarpArgs& a, int T, int lane) {
  CollectSink sink{ws, kept, g.hscale, T};
  for (long long t = lane; t < it.count; t += kWarp)
    scan_item(g, c, it, t, a.bin_start, a.bin_atoms, a.pos, a.wfrac, a.shift, sink);
}

// Single-lane fallback: sequential top-K of all items into kept[0, cap), then the non-self
// entries, in order, to out.
RG_HD void warp_fallback(WarpScratch* ws, Cand* kept, int cap, const Cell& g, const Centre& c, const Items& it,
                         const WarpArgs& a, int* out) {
  TopKSink sink{kept, 0, cap, 0ull};
  for (long long t = 0; t < it.count; ++t)
    scan_item(g, c, it, t, a.bin_start, a.bin_atoms, a.pos, a.wfrac, a.shift, sink);
  int m = 0;
  for (int t = 0; t < sink.n; ++t) {
    if (kept[t].j == c.i) continue;
    out[4 * m] = kept[t].j;
    out[4 * m + 1] = kept[t].o[0];
    out[4 * m + 2] = kept[t].o[1];
    out[4 * m + 3] = kept[t].o[2];
    ++m;
  }
  ws->nsel = m;
}


// ============================================================================================
// The CUDA launcher, step by step (radius_graph_cuda.cu). Each kernel's thread (or warp lane)
// runs one of the functions below; the CPU emulation (radius_graph_warp_emulation.cpp,
// _C.radius_graph_cuda_emulated) runs the same functions, thread after thread and lane after lane,
// in the same kernel sequence, so the tests check the GPU's whole select phase (cell list
// included) exactly against the reference on machines without a GPU.
//
//   (zero the cell-list counts)
//   prep_thread     t < max(N, G): crystal t's checks; atom t's wrapped coordinates and, in a
//                   binned crystal, its bin and its rank in the bin (atomic count)
//   scan_job, scan_part | sync, scan_lane     one warp per binned crystal: counts -> bin starts
//   fill_thread     atom t of a binned crystal -> its slot of bin_atoms
//   select_setup, then the warp form above    one warp per centre
//   emit_thread     one thread per (centre, slot)
//
// Which crystals use the cell list: those with more than cell_list_threshold atoms, the CPU
// launcher's rule (radius_graph_cpu.cpp, prepare), with the same bins (choose_bins). Bins are
// CSR offsets into bin_atoms, absolute as in the CPU launcher, so scan_bin reads both alike.
//
// Cell-list scratch: bins has 2 N + 9 G int32 entries, crystal g's at bin_region(ptr, g), 2 n_g + 9
// of them (choose_bins makes at most 2 n_g + 8 bins, and the CSR needs one more); before the scan
// entry 1 + b holds bin b's count. Offsets are 64-bit (2 N + 9 G passes 2^31 before N does).
// Invalid ptr: every step after prep_thread reads status and does nothing (the caller raises).
// ============================================================================================
struct SelectArgs {
  const double* pos = nullptr;         // (N, 3)
  int64_t n_atoms = 0;
  const double* cells = nullptr;       // (G, 3, 3)
  const int64_t* ptr = nullptr;        // (G + 1,)
  int64_t n_graphs = 0;
  double radius = 6.0;
  int64_t max_neighbors = 50;
  const int64_t* reserved = nullptr;   // (N,) or null
  int64_t cell_list_threshold = 0;     // crystals with more atoms are binned (resolved, >= 0)
  double* wfrac = nullptr;             // (N, 3) scratch
  int32_t* shift = nullptr;            // (N, 3) scratch
  int32_t* kept = nullptr;             // (N, K, 4) out: (j, o0, o1, o2) of the kept non-self edges
  int64_t* kept_count = nullptr;       // (N,) out
  int64_t* ncand = nullptr;            // (N,) out
  int64_t* status = nullptr;           // (1,) out: error bits, OR-ed in
  // Cell-list scratch, null when no crystal can have more than cell_list_threshold atoms.
  int32_t* bins = nullptr;             // (2 N + 9 G,) zeroed before prep
  int32_t* bin_atoms = nullptr;        // (N,) atoms by bin within each binned crystal
  int32_t* atom_bin = nullptr;         // (N,) bin of the atom (-1: crystal not binned)
  int32_t* atom_rank = nullptr;        // (N,) its rank among its bin's atoms (arbitrary order)
};

struct EmitArgs {
  const double* pos = nullptr;
  int64_t n_atoms = 0;
  const double* cells = nullptr;
  const int64_t* ptr = nullptr;
  int64_t n_graphs = 0;
  int64_t max_neighbors = 50;
  const int32_t* kept = nullptr;       // from select
  const int64_t* kept_count = nullptr;
  const int64_t* rowptr = nullptr;     // (N + 1,) exclusive scan of kept_count + 6
  int64_t capacity = 0;                // edges allocated in the outputs
  int64_t* edge_index = nullptr;       // (2, capacity)
  int64_t* offsets = nullptr;          // (capacity, 3)
  double* dist = nullptr;              // (capacity,)
};

RG_HD long long bin_region(const int64_t* ptr, long long g) { return 2 * ptr[g] + 9 * g; }
RG_HD long long bins_size(long long n_atoms, long long n_graphs) { return 2 * n_atoms + 9 * n_graphs; }
RG_HD bool ptr_invalid(const SelectArgs& a) { return (a.status[0] & kErrBadPtr) != 0; }

// Thread t of the prep kernel.
RG_HD void prep_thread(const SelectArgs& a, long long t) {
  if (t < a.n_graphs) {
    if (a.ptr[t + 1] < a.ptr[t]) set_status(a.status, kErrBadPtr);
    if (t == 0 && (a.ptr[0] != 0 || a.ptr[a.n_graphs] != a.n_atoms)) set_status(a.status, kErrBadPtr);
    Cell g;
    if (!cell_setup(a.cells + 9 * t, a.radius, g)) set_status(a.status, kErrSingularCell);
  }
  if (t >= a.n_atoms) return;
  double* w = a.wfrac + 3 * t;
  int* s = a.shift + 3 * t;
  w[0] = w[1] = w[2] = 0.0;
  s[0] = s[1] = s[2] = 0;
  if (a.atom_bin) a.atom_bin[t] = -1;
  if (a.n_graphs <= 0) {
    set_status(a.status, kErrBadPtr);
    return;
  }
  const int gi = crystal_of(a.ptr, (int)a.n_graphs, t);
  Cell g;
  if (!cell_setup(a.cells + 9 * gi, a.radius, g)) return;
  if (!atom_frac(a.pos + 3 * t, g, w, s)) set_status(a.status, kErrCoordRange);
  if (!a.bins) return;
  const long long start = a.ptr[gi], end = a.ptr[gi + 1];
  // These bounds keep the count inside the crystal's region even when ptr is invalid.
  if (!(start >= 0 && start <= t && t < end && end <= a.n_atoms && end - start > a.cell_list_threshold)) return;
  choose_bins(g, end - start);
  const int b = bin_of(w, g);
  a.atom_bin[t] = b;
  a.atom_rank[t] = RG_ATOMIC_ADD(&a.bins[bin_region(a.ptr, gi) + 1 + b], 1);
}

// The scan of one crystal's bin counts (one warp).
struct ScanJob {
  bool active;       // binned crystal, valid input
  long long region;  // bin_region of the crystal
  int nbins;
  int start;         // ptr[g]: the crystal's first slot of bin_atoms
};

RG_HD ScanJob scan_job(const SelectArgs& a, long long g) {
  ScanJob j{false, 0, 0, 0};
  if (!a.bins || ptr_invalid(a)) return j;
  const long long start = a.ptr[g], end = a.ptr[g + 1];
  if (!(end - start > a.cell_list_threshold)) return j;
  Cell c;
  if (!cell_setup(a.cells + 9 * g, a.radius, c)) return j;
  choose_bins(c, end - start);
  j.active = true;
  j.region = bin_region(a.ptr, g);
  j.nbins = c.nb[0] * c.nb[1] * c.nb[2];
  j.start = (int)start;
  return j;
}

// Lane `lane` owns the counts of bins [lane * chunk, (lane + 1) * chunk), i.e. entries 1 + b.
RG_HD void scan_chunk(const ScanJob& j, int lane, int& lo, int& hi) {
  const int chunk = (j.nbins + kWarp - 1) / kWarp;
  lo = 1 + lane * chunk;
  hi = lo + chunk;
  if (lo > j.nbins + 1) lo = j.nbins + 1;
  if (hi > j.nbins + 1) hi = j.nbins + 1;
}

// Step 1 (lane-parallel): the lane's total count into part[lane].
RG_HD void scan_part(const SelectArgs& a, const ScanJob& j, int lane, int* part) {
  int lo, hi, s = 0;
  scan_chunk(j, lane, lo, hi);
  const int32_t* r = a.bins + j.region;
  for (int k = lo; k < hi; ++k) s += r[k];
  part[lane] = s;
}

// Step 2 (lane-parallel, after a sync): entry k becomes start + (counts of bins < k), i.e. the
// start of bin k; entry 0 is the crystal's start and entry nbins its end.
RG_HD void scan_lane(const SelectArgs& a, const ScanJob& j, int lane, const int* part) {
  int lo, hi;
  scan_chunk(j, lane, lo, hi);
  int run = j.start;
  for (int l = 0; l < lane; ++l) run += part[l];
  int32_t* r = a.bins + j.region;
  for (int k = lo; k < hi; ++k) {
    run += r[k];
    r[k] = run;
  }
  if (lane == 0) r[0] = j.start;
}

// Thread t of the fill kernel (after the scan).
RG_HD void fill_thread(const SelectArgs& a, long long t) {
  if (t >= a.n_atoms || !a.bins || ptr_invalid(a)) return;
  const int b = a.atom_bin[t];
  if (b < 0) return;
  const int gi = crystal_of(a.ptr, (int)a.n_graphs, t);
  a.bin_atoms[a.bins[bin_region(a.ptr, gi) + b] + a.atom_rank[t]] = (int)t;
}

// Warp-uniform set-up of centre i for the warp form.
struct CentreJob {
  bool active;       // false: nothing to do (invalid input, reported by prep_thread)
  bool bad_reserved;
  int cap;
  Cell g;
  Centre c;
  Items it;
  WarpArgs wa;
};

RG_HD void select_setup(const SelectArgs& a, long long i, CentreJob& J) {
  J.active = false;
  J.bad_reserved = false;
  J.cap = 0;
  if (a.n_graphs <= 0 || ptr_invalid(a)) return;
  const int gi = crystal_of(a.ptr, (int)a.n_graphs, i);
  if (!cell_setup(a.cells + 9 * gi, a.radius, J.g)) return;
  long long start = a.ptr[gi], end = a.ptr[gi + 1];
  start = start < 0 ? 0 : (start > a.n_atoms ? a.n_atoms : start);
  end = end < start ? start : (end > a.n_atoms ? a.n_atoms : end);
  if (i < start || i >= end) return;
  const bool binned = a.bins != nullptr && end - start > a.cell_list_threshold;
  if (binned) choose_bins(J.g, end - start);
  make_centre((int)i, start, end - start, a.pos, a.wfrac, a.shift, J.c);
  centre_items(J.g, J.c, binned, J.it);
  J.wa = WarpArgs{a.pos, a.wfrac, a.shift, binned ? a.bins + bin_region(a.ptr, gi) : nullptr, a.bin_atoms};
  long long res = a.reserved ? a.reserved[i] : 0;
  if (res < 0) {
    J.bad_reserved = true;
    res = 0;
  }
  const long long K = a.max_neighbors;
  const long long capl = K - res;
  J.cap = (int)(capl < 0 ? 0 : (capl > K ? K : capl));
  J.active = true;
}

// Thread idx of the emit kernel: slot t = idx mod (K + 6) of centre i = idx / (K + 6).
RG_HD void emit_thread(const EmitArgs& a, long long idx) {
  const long long slots = a.max_neighbors + 6;
  const long long i = idx / slots;
  const int t = (int)(idx - i * slots);
  const int kc = (int)a.kept_count[i];
  if (t >= kc + 6) return;
  const long long e = a.rowptr[i] + t;
  if (e < 0 || e >= a.capacity) return;
  const int gi = crystal_of(a.ptr, (int)a.n_graphs, i);
  emit_slot((int)i, t, kc, a.kept + 4 * a.max_neighbors * i, a.pos, a.cells + 9 * gi, e, a.edge_index, a.capacity,
            a.offsets, a.dist);
}

}  // namespace e3rg
