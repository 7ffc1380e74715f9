// AVX-512 paths of the CPU radius graph, chosen at run time by the launcher (radius_graph_cpu.cpp)
// when the CPU has AVX-512 F/DQ/VL/BW (GraphPath::Portable forces the portable paths so that the
// tests compare both). crystal_box_avx512: the same enumeration and result as crystal_box, with
// AVX-512 where the portable path is scalar or relies on auto-vectorisation:
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
//
// Every function here carries E3RG_AVX512 (a target attribute; radius_graph_cpu_internal.h says
// why not a per-file flag). Must be compiled with -ffp-contract=off like the rest: GCC implements
// _mm512_mul_pd/_mm512_add_pd as plain vector operators and would otherwise fuse them into FMAs
// (the AVX-512 target includes FMA), which breaks the exact distance contract.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "radius_graph_cpu_internal.h"

#ifdef E3RG_AVX512_PATH
#include <immintrin.h>
#endif

namespace e3rg {

#ifdef E3RG_AVX512_PATH
namespace {

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
// network up to 128 keys or the Selector; returns the first m = min(nc, cap) keys in (q, index)
// order. With `lex` the list is in (neighbour, offset) order, so (q, index) is the contract's
// order; otherwise (cell list) runs of equal q are reordered by (neighbour, offset), including the
// run at the cut, whose members beyond the first m are looked up among all keys.
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

}  // namespace

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

}  // namespace e3rg
