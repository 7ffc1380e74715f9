// CPU launcher of the periodic radius graph (spec §3); shared per-centre logic in radius_graph.h.
//
// Phase 0 (serial, O(N + G)): per-crystal geometry, wrapped fractional coordinates of every atom,
//   cell-list bins of the crystals with more than `cell_list_threshold` atoms.
// Phase 1 (threads): work units (groups of small crystals, or ranges of centres of a large one)
//   are taken from an atomic counter; each unit appends its centres' kept non-self edges, centre
//   by centre, to the worker's buffer and counts every centre's candidates.
// Phase 2: rowptr = exclusive scan of (kept + 6); outputs allocated once; the units are copied
//   to their final place (by all workers when the output is large) with the six self-image edges
//   of every centre. The output is receiver-sorted by construction (no global sort).
//
// Paths (all give the reference's result exactly; tests/test_radius_graph_cpu.py checks each):
//   * algo 0, small crystal   -> crystal_box: symmetric image-box enumeration (below);
//   * algo 0, binned crystal  -> centre_hier over the cell list (scan_bin of the header);
//   * algo 2                  -> centre_hier: brute force with exact per-pair image bounds
//                                (scan_pair of the header), or the cell list;
//   * algo 1                  -> the CUDA kernel's warp algorithm, emulated lane by lane.
//
// Must be compiled with -ffp-contract=off (the distance is an exact contract, see radius_graph.h).

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "radius_graph.h"
#include "radius_graph_api.h"

namespace e3rg {

namespace {

// std::vector whose resize() leaves new trivially constructible elements uninitialised (they are
// always written before being read): no zero-fill of the candidate and output buffers.
template <class T>
struct DefaultInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  using std::allocator<T>::allocator;
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <class T>
using PodVec = std::vector<T, DefaultInitAllocator<T>>;

struct OutEdge {
  int j;
  int o[3];
  double d;
};

// A candidate: its length, key q, neighbour and offset.
struct Cnd {
  double d;
  long long q;
  int j;
  int o[3];
};

// Selection keys: q << kIdxBits | candidate index. q < 2^34 (radius < 1e4 Å, checked) and fewer
// than 2^30 candidates per centre (memory runs out long before).
constexpr int kIdxBits = 30;
constexpr uint64_t kIdxMask = (uint64_t(1) << kIdxBits) - 1;

inline bool tuple_less(const Cnd& x, const Cnd& y) {
  if (x.j != y.j) return x.j < y.j;
  if (x.o[0] != y.o[0]) return x.o[0] < y.o[0];
  if (x.o[1] != y.o[1]) return x.o[1] < y.o[1];
  return x.o[2] < y.o[2];
}

struct Prepared {
  std::vector<Cell> cells;
  std::vector<int> graph_of;      // (N,)
  std::vector<double> wfrac;      // (N, 3)
  std::vector<int> shift;         // (N, 3)
  std::vector<int> cap;           // (N,)
  std::vector<char> binned;       // (G,)
  std::vector<long long> bin_off; // (G,) offset of the crystal's bin CSR in bin_start
  std::vector<int> bin_start;     // concatenated per-crystal CSRs (nbins + 1 each), absolute
  std::vector<int> bin_atoms;     // (N,) atoms sorted by bin within each crystal
  std::vector<double> rcirc;      // (G,) circumradius of the cell (half its longest body diagonal)
  double sr = 0.0;                // largest s with fl(sqrt(s)) <= radius: d <= radius <=> s <= sr
};

// sqrt is correctly rounded, hence monotone: {s : fl(sqrt(s)) <= R} = {s <= sr}.
inline double sqrt_threshold(double radius) {
  double x = radius * radius;
  while (std::sqrt(x) > radius) x = std::nextafter(x, 0.0);
  for (;;) {
    const double nx = std::nextafter(x, HUGE_VAL);
    if (!(std::sqrt(nx) <= radius)) break;
    x = nx;
  }
  return x;
}

int prepare(const CpuArgs& a, Prepared& P) {
  const int64_t N = a.n_atoms, G = a.n_graphs;
  if (a.ptr[0] != 0 || a.ptr[G] != N) return kErrBadPtr;
  for (int64_t g = 0; g < G; ++g)
    if (a.ptr[g + 1] < a.ptr[g]) return kErrBadPtr;
  int err = 0;
  P.cells.resize(G);
  P.rcirc.resize(G);
  for (int64_t g = 0; g < G; ++g) {
    if (!cell_setup(a.cells + 9 * g, a.radius, P.cells[g])) err |= kErrSingularCell;
    const double* C = a.cells + 9 * g;
    double r2 = 0.0;
    for (int sb = -1; sb <= 1; sb += 2)
      for (int sc = -1; sc <= 1; sc += 2) {
        double v2 = 0.0;
        for (int k = 0; k < 3; ++k) {
          const double v = C[k] + sb * C[3 + k] + sc * C[6 + k];
          v2 += v * v;
        }
        r2 = std::max(r2, v2);
      }
    P.rcirc[g] = 0.5 * std::sqrt(r2);
  }
  if (err) return err;
  P.sr = sqrt_threshold(a.radius);
  P.graph_of.resize(N);
  P.wfrac.resize(3 * N);
  P.shift.resize(3 * N);
  P.cap.resize(N);
  P.binned.assign(G, 0);
  P.bin_off.assign(G, 0);
  P.bin_atoms.resize(N);
  long long total_bins = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t s = a.ptr[g], e = a.ptr[g + 1];
    for (int64_t i = s; i < e; ++i) {
      P.graph_of[i] = (int)g;
      if (!atom_frac(a.pos + 3 * i, P.cells[g], &P.wfrac[3 * i], &P.shift[3 * i])) err |= kErrCoordRange;
      const long long r = a.reserved ? a.reserved[i] : 0;
      if (r < 0) err |= kErrBadReserved;
      P.cap[i] = (int)std::max<long long>(0, a.max_neighbors - std::max<long long>(r, 0));
    }
    if (e - s > a.cell_list_threshold) {
      P.binned[g] = 1;
      choose_bins(P.cells[g], e - s);
      const Cell& cg = P.cells[g];
      total_bins += (long long)cg.nb[0] * cg.nb[1] * cg.nb[2] + 1;
    }
  }
  if (err) return err;
  // Counting sort of the binned crystals' atoms by bin.
  P.bin_start.resize(total_bins);
  long long off = 0;
  std::vector<int> bin_id;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t s = a.ptr[g], e = a.ptr[g + 1];
    if (!P.binned[g]) {
      for (int64_t i = s; i < e; ++i) P.bin_atoms[i] = (int)i;
      continue;
    }
    const Cell& cg = P.cells[g];
    const int nbins = cg.nb[0] * cg.nb[1] * cg.nb[2];
    int* start = &P.bin_start[off];
    P.bin_off[g] = off;
    std::fill(start, start + nbins + 1, 0);
    bin_id.resize(e - s);
    for (int64_t i = s; i < e; ++i) {
      bin_id[i - s] = bin_of(&P.wfrac[3 * i], cg);
      ++start[bin_id[i - s] + 1];
    }
    start[0] = (int)s;
    for (int b = 0; b < nbins; ++b) start[b + 1] += start[b];
    std::vector<int> fill(start, start + nbins);
    for (int64_t i = s; i < e; ++i) P.bin_atoms[fill[bin_id[i - s]]++] = (int)i;
    off += nbins + 1;
  }
  return 0;
}

