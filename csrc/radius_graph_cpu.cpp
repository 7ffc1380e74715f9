// CPU launcher of the periodic radius graph (spec §3); shared per-centre logic in radius_graph.h.
//
// Phase 0 (serial, O(N + G)): per-crystal geometry, wrapped fractional coordinates of every atom,
//   cell-list bins of the crystals with more than `cell_list_threshold` atoms.
// Phase 1 (threads, one parallel region): outputs are allocated for the most edges possible
//   (cap + 6 per centre). Work units (groups of small crystals, or ranges of centres of a large
//   one) are taken from an atomic counter; each unit appends its centres' kept non-self edges,
//   centre by centre, to the worker's buffer and counts every centre's candidates. A unit's output
//   offset is known once every earlier unit is done; its worker then copies it there (with the six
//   self-image edges of each centre and its rowptr entries), usually right away, from its cache.
//   When all units are done each worker writes the receiver row (which starts at E) of its units.
//   The output is receiver-sorted by construction (no global sort).
//
// Paths (all give the reference's result exactly; tests/test_radius_graph_cpu.py checks each):
//   * algo 0, small crystal   -> crystal_box: symmetric image-box enumeration (below);
//   * algo 0, binned crystal  -> centre_hier over the cell list (scan_bin of the header), or
//                                centre_cells_avx512 (the same bins, 8 neighbours at a time);
//   * algo 2                  -> centre_hier: brute force with exact per-pair image bounds
//                                (scan_pair of the header), or the cell list;
//   * algo 1                  -> the CUDA kernel's warp algorithm, emulated lane by lane;
//   * algo 3                  -> algo 0 without its AVX-512 paths (tests).
// On CPUs with AVX-512 F/DQ/VL/BW, algo 0 runs crystal_box_avx512 for small crystals and
// centre_cells_avx512 for binned ones (same results, see there).
//
// Must be compiled with -ffp-contract=off (the distance is an exact contract, see radius_graph.h).

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

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
  // Binned crystals, in bin_atoms order (AVX-512 cell-list path): positions and integer shifts
  // (as doubles, exact), and each atom's position in that order.
  std::vector<double> bx, by, bz, bs0, bs1, bs2;
  std::vector<int> bin_pos;       // (N,)
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
    if (P.bx.empty()) {
      for (auto* v : {&P.bx, &P.by, &P.bz, &P.bs0, &P.bs1, &P.bs2}) v->resize(N);
      P.bin_pos.resize(N);
    }
    for (int64_t t = s; t < e; ++t) {
      const int i = P.bin_atoms[t];
      P.bin_pos[i] = (int)t;
      P.bx[t] = a.pos[3 * i];
      P.by[t] = a.pos[3 * i + 1];
      P.bz[t] = a.pos[3 * i + 2];
      P.bs0[t] = P.shift[3 * i];
      P.bs1[t] = P.shift[3 * i + 1];
      P.bs2[t] = P.shift[3 * i + 2];
    }
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
struct Ident {  // neighbour and image offset of one candidate
  int j;
  int o[3];
};

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
  // AVX-512 path: candidates per centre as squared lengths (then lengths) and identities.
  std::vector<PodVec<double>> slists;
  std::vector<PodVec<Ident>> ilists;
  PodVec<double> sblock;      // squared lengths of one j's images (8-padded)
  PodVec<uint8_t> mblock;     // their within-radius bit masks, 8 images per byte
  PodVec<uint64_t> kbuf;      // one centre's keys, padded to the sorting network's size
  PodVec<uint32_t> kbuf32;    // the same as 32-bit keys (at most 128 candidates, radius < 33.5 Å)
  PodVec<double> cs;          // cell-list path: one centre's candidates (squared lengths, then
  PodVec<Ident> cid;          // lengths) and identities
  PodVec<int> row_lo, row_hi;  // E range of each (A, B) row of the image box
  void resize(size_t n) {
    for (auto* v : {&ia, &ib, &ie}) v->resize(n);
    for (auto* v : {&fa, &fb, &fe, &shx, &shy, &shz}) v->resize(n);
  }
};


// Squared radius around an image cell's centre within which the cell may hold a candidate of an
// atom: bound radius plus the cell's circumradius, widened for rounding.
inline double image_lim2(const Cell& cg, double rcirc) {
  const double lim = std::sqrt(cg.rb2) + rcirc + 1e-6;
  return lim * lim * (1.0 + 1e-12);
}

