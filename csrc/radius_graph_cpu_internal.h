// Declarations shared by the CPU radius-graph files (not part of the module's interface, which is
// radius_graph_api.h): the launcher and portable paths (radius_graph_cpu.cpp), the AVX-512 paths
// (radius_graph_cpu_avx512.cpp) and the emulation of the CUDA warp algorithm
// (radius_graph_warp_emulation.cpp). Every file is compiled with -ffp-contract=off (the distance
// is an exact contract, see radius_graph.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "radius_graph.h"
#include "radius_graph_api.h"

// The AVX-512 paths are built on x86-64 with GCC-compatible compilers and run when the CPU has
// AVX-512 F/DQ/VL/BW (cpu_simd_avx512, a run-time check). Each of their functions carries the
// target attribute E3RG_AVX512 instead of the file being compiled with -mavx512*: inline functions
// of the shared headers emitted in that file would then be AVX-512 code, and the linker may keep
// that copy for the portable callers too.
#if defined(__x86_64__) && defined(__GNUC__)
#define E3RG_AVX512_PATH 1
#define E3RG_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))
#endif

namespace e3rg {

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

// Phase 0 of the launcher (prepare, radius_graph_cpu.cpp): what every path reads.
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

struct Ident {  // neighbour and image offset of one candidate
  int j;
  int o[3];
};

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

// Scratch of the image-box paths (crystal_box, crystal_box_avx512) and of centre_cells_avx512,
// one per worker.
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

#ifdef E3RG_AVX512_PATH
// radius_graph_cpu_avx512.cpp: the AVX-512 forms of crystal_box (a whole small crystal) and of the
// cell list (one centre of a binned crystal); same results as the portable paths.
E3RG_AVX512 void crystal_box_avx512(const CpuArgs& a, const Prepared& P, int g, BoxScratch& X, PodVec<OutEdge>& out,
                                    int* kept, int64_t* ncand);
E3RG_AVX512 void centre_cells_avx512(const CpuArgs& a, const Prepared& P, int i, BoxScratch& X, PodVec<OutEdge>& out,
                                     int& kept, long long& ncand);
#endif

// radius_graph_warp_emulation.cpp (GraphPath::WarpEmulation): one centre through the CUDA
// kernel's warp algorithm, lanes emulated in turn. WarpEmu is a worker's scratch, sized by init
// for the largest cap.
struct WarpEmu {
  std::vector<unsigned char> mem;
  WarpScratch* ws = nullptr;
  Cand* kept = nullptr;
  std::vector<int> quad;
  void init(int kmax);
};
void centre_warp_emulated(const CpuArgs& a, const Prepared& P, int i, WarpEmu& W, PodVec<OutEdge>& out, int& kept_n,
                          long long& ncand);

}  // namespace e3rg