// Top-K selection of one centre's candidate keys.
struct Selector {
  std::vector<uint64_t> sorted;
  std::vector<int> bucket;

  // The m smallest of the n keys (q << kIdxBits | index), sorted by `less`, into sorted[0, m):
  // a counting sort on q over [qmin, qmax] with about 2n buckets, then an insertion sort of the
  // buckets holding the m smallest (almost sorted already: few, short moves).
  template <class Less>
  void select(const uint64_t* key, long long n, int m, Less less) {
    uint64_t kmin = key[0], kmax = key[0];
    for (long long t = 1; t < n; ++t) {
      kmin = std::min(kmin, key[t]);
      kmax = std::max(kmax, key[t]);
    }
    const uint64_t qmin = kmin >> kIdxBits, range = (kmax >> kIdxBits) - qmin;
    int nb = 16;
    while (nb < 2 * n && nb < 4096) nb *= 2;
    int shift = 0;
    while ((range >> shift) >= (uint64_t)nb) ++shift;
    if ((int)bucket.size() < nb) bucket.resize(nb);
    int* cnt = bucket.data();
    std::fill(cnt, cnt + nb, 0);
    for (long long t = 0; t < n; ++t) ++cnt[((key[t] >> kIdxBits) - qmin) >> shift];
    // Exclusive prefix up to the bucket that completes the m smallest ("last").
    int last = 0;
    long long run = 0;
    for (;; ++last) {
      const int c = cnt[last];
      cnt[last] = (int)run;
      run += c;
      if (run >= m) break;
    }
    const long long total = run;
    if ((long long)sorted.size() < total) sorted.resize(total);
    uint64_t* out = sorted.data();
    for (long long t = 0; t < n; ++t) {
      const int b = (int)(((key[t] >> kIdxBits) - qmin) >> shift);
      if (b <= last) out[cnt[b]++] = key[t];
    }
    for (long long t = 1; t < total; ++t) {
      const uint64_t v = out[t];
      long long p = t;
      while (p > 0 && less(v, out[p - 1])) {
        out[p] = out[p - 1];
        --p;
      }
      out[p] = v;
    }
  }
};