// The image list of one centre (wrapped fractional coordinates wi): the o' of its box (per axis
// [ceil(-reach - 1 + w_i), floor(reach + w_i)]) whose whole image cell may reach within the radius
// (image cell centre within sqrt(lim2) of the centre atom), in lexicographic order,
// with their shifts ((o0 a + o1 b) + o2 c). Returns their number T; zero_slot = the slot of
// o' = 0 or -1. (image_list_avx512 builds the same list, up to rounding at its border: both are
// supersets of the images within the radius, whose exact test decides.)
inline int image_list(const Cell& cg, const double* wi, double lim2, BoxScratch& X, int& zero_slot) {
  const double* C = cg.C;
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
  zero_slot = -1;
  for (long long A = lo[0]; A <= hi[0]; ++A) {
    const double u0 = (double)A + 0.5 - wi[0];
    for (long long B = lo[1]; B <= hi[1]; ++B) {
      // The image cells of this row whose centre u0 a + u1 b + u2 c lies within the bounding
      // sphere: a quadratic in u2, solved, and widened by 1e-6 (fractional) for rounding.
      const double u1 = (double)B + 0.5 - wi[1];
      const double vc = u0 * cg.ac + u1 * cg.bc;
      const double vv = (u0 * u0 * cg.aa + 2.0 * u0 * u1 * cg.ab) + u1 * u1 * cg.bb;
      const double disc = vc * vc - cg.cc * (vv - lim2);
      if (!(disc >= 0.0)) continue;
      const double sq = std::sqrt(disc);
      const long long e_lo = std::max(lo[2], (long long)dceil((-vc - sq) * cg.inv_cc - 0.5 + wi[2] - 1e-6));
      const long long e_hi = std::min(hi[2], (long long)dfloor((-vc + sq) * cg.inv_cc - 0.5 + wi[2] + 1e-6));
      for (long long E = e_lo; E <= e_hi; ++E) {
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
    }
  }
  return T;
}

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
  const double lim2 = image_lim2(cg, P.rcirc[g]);
  const double sr = P.sr;
  for (int il = 0; il < n; ++il) {
    const int i = start + il;
    const double* wi = &P.wfrac[3 * i];
    const int* si = &P.shift[3 * i];
    const double* pi = a.pos + 3 * i;
    int zero_slot = -1;
    const int T = image_list(cg, wi, lim2, X, zero_slot);
    const int* ia = X.ia.data();
    const int* ib = X.ib.data();
    const int* ie = X.ie.data();
    const double* fa = X.fa.data();
    const double* fb = X.fb.data();
    const double* fe = X.fe.data();
    const double* shx = X.shx.data();
    const double* shy = X.shy.data();
    const double* shz = X.shz.data();
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


// ---------------------------------------------------------------------------------------------
// AVX-512 paths, chosen at run time when the CPU has AVX-512 F/DQ/VL/BW (algo=3 forces the
// portable paths so that the tests compare both). crystal_box_avx512: the same enumeration and
// result as crystal_box, with AVX-512 where the portable path is scalar or relies on
// auto-vectorisation:
//   * the 8-wide distance loop yields a bit mask of the images within the radius, and the hits
//     are read off the mask (no scalar compaction pass over every image);
//   * a hit stores only its squared length and identity; sqrt and quantisation run later, 8
//     candidates at a time, per centre (vsqrtpd/vdivpd are correctly rounded like their scalar
//     forms, and the conversion rounds half to even like llrint in the default mode);
//   * a centre's keys (q << kIdxBits | index) are sorted by a bitonic network in registers when
//     they fit in 128 slots (padding keys are all ones, larger than any real key; packed into
//     32 bits, q << 7 | index, when the radius allows), else by the portable counting-sort
//     Selector.
// Keys are unique (the index is in the low bits), so any correct sort gives the same order.
// centre_cells_avx512 does the same for the cell list (see there).
// ---------------------------------------------------------------------------------------------
#if defined(__x86_64__) && defined(__GNUC__)
#define E3RG_AVX512_PATH 1
#define E3RG_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))

// Bitonic sorting network on unsigned keys in AVX-512 registers, for 64-bit keys (8 per register)
// or 32-bit keys (16 per register; half the work for the same count). A step pairs lane l with
// lane l ^ x; the lanes in `upper` keep the larger key. The lane permutations are built once per
// sort (the constructor) and stay in registers.
struct Keys64 {
  using Key = uint64_t;
  static constexpr int kLanes = 8;
  __m512i x1, x2, x3, x4, x7;
  E3RG_AVX512 Keys64() : x1(lane_xor(1)), x2(lane_xor(2)), x3(lane_xor(3)), x4(lane_xor(4)), x7(lane_xor(7)) {}
  E3RG_AVX512 static __m512i lane_xor(int x) {
    return _mm512_set_epi64(7 ^ x, 6 ^ x, 5 ^ x, 4 ^ x, 3 ^ x, 2 ^ x, 1 ^ x, 0 ^ x);
  }
  E3RG_AVX512 static __m512i min(__m512i a, __m512i b) { return _mm512_min_epu64(a, b); }
  E3RG_AVX512 static __m512i max(__m512i a, __m512i b) { return _mm512_max_epu64(a, b); }
  E3RG_AVX512 __m512i reverse(__m512i v) const { return _mm512_permutexvar_epi64(x7, v); }
  E3RG_AVX512 static __m512i cx(__m512i v, __m512i perm, __mmask8 upper) {
    const __m512i p = _mm512_permutexvar_epi64(perm, v);
    return _mm512_mask_blend_epi64(upper, _mm512_min_epu64(v, p), _mm512_max_epu64(v, p));
  }
  E3RG_AVX512 __m512i sort(__m512i w) const {  // the register's 8 keys
    w = cx(w, x1, 0xAA);
    w = cx(cx(w, x3, 0xCC), x1, 0xAA);
    return cx(cx(cx(w, x7, 0xF0), x2, 0xCC), x1, 0xAA);
  }
  E3RG_AVX512 __m512i clean(__m512i w) const {  // a bitonic register's 8 keys
    return cx(cx(cx(w, x4, 0xF0), x2, 0xCC), x1, 0xAA);
  }
};
struct Keys32 {
  using Key = uint32_t;
  static constexpr int kLanes = 16;
  __m512i x1, x2, x3, x4, x7, x8, x15;
  E3RG_AVX512 Keys32()
      : x1(lane_xor(1)), x2(lane_xor(2)), x3(lane_xor(3)), x4(lane_xor(4)), x7(lane_xor(7)), x8(lane_xor(8)),
        x15(lane_xor(15)) {}
  E3RG_AVX512 static __m512i lane_xor(int x) {
    return _mm512_set_epi32(15 ^ x, 14 ^ x, 13 ^ x, 12 ^ x, 11 ^ x, 10 ^ x, 9 ^ x, 8 ^ x, 7 ^ x, 6 ^ x, 5 ^ x, 4 ^ x,
                            3 ^ x, 2 ^ x, 1 ^ x, 0 ^ x);
  }
  E3RG_AVX512 static __m512i min(__m512i a, __m512i b) { return _mm512_min_epu32(a, b); }
  E3RG_AVX512 static __m512i max(__m512i a, __m512i b) { return _mm512_max_epu32(a, b); }
  E3RG_AVX512 __m512i reverse(__m512i v) const { return _mm512_permutexvar_epi32(x15, v); }
  E3RG_AVX512 static __m512i cx(__m512i v, __m512i perm, __mmask16 upper) {
    const __m512i p = _mm512_permutexvar_epi32(perm, v);
    return _mm512_mask_blend_epi32(upper, _mm512_min_epu32(v, p), _mm512_max_epu32(v, p));
  }
  E3RG_AVX512 __m512i sort(__m512i w) const {  // the register's 16 keys
    w = cx(w, x1, 0xAAAA);
    w = cx(cx(w, x3, 0xCCCC), x1, 0xAAAA);
    w = cx(cx(cx(w, x7, 0xF0F0), x2, 0xCCCC), x1, 0xAAAA);
    return cx(cx(cx(cx(w, x15, 0xFF00), x4, 0xF0F0), x2, 0xCCCC), x1, 0xAAAA);
  }
  E3RG_AVX512 __m512i clean(__m512i w) const {  // a bitonic register's 16 keys
    return cx(cx(cx(cx(w, x8, 0xFF00), x4, 0xF0F0), x2, 0xCCCC), x1, 0xAAAA);
  }
};

// Sorts kLanes * R keys in place, ascending: each register by the in-register network, then
// bitonic merges of doubling size (first step against the reversed partner block, then
// half-cleaners across registers and inside them).
template <class L, int R>
E3RG_AVX512 void bitonic_sort(typename L::Key* keys) {
  constexpr int n = L::kLanes;
  const L net;
  __m512i v[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) v[r] = net.sort(_mm512_loadu_si512(keys + n * r));
#pragma GCC unroll 4
  for (int w = 2; w <= R; w *= 2) {  // merge blocks of w registers
#pragma GCC unroll 16
    for (int b = 0; b < R; b += w)
#pragma GCC unroll 8
      for (int k = 0; k < w / 2; ++k) {  // key i meets key i ^ (n w - 1)
        const __m512i lo = v[b + k], hi = net.reverse(v[b + w - 1 - k]);
        v[b + k] = L::min(lo, hi);
        v[b + w - 1 - k] = net.reverse(L::max(lo, hi));
      }
#pragma GCC unroll 4
    for (int d = w / 4; d >= 1; d /= 2)  // key i meets key i ^ n d
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        if (!(r & d)) {
          const __m512i lo = v[r], hi = v[r + d];
          v[r] = L::min(lo, hi);
          v[r + d] = L::max(lo, hi);
        }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) v[r] = net.clean(v[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_storeu_si512(keys + n * r, v[r]);
}

// The contract's squared length 8 lanes at a time, in the documented operation order:
// r = dp + ((o0 a + o1 b) + o2 c), s = (rx rx + ry ry) + rz rz (no FMA: separate mul and add).
struct CellVec {  // the cell's nine entries, broadcast
  __m512d c[9];
  E3RG_AVX512 explicit CellVec(const double* C) {
    for (int k = 0; k < 9; ++k) c[k] = _mm512_set1_pd(C[k]);
  }
};
E3RG_AVX512 inline __m512d norm2(__m512d rx, __m512d ry, __m512d rz) {
  return _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(rx, rx), _mm512_mul_pd(ry, ry)), _mm512_mul_pd(rz, rz));
}
E3RG_AVX512 inline __m512d sq_length(const CellVec& cv, __m512d dx, __m512d dy, __m512d dz, __m512d o0, __m512d o1,
                                     __m512d o2) {
  const __m512d* c = cv.c;
  const __m512d rx = _mm512_add_pd(
      dx, _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(o0, c[0]), _mm512_mul_pd(o1, c[3])), _mm512_mul_pd(o2, c[6])));
  const __m512d ry = _mm512_add_pd(
      dy, _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(o0, c[1]), _mm512_mul_pd(o1, c[4])), _mm512_mul_pd(o2, c[7])));
  const __m512d rz = _mm512_add_pd(
      dz, _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(o0, c[2]), _mm512_mul_pd(o1, c[5])), _mm512_mul_pd(o2, c[8])));
  return norm2(rx, ry, rz);
}

