// CPU launcher of the periodic radius graph (spec §3) and its portable paths; shared per-centre
// logic in radius_graph.h, declarations shared with the other CPU files in
// radius_graph_cpu_internal.h.
//
// Phase 0 (serial, O(N + G)): per-crystal geometry, wrapped fractional coordinates of every atom,
//   cell-list bins of the crystals with more than `cell_list_threshold` atoms.
// Phase 1 (threads, one parallel region of thread_pool.h): outputs (output_cache.h) are allocated
//   for the most edges possible (cap + 6 per centre). Work units (groups of small crystals, or
//   ranges of centres of a large one) are taken from an atomic counter; each unit appends its
//   centres' kept non-self edges, centre by centre, to the worker's buffer and counts every
//   centre's candidates. A unit's output offset is known once every earlier unit is done; its
//   worker then copies it there (with the six self-image edges of each centre and its rowptr
//   entries), usually right away, from its cache. When all units are done each worker writes the
//   receiver row (which starts at E) of its units. The output is receiver-sorted by construction
//   (no global sort).
//
// Paths, by CpuArgs::path (GraphPath, radius_graph_api.h; all give the reference's result exactly,
// tests/test_radius_graph_cpu.py checks each):
//   * Auto, small crystal   -> crystal_box: symmetric image-box enumeration (below);
//   * Auto, binned crystal  -> centre_hier over the cell list (scan_bin of the header);
//   * BruteForce            -> centre_hier: brute force with exact per-pair image bounds
//                              (scan_pair of the header), or the cell list;
//   * WarpEmulation         -> the CUDA kernel's warp algorithm, emulated lane by lane
//                              (radius_graph_warp_emulation.cpp);
//   * Portable              -> Auto without its AVX-512 paths (tests).
// On CPUs with AVX-512 F/DQ/VL/BW, Auto runs crystal_box_avx512 for small crystals and
// centre_cells_avx512 for binned ones (the same bins, 8 neighbours at a time; same results,
// radius_graph_cpu_avx512.cpp).
//
// Must be compiled with -ffp-contract=off (the distance is an exact contract, see radius_graph.h).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "output_cache.h"
#include "radius_graph.h"
#include "radius_graph_api.h"
#include "radius_graph_cpu_internal.h"
#include "thread_pool.h"

namespace e3rg {

namespace {

inline bool tuple_less(const Cnd& x, const Cnd& y) {
  if (x.j != y.j) return x.j < y.j;
  if (x.o[0] != y.o[0]) return x.o[0] < y.o[0];
  if (x.o[1] != y.o[1]) return x.o[1] < y.o[1];
  return x.o[2] < y.o[2];
}

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

// Phase 0 (see the top of the file): fills P; returns 0 or the kErr* bits of invalid inputs.
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

// Selects the m = min(n, cap) smallest keys of a centre's candidates, in key order, and appends
// the non-self ones to out. Returns how many were appended.
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
// The launcher: work units over the paths above (and those of the other CPU files), one parallel
// region, outputs written in receiver order.
// ---------------------------------------------------------------------------------------------
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

int64_t default_cell_list_threshold(GraphPath path) {
  return path == GraphPath::Auto && cpu_simd_avx512() ? kDefaultCellListThresholdAvx512 : kDefaultCellListThreshold;
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
  if (args.cell_list_threshold < 0) args.cell_list_threshold = default_cell_list_threshold(a.path);
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
      const bool box = (a.path == GraphPath::Auto || a.path == GraphPath::Portable) && !P.binned[g];
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
  const bool use_avx512 = a.path == GraphPath::Auto && cpu_simd_avx512();
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
    if (a.path == GraphPath::WarpEmulation) W.init(K);
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
          if (a.path == GraphPath::WarpEmulation) centre_warp_emulated(a, P, (int)i, W, ob, kept[i], nc);
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
  run_parallel(T, worker1);
  out.n_edges = ordered_edges;
  out.rowptr[N] = ordered_edges;
  return_buffers(bufs);
  return 0;
}

}  // namespace e3rg