// Selects the m = min(n, cap) smallest keys of a centre's candidates, in key order, and appends
// the non-self ones to out. Returns how many were appended.
// Emits the kept non-self candidates, in the order of the m sorted keys; returns how many.
inline int emit_sorted(int i, const Cnd* L, const uint64_t* sorted, int m, PodVec<OutEdge>& out) {
  const size_t base = out.size();
  if (out.capacity() < base + m) out.reserve(2 * (base + m));
  out.resize(base + m);
  OutEdge* dst = out.data() + base;
  int kept = 0;
  for (int t = 0; t < m; ++t) {
    const Cnd& e = L[sorted[t] & kIdxMask];
    dst[kept] = OutEdge{e.j, {e.o[0], e.o[1], e.o[2]}, e.d};
    kept += e.j != i;
  }
  out.resize(base + kept);
  return kept;
}

// `lex`: the list is in (j, o) order already, so (q, index) is the full key.
inline int select_and_emit(int i, const Cnd* L, long long n, int cap, bool lex,
                           std::vector<uint64_t>& keys, Selector& sel, PodVec<OutEdge>& out) {
  const int m = (int)std::min<long long>(n, cap);
  if (m <= 0) return 0;
  if ((long long)keys.size() < n) keys.resize(n);
  uint64_t* key = keys.data();
  for (long long c = 0; c < n; ++c) key[c] = ((uint64_t)L[c].q << kIdxBits) | (uint64_t)c;
  if (lex) {
    sel.select(key, n, m, [](uint64_t x, uint64_t y) { return x < y; });
  } else {
    sel.select(key, n, m, [L](uint64_t x, uint64_t y) {
      const uint64_t qx = x >> kIdxBits, qy = y >> kIdxBits;
      if (qx != qy) return qx < qy;
      return tuple_less(L[x & kIdxMask], L[y & kIdxMask]);
    });
  }
  return emit_sorted(i, L, sel.sorted.data(), m, out);
}

// ---------------------------------------------------------------------------------------------
// centre_hier: one centre through the header's enumeration (exact per-pair bounds, or the cell
// list); every candidate is collected, then selected.
// ---------------------------------------------------------------------------------------------
struct CollectSinkCpu {
  PodVec<Cnd>* list;
  inline void operator()(long long q, int j, int o0, int o1, int o2, double d) {
    list->push_back(Cnd{d, q, j, {o0, o1, o2}});
  }
};

struct HierScratch {
  PodVec<Cnd> list;
  std::vector<uint64_t> keys;
  Selector sel;
};

inline void centre_hier(const CpuArgs& a, const Prepared& P, int i, HierScratch& S, PodVec<OutEdge>& out,
                        int& kept, long long& ncand) {
  const int g = P.graph_of[i];
  const Cell& cg = P.cells[g];
  Centre c;
  make_centre(i, a.ptr[g], a.ptr[g + 1] - a.ptr[g], a.pos, P.wfrac.data(), P.shift.data(), c);
  S.list.clear();
  CollectSinkCpu sink{&S.list};
  if (P.binned[g]) {
    const int* bstart = &P.bin_start[P.bin_off[g]];
    long long lo[3], hi[3];
    for (int k = 0; k < 3; ++k) bin_range(cg, c, k, lo[k], hi[k]);
    for (long long B0 = lo[0]; B0 <= hi[0]; ++B0)
      for (long long B1 = lo[1]; B1 <= hi[1]; ++B1)
        for (long long B2 = lo[2]; B2 <= hi[2]; ++B2)
          scan_bin(cg, c, B0, B1, B2, bstart, P.bin_atoms.data(), a.pos, P.wfrac.data(), P.shift.data(), sink);
  } else {
    for (int j = c.start; j < c.start + c.n; ++j) {
      Pair pr;
      make_pair(c, j, a.pos, P.wfrac.data(), P.shift.data(), pr);
      scan_pair(cg, c, pr, sink);
    }
  }
  ncand = (long long)S.list.size();
  // Brute force visits j ascending and each pair's images in lexicographic order; the cell list
  // does not.
  kept = select_and_emit(i, S.list.data(), ncand, P.cap[i], !P.binned[g], S.keys, S.sel, out);
}