// Squared lengths of one neighbour's images (T slots, 8-padded) into X.sblock and their
// within-radius masks into X.mblock; returns the number of hits.
E3RG_AVX512 inline int box_distances(const CellVec& cv, double dpx, double dpy, double dpz, int d0, int d1, int d2,
                                     int T, double sr, int zero_slot, BoxScratch& X) {
  const int nblk = (T + 7) >> 3;
  if ((int)X.mblock.size() < nblk) {
    X.mblock.resize(2 * nblk);
    X.sblock.resize(16 * nblk);
  }
  double* ss = X.sblock.data();
  uint8_t* mk = X.mblock.data();
  const __m512d px = _mm512_set1_pd(dpx), py = _mm512_set1_pd(dpy), pz = _mm512_set1_pd(dpz);
  const __m512d srv = _mm512_set1_pd(sr);
  int m = 0;
  if (d0 == 0 && d1 == 0 && d2 == 0) {
    for (int b = 0; b < nblk; ++b) {
      const __m512d rx = _mm512_add_pd(px, _mm512_loadu_pd(X.shx.data() + 8 * b));
      const __m512d ry = _mm512_add_pd(py, _mm512_loadu_pd(X.shy.data() + 8 * b));
      const __m512d rz = _mm512_add_pd(pz, _mm512_loadu_pd(X.shz.data() + 8 * b));
      const __m512d s2 = norm2(rx, ry, rz);
      _mm512_storeu_pd(ss + 8 * b, s2);
      const __mmask8 k = _mm512_cmp_pd_mask(s2, srv, _CMP_LE_OQ);
      mk[b] = (uint8_t)k;
      m += __builtin_popcount(k);
    }
    if (zero_slot >= 0) {  // the zero-offset self pair (only when j == i, the caller's case here)
      const uint8_t bit = (uint8_t)(1u << (zero_slot & 7));
      if (mk[zero_slot >> 3] & bit) {
        mk[zero_slot >> 3] &= (uint8_t)~bit;
        --m;
      }
    }
  } else {
    const __m512d e0 = _mm512_set1_pd(d0), e1 = _mm512_set1_pd(d1), e2 = _mm512_set1_pd(d2);
    for (int b = 0; b < nblk; ++b) {
      const __m512d s2 = sq_length(cv, px, py, pz, _mm512_add_pd(_mm512_loadu_pd(X.fa.data() + 8 * b), e0),
                                   _mm512_add_pd(_mm512_loadu_pd(X.fb.data() + 8 * b), e1),
                                   _mm512_add_pd(_mm512_loadu_pd(X.fe.data() + 8 * b), e2));
      _mm512_storeu_pd(ss + 8 * b, s2);
      const __mmask8 k = _mm512_cmp_pd_mask(s2, srv, _CMP_LE_OQ);
      mk[b] = (uint8_t)k;
      m += __builtin_popcount(k);
    }
  }
  return m;
}