// ---------------------------------------------------------------------------------------------
// crystal_box: the default path for crystals below the cell-list threshold, a whole crystal at a
// time. For centre i, the images o' of its box (per axis [ceil(-reach - 1 + w_i),
// floor(reach + w_i)], the union of every pair's range) are listed once, minus those whose whole
// image cell lies beyond the radius (bounding-sphere test). For each neighbour j >= i, a
// branch-free (vectorisable) loop over that list computes the exact squared length s of every
// image in the documented operation order; the images with s <= sr are candidates of i, and,
// mirrored (i, -o), of j: the float64 length is exactly symmetric (fl(b - a) = -fl(a - b), the
// shift of -o is the negated shift of o, so r(j -> i, -o) = -r(i -> j, o) bit for bit). This
// trades ~5x more (cheap) distance evaluations for no per-pair bounds and few mispredicted
// branches, and halves the work with the symmetry.
// ---------------------------------------------------------------------------------------------
struct BoxScratch {
  PodVec<int> ia, ib, ie;        // o' of the listed images
  PodVec<double> fa, fb, fe;     // the same as doubles
  PodVec<double> shx, shy, shz;  // their shifts ((o0 a + o1 b) + o2 c), for j with s_j == s_i
  PodVec<double> ss;             // squared lengths of one j's images
  PodVec<int> hit;               // image slots of one j's candidates
  std::vector<PodVec<Cnd>> lists;       // candidates per centre of the crystal (capacity reused)
  std::vector<PodVec<uint64_t>> klists;  // their keys (q << kIdxBits | index in the list)
  std::vector<int> sizes;
  std::vector<uint64_t> keys;
  Selector sel;
  void resize(size_t n) {
    for (auto* v : {&ia, &ib, &ie}) v->resize(n);
    for (auto* v : {&fa, &fb, &fe, &shx, &shy, &shz}) v->resize(n);
  }
};

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void crystal_box(const CpuArgs& a, const Prepared& P, int g, BoxScratch& X, PodVec<OutEdge>& out, int* kept,
                        int64_t* ncand) {
  const Cell& cg = P.cells[g];
  const double* C = cg.C;
  const int start = (int)a.ptr[g], n = (int)(a.ptr[g + 1] - a.ptr[g]);
  if ((int)X.lists.size() < n) {
    X.lists.resize(n);
    X.klists.resize(n);
  }
  X.sizes.assign(n, 0);
  const double lim = std::sqrt(cg.rb2) + P.rcirc[g] + 1e-6;
  const double lim2 = lim * lim * (1.0 + 1e-12);
  const double sr = P.sr;
  for (int il = 0; il < n; ++il) {
    const int i = start + il;
    const double* wi = &P.wfrac[3 * i];
    const int* si = &P.shift[3 * i];
    const double* pi = a.pos + 3 * i;
    // --- image list of centre i ----------------------------------------------------------
    long long lo[3], hi[3];
    for (int k = 0; k < 3; ++k) {
      lo[k] = (long long)dceil(-cg.reach[k] - 1.0 + wi[k] - kFracEps);
      hi[k] = (long long)dfloor(cg.reach[k] + wi[k] + kFracEps);
    }
    const size_t box = (size_t)((hi[0] - lo[0] + 1) * (hi[1] - lo[1] + 1) * (hi[2] - lo[2] + 1));
    if (X.ia.size() < box) X.resize(2 * box);
    int* ia = X.ia.data();
    int* ib = X.ib.data();
    int* ie = X.ie.data();
    double* fa = X.fa.data();
    double* fb = X.fb.data();
    double* fe = X.fe.data();
    double* shx = X.shx.data();
    double* shy = X.shy.data();
    double* shz = X.shz.data();
    int T = 0;
    int zero_slot = -1;
    for (long long A = lo[0]; A <= hi[0]; ++A)
      for (long long B = lo[1]; B <= hi[1]; ++B)
        for (long long E = lo[2]; E <= hi[2]; ++E) {
          const double u0 = (double)A + 0.5 - wi[0], u1 = (double)B + 0.5 - wi[1], u2 = (double)E + 0.5 - wi[2];
          const double cx = u0 * C[0] + u1 * C[3] + u2 * C[6];
          const double cy = u0 * C[1] + u1 * C[4] + u2 * C[7];
          const double cz = u0 * C[2] + u1 * C[5] + u2 * C[8];
          if (cx * cx + cy * cy + cz * cz > lim2) continue;  // the whole image cell is beyond the radius
          if (A == 0 && B == 0 && E == 0) zero_slot = T;
          const double f0 = (double)A, f1 = (double)B, f2 = (double)E;
          ia[T] = (int)A;
          ib[T] = (int)B;
          ie[T] = (int)E;
          fa[T] = f0;
          fb[T] = f1;
          fe[T] = f2;
          shx[T] = xadd(xadd(xmul(f0, C[0]), xmul(f1, C[3])), xmul(f2, C[6]));
          shy[T] = xadd(xadd(xmul(f0, C[1]), xmul(f1, C[4])), xmul(f2, C[7]));
          shz[T] = xadd(xadd(xmul(f0, C[2]), xmul(f1, C[5])), xmul(f2, C[8]));
          ++T;
        }
    if ((int)X.ss.size() < T) {
      X.ss.resize(T);
      X.hit.resize(T);
    }
    double* ss = X.ss.data();
    int* hit = X.hit.data();
    PodVec<Cnd>& Li = X.lists[il];
    // --- neighbours j >= i -----------------------------------------------------------------
    for (int jl = il; jl < n; ++jl) {
      const int j = start + jl;
      const double* pj = a.pos + 3 * j;
      const double dpx = pj[0] - pi[0], dpy = pj[1] - pi[1], dpz = pj[2] - pi[2];
      const int* sj = &P.shift[3 * j];
      const int d0 = si[0] - sj[0], d1 = si[1] - sj[1], d2 = si[2] - sj[2];
      if (d0 == 0 && d1 == 0 && d2 == 0) {
        for (int t = 0; t < T; ++t) {
          const double rx = dpx + shx[t], ry = dpy + shy[t], rz = dpz + shz[t];
          ss[t] = (rx * rx + ry * ry) + rz * rz;
        }
        if (jl == il && zero_slot >= 0) ss[zero_slot] = HUGE_VAL;  // the zero-offset self pair
      } else {
        const double e0 = d0, e1 = d1, e2 = d2;
        for (int t = 0; t < T; ++t) {
          const double o0 = fa[t] + e0, o1 = fb[t] + e1, o2 = fe[t] + e2;
          const double rx = dpx + ((o0 * C[0] + o1 * C[3]) + o2 * C[6]);
          const double ry = dpy + ((o0 * C[1] + o1 * C[4]) + o2 * C[7]);
          const double rz = dpz + ((o0 * C[2] + o1 * C[5]) + o2 * C[8]);
          ss[t] = (rx * rx + ry * ry) + rz * rz;
        }
      }
      int m = 0;
      for (int t = 0; t < T; ++t) {
        hit[m] = t;
        m += ss[t] <= sr;
      }
      if (m == 0) continue;
      PodVec<Cnd>& Lj = X.lists[jl];
      int& ni = X.sizes[il];
      int& nj = X.sizes[jl];
      if ((int)Li.size() < ni + m) {
        Li.resize(2 * (ni + m));
        X.klists[il].resize(2 * (ni + m));
      }
      if ((int)Lj.size() < nj + m) {
        Lj.resize(2 * (nj + m));
        X.klists[jl].resize(2 * (nj + m));
      }
      Cnd* li = Li.data() + ni;
      uint64_t* ki = X.klists[il].data() + ni;
      const uint64_t ci = (uint64_t)ni;
      ni += m;
      if (jl == il) {
        for (int h = 0; h < m; ++h) {
          const int t = hit[h];
          const double d = std::sqrt(ss[t]);
          const long long q = quantize(d);
          li[h] = Cnd{d, q, j, {ia[t] + d0, ib[t] + d1, ie[t] + d2}};
          ki[h] = ((uint64_t)q << kIdxBits) | (ci + h);
        }
      } else {
        // Mirrored block written back to front: -o of ascending o is descending, so list j
        // stays in (neighbour, offset) order.
        Cnd* lj = Lj.data() + nj + (m - 1);
        uint64_t* kj = X.klists[jl].data() + nj + (m - 1);
        const uint64_t cj = (uint64_t)(nj + m - 1);
        nj += m;
        for (int h = 0; h < m; ++h) {
          const int t = hit[h];
          const int o0 = ia[t] + d0, o1 = ib[t] + d1, o2 = ie[t] + d2;
          const double d = std::sqrt(ss[t]);
          const long long q = quantize(d);
          li[h] = Cnd{d, q, j, {o0, o1, o2}};
          ki[h] = ((uint64_t)q << kIdxBits) | (ci + h);
          lj[-h] = Cnd{d, q, i, {-o0, -o1, -o2}};
          kj[-h] = ((uint64_t)q << kIdxBits) | (cj - h);
        }
      }
    }
  }
  // --- selection per centre -----------------------------------------------------------------
  for (int il = 0; il < n; ++il) {
    const int i = start + il;
    const int nc = X.sizes[il];
    const int m = std::min(nc, P.cap[i]);
    ncand[i] = nc;
    kept[i] = 0;
    if (m > 0) {
      X.sel.select(X.klists[il].data(), nc, m, [](uint64_t x, uint64_t y) { return x < y; });
      kept[i] = emit_sorted(i, X.lists[il].data(), X.sel.sorted.data(), m, out);
    }
  }
}