// image_list with AVX-512: the rows' E ranges 8 rows at a time (the same formulas, floor/ceil by
// roundscale), then each row's images written 8 at a time. Slots [T, T rounded up to 8) are
// padding (NaN shifts: never within the radius) for box_distances' 8-wide blocks.
E3RG_AVX512 inline int image_list_avx512(const Cell& cg, const double* wi, double lim2, BoxScratch& X,
                                         int& zero_slot) {
  const double* C = cg.C;
  long long lo[3], hi[3];
  for (int k = 0; k < 3; ++k) {
    lo[k] = (long long)dceil(-cg.reach[k] - 1.0 + wi[k] - kFracEps);
    hi[k] = (long long)dfloor(cg.reach[k] + wi[k] + kFracEps);
  }
  const int n0 = (int)(hi[0] - lo[0] + 1), n1 = (int)(hi[1] - lo[1] + 1);
  const int rows = n0 * n1;
  const size_t box = (size_t)rows * (size_t)(hi[2] - lo[2] + 1);
  if (X.ia.size() < box + 16) X.resize(2 * box + 16);
  if ((int)X.row_lo.size() < rows + 8) {
    X.row_lo.resize(2 * rows + 8);
    X.row_hi.resize(2 * rows + 8);
  }
  int* rlo = X.row_lo.data();
  int* rhi = X.row_hi.data();
  const __m512d aa = _mm512_set1_pd(cg.aa), bb = _mm512_set1_pd(cg.bb), ab = _mm512_set1_pd(cg.ab);
  const __m512d ac = _mm512_set1_pd(cg.ac), bc = _mm512_set1_pd(cg.bc), cc = _mm512_set1_pd(cg.cc);
  const __m512d icc = _mm512_set1_pd(cg.inv_cc), l2 = _mm512_set1_pd(lim2), two = _mm512_set1_pd(2.0);
  const __m512d wlo = _mm512_set1_pd(-0.5 + wi[2] - 1e-6), whi = _mm512_set1_pd(-0.5 + wi[2] + 1e-6);
  const __m512d lo2 = _mm512_set1_pd((double)lo[2]), hi2 = _mm512_set1_pd((double)hi[2]);
  const __m512i riota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (int r0 = 0; r0 < rows; r0 += 8) {
    // row r = (A - lo0) * n1 + (B - lo1)
    const __m512i r = _mm512_add_epi64(riota, _mm512_set1_epi64(r0));
    const __m512d rd = _mm512_cvtepi64_pd(r);
    const __m512d qa = _mm512_roundscale_pd(_mm512_div_pd(rd, _mm512_set1_pd((double)n1)), _MM_FROUND_TO_NEG_INF);
    const __m512d qb = _mm512_sub_pd(rd, _mm512_mul_pd(qa, _mm512_set1_pd((double)n1)));
    // u0 = A + 0.5 - w0 with A = lo0 + qa (the scalar form adds (double)A + 0.5 - w0 in that order)
    const __m512d A = _mm512_add_pd(qa, _mm512_set1_pd((double)lo[0]));
    const __m512d B = _mm512_add_pd(qb, _mm512_set1_pd((double)lo[1]));
    const __m512d u0 = _mm512_sub_pd(_mm512_add_pd(A, _mm512_set1_pd(0.5)), _mm512_set1_pd(wi[0]));
    const __m512d u1 = _mm512_sub_pd(_mm512_add_pd(B, _mm512_set1_pd(0.5)), _mm512_set1_pd(wi[1]));
    const __m512d vc = _mm512_add_pd(_mm512_mul_pd(u0, ac), _mm512_mul_pd(u1, bc));
    const __m512d vv = _mm512_add_pd(
        _mm512_add_pd(_mm512_mul_pd(_mm512_mul_pd(u0, u0), aa), _mm512_mul_pd(_mm512_mul_pd(_mm512_mul_pd(two, u0), u1), ab)),
        _mm512_mul_pd(_mm512_mul_pd(u1, u1), bb));
    const __m512d disc = _mm512_sub_pd(_mm512_mul_pd(vc, vc), _mm512_mul_pd(cc, _mm512_sub_pd(vv, l2)));
    const __mmask8 ok = _mm512_cmp_pd_mask(disc, _mm512_setzero_pd(), _CMP_GE_OQ);
    const __m512d sq = _mm512_sqrt_pd(_mm512_maskz_mov_pd(ok, disc));
    const __m512d nvc = _mm512_sub_pd(_mm512_setzero_pd(), vc);
    const __m512d el = _mm512_roundscale_pd(_mm512_add_pd(_mm512_mul_pd(_mm512_sub_pd(nvc, sq), icc), wlo),
                                            _MM_FROUND_TO_POS_INF);
    const __m512d eh = _mm512_roundscale_pd(_mm512_add_pd(_mm512_mul_pd(_mm512_add_pd(nvc, sq), icc), whi),
                                            _MM_FROUND_TO_NEG_INF);
    // Clamped to [lo2, hi2 + 1] and [lo2 - 1, hi2] (exact int32 conversions); rows with disc < 0
    // (or NaN) get the empty range [hi2 + 1, lo2 - 1].
    const __m512d one = _mm512_set1_pd(1.0);
    const __m512d el_c = _mm512_mask_min_pd(_mm512_add_pd(hi2, one), ok, _mm512_max_pd(el, lo2), _mm512_add_pd(hi2, one));
    const __m512d eh_c = _mm512_mask_max_pd(_mm512_sub_pd(lo2, one), ok, _mm512_min_pd(eh, hi2), _mm512_sub_pd(lo2, one));
    _mm256_storeu_si256((__m256i*)(rlo + r0), _mm512_cvttpd_epi32(el_c));
    _mm256_storeu_si256((__m256i*)(rhi + r0), _mm512_cvttpd_epi32(eh_c));
  }
  int* ia = X.ia.data();
  int* ib = X.ib.data();
  int* ie = X.ie.data();
  double* fa = X.fa.data();
  double* fb = X.fb.data();
  double* fe = X.fe.data();
  double* shx = X.shx.data();
  double* shy = X.shy.data();
  double* shz = X.shz.data();
  const __m256i eiota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  int T = 0;
  zero_slot = -1;
  for (int r = 0; r < rows; ++r) {
    const int el = rlo[r], eh = rhi[r];
    if (el > eh) continue;
    const int A = (int)lo[0] + r / n1, B = (int)lo[1] + r % n1;
    if (A == 0 && B == 0 && el <= 0 && 0 <= eh) zero_slot = T - el;
    const __m512d f0 = _mm512_set1_pd((double)A), f1 = _mm512_set1_pd((double)B);
    const __m512d sx = _mm512_add_pd(_mm512_mul_pd(f0, _mm512_set1_pd(C[0])), _mm512_mul_pd(f1, _mm512_set1_pd(C[3])));
    const __m512d sy = _mm512_add_pd(_mm512_mul_pd(f0, _mm512_set1_pd(C[1])), _mm512_mul_pd(f1, _mm512_set1_pd(C[4])));
    const __m512d sz = _mm512_add_pd(_mm512_mul_pd(f0, _mm512_set1_pd(C[2])), _mm512_mul_pd(f1, _mm512_set1_pd(C[5])));
    for (int e0 = el; e0 <= eh; e0 += 8) {  // full 8-wide stores: the buffers have 16 slots of slack
      const __m256i e = _mm256_add_epi32(eiota, _mm256_set1_epi32(e0));
      const __m512d f2 = _mm512_cvtepi32_pd(e);
      _mm256_storeu_si256((__m256i*)(ia + T), _mm256_set1_epi32(A));
      _mm256_storeu_si256((__m256i*)(ib + T), _mm256_set1_epi32(B));
      _mm256_storeu_si256((__m256i*)(ie + T), e);
      _mm512_storeu_pd(fa + T, f0);
      _mm512_storeu_pd(fb + T, f1);
      _mm512_storeu_pd(fe + T, f2);
      _mm512_storeu_pd(shx + T, _mm512_add_pd(sx, _mm512_mul_pd(f2, _mm512_set1_pd(C[6]))));
      _mm512_storeu_pd(shy + T, _mm512_add_pd(sy, _mm512_mul_pd(f2, _mm512_set1_pd(C[7]))));
      _mm512_storeu_pd(shz + T, _mm512_add_pd(sz, _mm512_mul_pd(f2, _mm512_set1_pd(C[8]))));
      T += std::min(8, eh - e0 + 1);
    }
  }
  const __m512d nan = _mm512_set1_pd(std::numeric_limits<double>::quiet_NaN());
  _mm256_storeu_si256((__m256i*)(ia + T), _mm256_setzero_si256());
  _mm256_storeu_si256((__m256i*)(ib + T), _mm256_setzero_si256());
  _mm256_storeu_si256((__m256i*)(ie + T), _mm256_setzero_si256());
  for (double* p : {fa, fb, fe, shx, shy, shz}) _mm512_storeu_pd(p + T, nan);
  return T;
}

// Appends the kept non-self candidates among the first m sorted keys of a centre's list (lengths
// dl, identities id); returns how many.
inline int emit_keys(int i, const uint64_t* sorted, int m, const Ident* id, const double* dl, PodVec<OutEdge>& out) {
  const size_t base = out.size();
  if (out.capacity() < base + m) out.reserve(2 * (base + m));
  out.resize(base + m);
  OutEdge* dst = out.data() + base;
  int k = 0;
  for (int t = 0; t < m; ++t) {
    const uint64_t c = sorted[t] & kIdxMask;
    const Ident& e = id[c];
    dst[k] = OutEdge{e.j, {e.o[0], e.o[1], e.o[2]}, dl[c]};
    k += e.j != i;
  }
  out.resize(base + k);
  return k;
}

// Top-K selection of one centre's candidates (AVX-512 paths): lengths from the squared lengths
// (in place), keys q << kIdxBits | index (qmax: the largest possible q), sorted by the bitonic
// network up to 128 keys or the Selector; returns the first m = min(nc, cap) keys in (q, index) order. With `lex` the list is in
// (neighbour, offset) order, so (q, index) is the contract's order; otherwise (cell list) runs of
// equal q are reordered by (neighbour, offset), including the run at the cut, whose members
// beyond the first m are looked up among all keys.
E3RG_AVX512 const uint64_t* select_keys(double* dl, const Ident* id, int nc, int m, bool lex, long long qmax,
                                         BoxScratch& X) {
  const __m512d quantum = _mm512_set1_pd(kQuantum);
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i ones = _mm512_set1_epi64(-1);
  int width = 8;
  while (width < nc) width *= 2;
  if ((int)X.kbuf.size() < width) X.kbuf.resize(width);
  uint64_t* key = X.kbuf.data();
  for (int c = 0; c < nc; c += 8) {
    const __mmask8 live = (__mmask8)(nc - c >= 8 ? 0xFF : (1u << (nc - c)) - 1);
    const __m512d d = _mm512_sqrt_pd(_mm512_maskz_loadu_pd(live, dl + c));
    _mm512_mask_storeu_pd(dl + c, live, d);
    const __m512i q = _mm512_cvt_roundpd_epi64(_mm512_div_pd(d, quantum), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i kv = _mm512_or_si512(_mm512_slli_epi64(q, kIdxBits), _mm512_add_epi64(iota, _mm512_set1_epi64(c)));
    _mm512_storeu_si512(key + c, _mm512_mask_blend_epi64(live, ones, kv));
  }
  for (int c = (nc + 7) & ~7; c < width; c += 8) _mm512_storeu_si512(key + c, ones);
  uint64_t* sorted = key;
  if (width >= 16 && width <= 128 && qmax < (1 << 25) - 1) {
    // 32-bit keys q << 7 | index (at most 128 candidates, q below 2^25 - 1 so no real key is all
    // ones): half the network's work.
    if ((int)X.kbuf32.size() < width) X.kbuf32.resize(width);
    uint32_t* k32 = X.kbuf32.data();
    const __m512i low = _mm512_set1_epi64(127);
    for (int c = 0; c < width; c += 8) {
      const __m512i kv = _mm512_loadu_si512(key + c);
      const __m512i packed = _mm512_or_si512(_mm512_slli_epi64(_mm512_srli_epi64(kv, kIdxBits), 7), _mm512_and_si512(kv, low));
      // padding keys (all ones) stay all ones
      _mm256_storeu_si256((__m256i*)(k32 + c), _mm512_cvtepi64_epi32(_mm512_mask_blend_epi64(
          _mm512_cmpeq_epi64_mask(kv, ones), packed, _mm512_set1_epi64(0xFFFFFFFF))));
    }
    switch (width) {
      case 16: bitonic_sort<Keys32, 1>(k32); break;
      case 32: bitonic_sort<Keys32, 2>(k32); break;
      case 64: bitonic_sort<Keys32, 4>(k32); break;
      default: bitonic_sort<Keys32, 8>(k32); break;
    }
    for (int c = 0; c < nc; c += 8) {  // back to the 64-bit form (q << kIdxBits | index), all nc
      const __m512i kv = _mm512_cvtepu32_epi64(_mm256_loadu_si256((const __m256i*)(k32 + c)));
      _mm512_storeu_si512(key + c, _mm512_or_si512(_mm512_slli_epi64(_mm512_srli_epi64(kv, 7), kIdxBits),
                                                   _mm512_and_si512(kv, low)));
    }
  } else {
    switch (width) {
      case 8: bitonic_sort<Keys64, 1>(key); break;
      case 16: bitonic_sort<Keys64, 2>(key); break;
      case 32: bitonic_sort<Keys64, 4>(key); break;
      case 64: bitonic_sort<Keys64, 8>(key); break;
      case 128: bitonic_sort<Keys64, 16>(key); break;
      default:
        X.sel.select(key, nc, m, [](uint64_t x, uint64_t y) { return x < y; });
        sorted = X.sel.sorted.data();
    }
  }
  if (lex) return sorted;
  auto tuple_lt = [id](uint64_t x, uint64_t y) {
    const Ident& u = id[x & kIdxMask];
    const Ident& v = id[y & kIdxMask];
    if (u.j != v.j) return u.j < v.j;
    if (u.o[0] != v.o[0]) return u.o[0] < v.o[0];
    if (u.o[1] != v.o[1]) return u.o[1] < v.o[1];
    return u.o[2] < v.o[2];
  };
  // The run of q at the cut: all its members among the nc keys, the smallest in tuple order kept.
  const uint64_t qb = sorted[m - 1] >> kIdxBits;
  int r0 = m - 1;
  while (r0 > 0 && (sorted[r0 - 1] >> kIdxBits) == qb) --r0;
  std::vector<uint64_t>& run = X.keys;
  run.clear();
  for (int c = 0; c < nc; ++c)  // key holds every key (sorted by the network, or as built)
    if ((key[c] >> kIdxBits) == qb) run.push_back(key[c]);
  if ((int)run.size() > m - r0) {
    std::sort(run.begin(), run.end(), tuple_lt);
    std::copy(run.begin(), run.begin() + (m - r0), sorted + r0);
  }
  // Every run of equal q in the first m, in tuple order.
  for (int r = 0; r < m;) {
    int e = r + 1;
    while (e < m && (sorted[e] >> kIdxBits) == (sorted[r] >> kIdxBits)) ++e;
    if (e - r > 1) std::sort(sorted + r, sorted + e, tuple_lt);
    r = e;
  }
  return sorted;
}

// Cell-list crystals with AVX-512: the same candidates as centre_hier over the cell list, 8
// neighbours at a time. The extended bins of one (B0, B1) row are contiguous in bin order between
// two wraps of B2, so each such segment is one run of atoms with one image o'.
E3RG_AVX512 void centre_cells_avx512(const CpuArgs& a, const Prepared& P, int i, BoxScratch& X, PodVec<OutEdge>& out,
                                     int& kept, long long& ncand) {
  const int g = P.graph_of[i];
  const Cell& cg = P.cells[g];
  Centre c;
  make_centre(i, a.ptr[g], a.ptr[g + 1] - a.ptr[g], a.pos, P.wfrac.data(), P.shift.data(), c);
  const int* bstart = &P.bin_start[P.bin_off[g]];
  long long lo[3], hi[3];
  for (int k = 0; k < 3; ++k) bin_range(cg, c, k, lo[k], hi[k]);
  const int nb0 = cg.nb[0], nb1 = cg.nb[1], nb2 = cg.nb[2];
  const __m512d pix = _mm512_set1_pd(c.p[0]), piy = _mm512_set1_pd(c.p[1]), piz = _mm512_set1_pd(c.p[2]);
  const CellVec cv(cg.C);
  const __m512d srv = _mm512_set1_pd(P.sr);
  const int self_t = P.bin_pos[i];
  PodVec<double>& ls = X.cs;
  PodVec<Ident>& lid = X.cid;
  int n = 0;
  alignas(64) double s2buf[8];
  for (long long B0 = lo[0]; B0 <= hi[0]; ++B0) {
    const long long O0 = floordiv(B0, nb0), b0 = B0 - O0 * nb0;
    for (long long B1 = lo[1]; B1 <= hi[1]; ++B1) {
      const long long O1 = floordiv(B1, nb1), b1 = B1 - O1 * nb1;
      const long long row = (b0 * nb1 + b1) * nb2;
      for (long long B2 = lo[2]; B2 <= hi[2];) {
        const long long O2 = floordiv(B2, nb2);
        const long long last = std::min<long long>(hi[2], (O2 + 1) * nb2 - 1);
        const int t0 = bstart[row + (B2 - O2 * nb2)], t1 = bstart[row + (last - O2 * nb2) + 1];
        B2 = last + 1;
        // o = o' + s_i - s_j, as doubles (exact): ob - s_j
        const int oi0 = (int)O0 + c.s[0], oi1 = (int)O1 + c.s[1], oi2 = (int)O2 + c.s[2];
        const __m512d ob0 = _mm512_set1_pd(oi0), ob1 = _mm512_set1_pd(oi1), ob2 = _mm512_set1_pd(oi2);
        const bool zero_image = O0 == 0 && O1 == 0 && O2 == 0;
        for (int t = t0; t < t1; t += 8) {
          const __mmask8 live = (__mmask8)(t1 - t >= 8 ? 0xFF : (1u << (t1 - t)) - 1);
          const __m512d s2 = sq_length(cv, _mm512_sub_pd(_mm512_maskz_loadu_pd(live, P.bx.data() + t), pix),
                                       _mm512_sub_pd(_mm512_maskz_loadu_pd(live, P.by.data() + t), piy),
                                       _mm512_sub_pd(_mm512_maskz_loadu_pd(live, P.bz.data() + t), piz),
                                       _mm512_sub_pd(ob0, _mm512_maskz_loadu_pd(live, P.bs0.data() + t)),
                                       _mm512_sub_pd(ob1, _mm512_maskz_loadu_pd(live, P.bs1.data() + t)),
                                       _mm512_sub_pd(ob2, _mm512_maskz_loadu_pd(live, P.bs2.data() + t)));
          unsigned k = _mm512_mask_cmp_pd_mask(live, s2, srv, _CMP_LE_OQ);
          if (zero_image && self_t >= t && self_t < t + 8) k &= ~(1u << (self_t - t));  // (i, 0)
          if (!k) continue;
          _mm512_store_pd(s2buf, s2);
          if ((int)ls.size() < n + 8) {
            ls.resize(2 * n + 64);
            lid.resize(2 * n + 64);
          }
          for (; k; k &= k - 1) {
            const int l = __builtin_ctz(k);
            const int j = P.bin_atoms[t + l];
            const int* sj = &P.shift[3 * j];
            ls[n] = s2buf[l];
            lid[n] = Ident{j, {oi0 - sj[0], oi1 - sj[1], oi2 - sj[2]}};
            ++n;
          }
        }
      }
    }
  }
  ncand = n;
  kept = 0;
  const int m = std::min(n, P.cap[i]);
  if (m <= 0) return;
  kept = emit_keys(i, select_keys(ls.data(), lid.data(), n, m, false, cg.qmax, X), m, lid.data(), ls.data(),
                   out);
}

E3RG_AVX512 void crystal_box_avx512(const CpuArgs& a, const Prepared& P, int g, BoxScratch& X, PodVec<OutEdge>& out,
                                    int* kept, int64_t* ncand) {
  const Cell& cg = P.cells[g];
  const CellVec cv(cg.C);
  const int start = (int)a.ptr[g], n = (int)(a.ptr[g + 1] - a.ptr[g]);
  if ((int)X.slists.size() < n) {
    X.slists.resize(n);
    X.ilists.resize(n);
  }
  X.sizes.assign(n, 0);
  const double lim2 = image_lim2(cg, P.rcirc[g]);
  const double sr = P.sr;
  for (int il = 0; il < n; ++il) {
    const int i = start + il;
    const int* si = &P.shift[3 * i];
    const double* pi = a.pos + 3 * i;
    int zero_slot = -1;
    const int T = image_list_avx512(cg, &P.wfrac[3 * i], lim2, X, zero_slot);
    const int* ia = X.ia.data();
    const int* ib = X.ib.data();
    const int* ie = X.ie.data();
    const int nblk = (T + 7) >> 3;
    for (int jl = il; jl < n; ++jl) {
      const int j = start + jl;
      const double* pj = a.pos + 3 * j;
      const int* sj = &P.shift[3 * j];
      const int d0 = si[0] - sj[0], d1 = si[1] - sj[1], d2 = si[2] - sj[2];
      const int m = box_distances(cv, pj[0] - pi[0], pj[1] - pi[1], pj[2] - pi[2], d0, d1, d2, T, sr,
                                  jl == il ? zero_slot : -1, X);
      if (m == 0) continue;
      const double* ss = X.sblock.data();
      const uint8_t* mk = X.mblock.data();
      int& ni = X.sizes[il];
      int& nj = X.sizes[jl];
      for (int l : {il, jl}) {
        const int need = X.sizes[l] + m;
        if ((int)X.slists[l].size() < need) {
          X.slists[l].resize(2 * need);
          X.ilists[l].resize(2 * need);
        }
      }
      double* si_s = X.slists[il].data() + ni;
      Ident* si_id = X.ilists[il].data() + ni;
      ni += m;
      if (jl == il) {
        int h = 0;
        for (int b = 0; b < nblk; ++b)
          for (unsigned k = mk[b]; k; k &= k - 1) {
            const int t = 8 * b + __builtin_ctz(k);
            si_s[h] = ss[t];
            si_id[h] = Ident{j, {ia[t] + d0, ib[t] + d1, ie[t] + d2}};
            ++h;
          }
      } else {
        // Mirrored block written back to front: -o of ascending o is descending, so list j
        // stays in (neighbour, offset) order.
        double* sj_s = X.slists[jl].data() + nj + (m - 1);
        Ident* sj_id = X.ilists[jl].data() + nj + (m - 1);
        nj += m;
        int h = 0;
        for (int b = 0; b < nblk; ++b)
          for (unsigned k = mk[b]; k; k &= k - 1) {
            const int t = 8 * b + __builtin_ctz(k);
            const int o0 = ia[t] + d0, o1 = ib[t] + d1, o2 = ie[t] + d2;
            si_s[h] = ss[t];
            si_id[h] = Ident{j, {o0, o1, o2}};
            sj_s[-h] = ss[t];
            sj_id[-h] = Ident{i, {-o0, -o1, -o2}};
            ++h;
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
    if (m <= 0) continue;
    double* dl = X.slists[il].data();
    const Ident* id = X.ilists[il].data();
    kept[i] = emit_keys(i, select_keys(dl, id, nc, m, true, cg.qmax, X), m, id, dl, out);
  }
}

#endif

}  // namespace

bool cpu_simd_avx512() {
#ifdef E3RG_AVX512_PATH
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  }();
  return has;
#else
  return false;
#endif
}

int64_t default_cell_list_threshold(int algo) {
  return algo == 0 && cpu_simd_avx512() ? kDefaultCellListThresholdAvx512 : kDefaultCellListThreshold;
}

namespace {

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

// Output blocks. The caller releases them with out_free, which keeps up to kOutCacheBytes of them
// for later calls: a graph's outputs are tens of MB, which glibc would map fresh (page faults, ~20 %
// of the copy phase) on every call and unmap on release. A 64-byte header holds the capacity.
constexpr size_t kOutCacheBytes = size_t(128) << 20;
constexpr size_t kOutHeader = 64;
// Never destroyed (like the worker pool): arrays released during interpreter shutdown, after
// static destructors ran, must still find it; the blocks it holds stay reachable.
struct OutCache {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> blocks;  // (capacity, block), most recently released last
  size_t bytes = 0;
};
OutCache& out_cache() {
  static OutCache* cache = new OutCache();
  return *cache;
}

}  // namespace

void* out_alloc(size_t bytes) {
  {
    OutCache& c = out_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    // The smallest cached block that fits without wasting more than about half of it.
    int best = -1;
    for (int t = 0; t < (int)c.blocks.size(); ++t) {
      const size_t cap = c.blocks[t].first;
      if (cap >= bytes && cap <= 2 * bytes + 65536 && (best < 0 || cap < c.blocks[best].first)) best = t;
    }
    if (best >= 0) {
      char* base = static_cast<char*>(c.blocks[best].second);
      c.bytes -= c.blocks[best].first;
      c.blocks.erase(c.blocks.begin() + best);
      return base + kOutHeader;
    }
  }
  char* base = static_cast<char*>(std::malloc(bytes + kOutHeader));
  if (base == nullptr) return nullptr;
  *reinterpret_cast<size_t*>(base) = bytes;
  return base + kOutHeader;
}

void out_free(void* p) {
  if (p == nullptr) return;
  char* base = static_cast<char*>(p) - kOutHeader;
  const size_t cap = *reinterpret_cast<size_t*>(base);
  OutCache& c = out_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (cap > kOutCacheBytes / 2) {
    std::free(base);
    return;
  }
  while (c.bytes + cap > kOutCacheBytes && !c.blocks.empty()) {  // evict the oldest
    c.bytes -= c.blocks.front().first;
    std::free(c.blocks.front().second);
    c.blocks.erase(c.blocks.begin());
  }
  c.blocks.emplace_back(cap, base);
  c.bytes += cap;
}

namespace {

// Persistent helper threads. run(n, fn) calls fn(0) on the caller and fn(1 .. n-1) on helpers;
// fn takes work from a shared atomic counter until none is left. run() returns once every call
// of fn that started has returned; a helper that is scheduled late, after the work is gone, does
// not start (so a loaded machine does not make the caller wait for an idle helper's wake-up).
// Waits spin briefly before blocking: a helper for kHelperSpin after its job (consecutive calls,
// e.g. a batch built in chunks, find it awake), the caller up to kCallerSpin for the helpers'
// last units. Waking a blocked thread costs tens to hundreds of microseconds on a virtual
// machine (the idle vCPU is descheduled), as much as a whole small call.
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
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    fn(0);
    spin_until([this] { return busy_.load() == 0; }, kCallerSpin);
    std::unique_lock<std::mutex> lock(mu_);
    job_ = nullptr;
    done_cv_.wait(lock, [this] { return busy_.load() == 0; });
  }

 private:
  static constexpr auto kHelperSpin = std::chrono::microseconds(200);
  static constexpr auto kCallerSpin = std::chrono::microseconds(2000);

  template <class Pred>
  static void spin_until(Pred done, std::chrono::microseconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    for (int k = 0; !done(); ++k) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if ((k & 63) == 63 && std::chrono::steady_clock::now() > until) return;
    }
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (gen_.load() == seen) {
        lock.unlock();
        spin_until([&] { return gen_.load() != seen; }, kHelperSpin);
        lock.lock();
      }
      cv_.wait(lock, [&] { return job_ != nullptr && gen_.load() != seen && next_slot_ < want_; });
      seen = gen_.load();
      const int slot = next_slot_++;
      const std::function<void(int)>* f = job_;
      busy_.fetch_add(1);
      lock.unlock();
      (*f)(slot);
      lock.lock();
      if (busy_.fetch_sub(1) == 1) done_cv_.notify_all();
    }
  }
  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> busy_{0};
  int want_ = 0, next_slot_ = 1;
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
  CpuArgs args = a;
  if (args.cell_list_threshold < 0) args.cell_list_threshold = default_cell_list_threshold(a.algo);
  if (N > 0 || a.n_graphs > 0) {
    const int e = prepare(args, P);
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
      const bool box = (a.algo == 0 || a.algo == 3) && !P.binned[g];
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
  // Outputs sized for the most edges the graph can have (cap_i + 6 per centre); only the first E
  // entries are written (the untouched rest of the blocks is never faulted in).
  int64_t e_cap = 0;
  for (int64_t i = 0; i < N; ++i) e_cap += P.cap[i] + 6;
  e_cap = std::max<int64_t>(e_cap, 1);
  std::vector<int> kept(N);
  out.ncand = static_cast<int64_t*>(out_alloc(sizeof(int64_t) * std::max<int64_t>(N, 1)));
  out.rowptr = static_cast<int64_t*>(out_alloc(sizeof(int64_t) * (N + 1)));
  out.edge_index = static_cast<int64_t*>(out_alloc(sizeof(int64_t) * 2 * e_cap));
  out.offsets = static_cast<int64_t*>(out_alloc(sizeof(int64_t) * 3 * e_cap));
  out.dist = static_cast<double*>(out_alloc(sizeof(double) * e_cap));
  if (!out.ncand || !out.rowptr || !out.edge_index || !out.offsets || !out.dist) {
    for (void* p : {(void*)out.ncand, (void*)out.rowptr, (void*)out.edge_index, (void*)out.offsets, (void*)out.dist})
      out_free(p);
    out = CpuOut{};
    if (err)
      *err = "radius_graph: out of memory: the outputs for up to " + std::to_string(e_cap) + " edges need " +
             std::to_string((48 * e_cap) >> 20) + " MB";
    return kErrNoMemory;
  }
  std::vector<PodVec<OutEdge>> bufs = take_buffers(T);
  std::vector<int64_t> unit_off(n_units);  // start of the unit's kept edges in its worker's buffer
  std::vector<int64_t> unit_edge(n_units);  // start of the unit's edges in the output
  std::atomic<int64_t> next{0};
  const bool use_avx512 = a.algo == 0 && cpu_simd_avx512();
  (void)use_avx512;
  // Units complete out of order; the output offset of unit u is known once units 0..u-1 are done.
  // A worker copies each of its units to the output as soon as that is so (usually at once,
  // while the unit's edges are still in its cache), so its buffer is emptied and reused.
  std::mutex order_mu;
  std::vector<char> unit_done(n_units, 0);
  std::vector<int64_t> unit_count(n_units);
  int64_t ordered = 0, ordered_edges = 0;  // units [0, ordered) are done; their edges
  std::atomic<int64_t> n_done{0};
  auto flush = [&](const PodVec<OutEdge>& ob, int64_t u) {
    const OutEdge* src = ob.data() + unit_off[u];
    int64_t e = unit_edge[u];
    for (int64_t i = unit_start[u]; i < unit_start[u + 1]; ++i) {
      out.rowptr[i] = e;
      for (int t = 0; t < kept[i]; ++t, ++e, ++src) {
        out.edge_index[e] = src->j;
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
        out.offsets[3 * e] = o0;
        out.offsets[3 * e + 1] = o1;
        out.offsets[3 * e + 2] = o2;
        out.dist[e] = edge_length(pi, pi, cell, o0, o1, o2);
      }
    }
  };
  auto worker1 = [&](int tid) {
    HierScratch S;
    BoxScratch X;
    WarpEmu W;
    if (a.algo == 1) W.init(K);
    PodVec<OutEdge>& ob = bufs[tid];
    std::vector<int64_t> mine, pending;  // this worker's units; those not yet copied
    for (;;) {
      const int64_t u = next.fetch_add(1);
      if (u >= n_units) break;
      unit_off[u] = (int64_t)ob.size();
      const int64_t c0 = unit_start[u], c1 = unit_start[u + 1];
      if (unit_box[u]) {
        for (int64_t c = c0; c < c1;) {
          const int g = P.graph_of[c];
#ifdef E3RG_AVX512_PATH
          if (use_avx512) crystal_box_avx512(a, P, g, X, ob, kept.data(), out.ncand);
          else
#endif
            crystal_box(a, P, g, X, ob, kept.data(), out.ncand);
          c = a.ptr[g + 1];
        }
      } else {
        for (int64_t i = c0; i < c1; ++i) {
          long long nc = 0;
          if (a.algo == 1) centre_warp_emulated(a, P, (int)i, W, ob, kept[i], nc);
#ifdef E3RG_AVX512_PATH
          else if (use_avx512 && P.binned[P.graph_of[i]]) centre_cells_avx512(a, P, (int)i, X, ob, kept[i], nc);
#endif
          else centre_hier(a, P, (int)i, S, ob, kept[i], nc);
          out.ncand[i] = nc;
        }
      }
      int64_t count = 6 * (c1 - c0);
      for (int64_t i = c0; i < c1; ++i) count += kept[i];
      int64_t ready;
      {
        std::lock_guard<std::mutex> lock(order_mu);
        unit_count[u] = count;
        unit_done[u] = 1;
        for (; ordered < n_units && unit_done[ordered]; ++ordered) {
          unit_edge[ordered] = ordered_edges;
          ordered_edges += unit_count[ordered];
        }
        ready = ordered;
      }
      n_done.fetch_add(1);
      mine.push_back(u);
      pending.push_back(u);
      size_t k = 0;
      for (; k < pending.size() && pending[k] < ready; ++k) flush(ob, pending[k]);
      pending.erase(pending.begin(), pending.begin() + (long)k);
      if (pending.empty()) ob.clear();
    }
    if (mine.empty()) return;
    // The rest needs every unit done: the remaining copies and the receiver row, which starts at
    // E. The units still running are held by workers that are running, so this wait ends.
    for (int k = 0; n_done.load() < n_units; ++k) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if ((k & 1023) == 1023) std::this_thread::yield();
    }
    for (int64_t u : pending) flush(ob, u);
    int64_t E;
    {
      std::lock_guard<std::mutex> lock(order_mu);
      E = ordered_edges;
    }
    for (int64_t u : mine) {
      int64_t e = unit_edge[u];
      for (int64_t i = unit_start[u]; i < unit_start[u + 1]; ++i)
        for (int64_t stop = e + kept[i] + 6; e < stop; ++e) out.edge_index[E + e] = i;
    }
  };
  worker_pool().run(T, worker1);
  out.n_edges = ordered_edges;
  out.rowptr[N] = ordered_edges;
  return_buffers(bufs);
  return 0;
}

}  // namespace e3rg