// algo=1: the CUDA warp algorithm, lanes emulated in turn (same header steps as the kernel).
struct WarpEmu {
  std::vector<unsigned char> mem;
  WarpScratch* ws = nullptr;
  Cand* kept = nullptr;
  std::vector<int> quad;
  void init(int kmax) {
    mem.assign(sizeof(WarpScratch) + sizeof(Cand) * (size_t)std::max(kmax, 1), 0);
    ws = reinterpret_cast<WarpScratch*>(mem.data());
    kept = reinterpret_cast<Cand*>(mem.data() + sizeof(WarpScratch));
    quad.assign(4 * (size_t)std::max(kmax, 1), 0);
  }
};

inline void centre_warp_emulated(const CpuArgs& a, const Prepared& P, int i, WarpEmu& W, PodVec<OutEdge>& out,
                                 int& kept_n, long long& ncand) {
  const int g = P.graph_of[i];
  const Cell& cg = P.cells[g];
  Centre c;
  make_centre(i, a.ptr[g], a.ptr[g + 1] - a.ptr[g], a.pos, P.wfrac.data(), P.shift.data(), c);
  Items it;
  centre_items(cg, c, P.binned[g] != 0, it);
  WarpArgs wa{a.pos, P.wfrac.data(), P.shift.data(), P.binned[g] ? &P.bin_start[P.bin_off[g]] : nullptr,
              P.bin_atoms.data()};
  WarpScratch* ws = W.ws;
  const int cap = P.cap[i];
  for (int lane = 0; lane < kWarp; ++lane) warp_begin(ws, lane);
  for (int lane = 0; lane < kWarp; ++lane) warp_pass1(ws, cg, c, it, wa, lane);
  for (int lane = 0; lane < kWarp; ++lane) warp_hist_part(ws, lane);
  const Threshold th = warp_threshold(ws, cap);
  if (cap == 0) {
    // nothing kept
  } else if (th.bcount > kBoundaryCap) {
    warp_fallback(ws, W.kept, cap, cg, c, it, wa, W.quad.data());
  } else {
    for (int lane = 0; lane < kWarp; ++lane) warp_pass2(ws, W.kept, cg, c, it, wa, th.T, lane);
    for (int lane = 0; lane < kWarp; ++lane) warp_finalize(ws, W.kept, th, i, lane, W.quad.data());
  }
  kept_n = ws->nsel;
  ncand = ws->ncand;
  // Distances as the CUDA emit step computes them (emit_slot).
  for (int t = 0; t < kept_n; ++t) {
    const int* q = &W.quad[4 * t];
    out.push_back(OutEdge{q[0], {q[1], q[2], q[3]}, edge_length(a.pos + 3 * i, a.pos + 3 * q[0], a.cells + 9 * g, q[1], q[2], q[3])});
  }
}

// Worker output buffers are kept between calls (capacity retained, up to kPoolBytes in all), so
// repeated calls do not pay for fresh zeroed pages.
constexpr size_t kPoolBytes = size_t(256) << 20;
std::mutex g_pool_mutex;
std::vector<PodVec<OutEdge>> g_pool;

std::vector<PodVec<OutEdge>> take_buffers(int n) {
  std::vector<PodVec<OutEdge>> bufs(n);
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  for (int t = 0; t < n && !g_pool.empty(); ++t) {
    bufs[t].swap(g_pool.back());
    g_pool.pop_back();
    bufs[t].clear();
  }
  return bufs;
}

void return_buffers(std::vector<PodVec<OutEdge>>& bufs) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  size_t held = 0;
  for (auto& b : g_pool) held += b.capacity() * sizeof(OutEdge);
  for (auto& b : bufs) {
    const size_t sz = b.capacity() * sizeof(OutEdge);
    if (held + sz > kPoolBytes) continue;
    held += sz;
    g_pool.emplace_back();
    g_pool.back().swap(b);
  }
}

// Persistent helper threads. run(n, fn) calls fn(0) on the caller and fn(1 .. n-1) on helpers;
// fn takes work from a shared atomic counter until none is left. run() returns once every call
// of fn that started has returned; a helper that is scheduled late, after the work is gone, does
// not start (so a loaded machine does not make the caller wait for an idle helper's wake-up).
class WorkerPool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> serial(call_mu_);  // one parallel region at a time
    {
      std::lock_guard<std::mutex> lock(mu_);
      while ((int)threads_.size() < n - 1) threads_.emplace_back([this] { loop(); });
      job_ = &fn;
      want_ = n;
      next_slot_ = 1;
      ++gen_;
    }
    cv_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(mu_);
    job_ = nullptr;
    done_cv_.wait(lock, [this] { return busy_ == 0; });
  }

 private:
  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return job_ != nullptr && gen_ != seen && next_slot_ < want_; });
      seen = gen_;
      const int slot = next_slot_++;
      const std::function<void(int)>* f = job_;
      ++busy_;
      lock.unlock();
      (*f)(slot);
      lock.lock();
      if (--busy_ == 0) done_cv_.notify_all();
    }
  }
  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t gen_ = 0;
  int want_ = 0, next_slot_ = 1, busy_ = 0;
};

// One pool per process (re-created in a forked child, whose helpers do not exist). Never
// destroyed: its threads wait on a condition variable until the process exits.
WorkerPool& worker_pool() {
  static std::mutex mu;
  static WorkerPool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (pool == nullptr || owner != getpid()) {
    pool = new WorkerPool();
    owner = getpid();
  }
  return *pool;
}

}  // namespace

std::string error_message(int bits) {
  std::string m;
  if (bits & kErrBadPtr) m += "ptr must be a CSR over the atoms (ptr[0] == 0, non-decreasing, ptr[-1] == N); ";
  if (bits & kErrSingularCell) m += "every cell must be finite and non-singular; ";
  if (bits & kErrCoordRange)
    m += "positions must be finite with |p| <= 1e6 Å (and image offsets within int32); ";
  if (bits & kErrBadReserved) m += "reserved must be >= 0; ";
  if (m.empty()) m = "unknown error";
  else m.resize(m.size() - 2);
  return "radius_graph: " + m;
}

int radius_graph_cpu(const CpuArgs& a, CpuOut& out, std::string* err) {
  out = CpuOut{};
  const int64_t N = a.n_atoms;
  if (N >= (int64_t(1) << 31) - 64 || a.max_neighbors < 0 || a.max_neighbors > (int64_t(1) << 24) ||
      !(a.radius >= 0.0 && a.radius < 1e4)) {
    if (err) *err = "radius_graph: too many atoms, invalid max_neighbors or radius outside [0, 1e4)";
    return kErrBadPtr;
  }
  Prepared P;
  if (N > 0 || a.n_graphs > 0) {
    const int e = prepare(a, P);
    if (e) {
      if (err) *err = error_message(e);
      return e;
    }
  }
  const int K = (int)a.max_neighbors;
  int T = a.num_threads > 0 ? a.num_threads : (int)std::max(1u, std::thread::hardware_concurrency());

  // ---- work units: [c0, c1) centre ranges; whole-crystal units for the box path ---------------
  std::vector<int64_t> unit_start;  // unit u covers centres [unit_start[u], unit_start[u + 1])
  std::vector<char> unit_box;       // 1: the unit is a run of whole small crystals (crystal_box)
  {
    // Guided sizes: units shrink towards the end so that a helper preempted in the middle of the
    // last unit (a loaded machine) delays the caller little.
    auto target = [&](int64_t at) { return std::max<int64_t>(16, std::min<int64_t>(256, (N - at) / (int64_t(T) * 4))); };
    unit_start.push_back(0);
    int64_t open = 0;  // atoms in the unit being built
    char open_box = 0;
    auto close = [&](int64_t at) {
      if (at > unit_start.back()) {
        unit_start.push_back(at);
        unit_box.push_back(open_box);
      }
      open = 0;
    };
    for (int64_t g = 0; g < a.n_graphs; ++g) {
      const int64_t s = a.ptr[g], e = a.ptr[g + 1];
      if (e == s) continue;
      const bool box = a.algo == 0 && !P.binned[g];
      if (box) {
        if (!open_box || open + (e - s) > target(s)) close(s);
        open_box = 1;
        open += e - s;
      } else {
        close(s);
        open_box = 0;
        for (int64_t c = s; c < e;) {
          const int64_t c1 = std::min(e, c + target(c));
          close(c1);
          c = c1;
        }
      }
    }
    close(N);
  }
  const int64_t n_units = (int64_t)unit_box.size();
  if (n_units < T) T = (int)std::max<int64_t>(1, n_units);

  // ---- phase 1 ------------------------------------------------------------------------------
  std::vector<int> kept(N);
  out.ncand = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * std::max<int64_t>(N, 1)));
  std::vector<PodVec<OutEdge>> bufs = take_buffers(T);
  std::vector<int> unit_owner(n_units);
  std::vector<int64_t> unit_off(n_units);
  std::atomic<int64_t> next{0};
  auto worker1 = [&](int tid) {
    HierScratch S;
    BoxScratch X;
    WarpEmu W;
    if (a.algo == 1) W.init(K);
    PodVec<OutEdge>& ob = bufs[tid];
    ob.reserve(static_cast<size_t>(std::min<int64_t>(N, 1 << 20) / T + 1) * std::min(K, 64));
    for (;;) {
      const int64_t u = next.fetch_add(1);
      if (u >= n_units) break;
      unit_owner[u] = tid;
      unit_off[u] = (int64_t)ob.size();
      const int64_t c0 = unit_start[u], c1 = unit_start[u + 1];
      if (unit_box[u]) {
        for (int64_t c = c0; c < c1;) {
          const int g = P.graph_of[c];
          crystal_box(a, P, g, X, ob, kept.data(), out.ncand);
          c = a.ptr[g + 1];
        }
        continue;
      }
      for (int64_t i = c0; i < c1; ++i) {
        long long nc = 0;
        if (a.algo == 1) centre_warp_emulated(a, P, (int)i, W, ob, kept[i], nc);
        else centre_hier(a, P, (int)i, S, ob, kept[i], nc);
        out.ncand[i] = nc;
      }
    }
  };
  worker_pool().run(T, worker1);

  // ---- phase 2 ------------------------------------------------------------------------------
  out.rowptr = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * (N + 1)));
  out.rowptr[0] = 0;
  for (int64_t i = 0; i < N; ++i) out.rowptr[i + 1] = out.rowptr[i] + kept[i] + 6;
  const int64_t E = out.rowptr[N];
  out.n_edges = E;
  const int64_t Ea = std::max<int64_t>(E, 1);
  out.edge_index = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * 2 * Ea));
  out.offsets = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * 3 * Ea));
  out.dist = static_cast<double*>(std::malloc(sizeof(double) * Ea));
  std::atomic<int64_t> next2{0};
  auto worker2 = [&](int) {
    for (;;) {
      const int64_t u = next2.fetch_add(1);
      if (u >= n_units) break;
      const OutEdge* src = bufs[unit_owner[u]].data() + unit_off[u];
      for (int64_t i = unit_start[u]; i < unit_start[u + 1]; ++i) {
        int64_t e = out.rowptr[i];
        for (int t = 0; t < kept[i]; ++t, ++e, ++src) {
          out.edge_index[e] = src->j;
          out.edge_index[E + e] = i;
          out.offsets[3 * e] = src->o[0];
          out.offsets[3 * e + 1] = src->o[1];
          out.offsets[3 * e + 2] = src->o[2];
          out.dist[e] = src->d;
        }
        const double* cell = a.cells + 9 * P.graph_of[i];
        const double* pi = a.pos + 3 * i;
        for (int t = 0; t < 6; ++t, ++e) {
          const int o0 = self_offset(t, 0), o1 = self_offset(t, 1), o2 = self_offset(t, 2);
          out.edge_index[e] = i;
          out.edge_index[E + e] = i;
          out.offsets[3 * e] = o0;
          out.offsets[3 * e + 1] = o1;
          out.offsets[3 * e + 2] = o2;
          out.dist[e] = edge_length(pi, pi, cell, o0, o1, o2);
        }
      }
    }
  };
  // Phase 2 is a copy: in parallel only when it is large (saves a wake-up round otherwise).
  if (T > 1 && E > (int64_t(1) << 16)) worker_pool().run(T, worker2);
  else worker2(0);
  return_buffers(bufs);
  return 0;
}

}  // namespace e3rg
