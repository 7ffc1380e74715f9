// Emulations of the CUDA radius graph on the CPU, for the tests (machines without a GPU):
//
//   * GraphPath::WarpEmulation (algo=1 of radius_graph_cpu): the select kernel's warp algorithm,
//     its 32 lanes emulated in turn through the same header steps as the kernel (radius_graph.h,
//     "The warp form, step by step"), over the CPU launcher's own preparation (bins included). The
//     launcher (radius_graph_cpu.cpp) calls centre_warp_emulated for every centre of the batch.
//   * radius_graph_cuda_emulated (_C.radius_graph_cuda_emulated): the whole CUDA launcher
//     (radius_graph_cuda.cu), kernel after kernel, each kernel's threads (or warps' lanes) in turn,
//     through the per-thread functions of radius_graph.h ("The CUDA launcher, step by step"): the
//     GPU's preparation, its cell-list binning (counts, scan, fill), selection and emit step.

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "output_cache.h"
#include "radius_graph_cpu_internal.h"

namespace e3rg {

namespace {

constexpr int kErrInternal = 64;  // radius_graph_cuda_emulated's own consistency check failed

// The select kernel's warp form for one centre, lanes in turn, between the kernel's syncs.
void warp_select_emulated(WarpScratch* ws, Cand* kept, const Cell& g, const Centre& c, const Items& it,
                          const WarpArgs& wa, int cap, int i, int* out) {
  for (int lane = 0; lane < kWarp; ++lane) warp_begin(ws, lane);
  for (int lane = 0; lane < kWarp; ++lane) warp_pass1(ws, g, c, it, wa, lane);
  for (int lane = 0; lane < kWarp; ++lane) warp_hist_part(ws, lane);
  const Threshold th = warp_threshold(ws, cap);
  if (cap == 0) {
    // nothing kept
  } else if (th.bcount > kBoundaryCap) {
    warp_fallback(ws, kept, cap, g, c, it, wa, out);
  } else {
    for (int lane = 0; lane < kWarp; ++lane) warp_pass2(ws, kept, g, c, it, wa, th.T, lane);
    for (int lane = 0; lane < kWarp; ++lane) warp_finalize(ws, kept, th, i, lane, out);
  }
}

template <class T>
T* alloc_out(size_t n) {
  return static_cast<T*>(out_alloc(sizeof(T) * std::max<size_t>(n, 1)));
}

}  // namespace

void WarpEmu::init(int kmax) {
  mem.assign(sizeof(WarpScratch) + sizeof(Cand) * (size_t)std::max(kmax, 1), 0);
  ws = reinterpret_cast<WarpScratch*>(mem.data());
  kept = reinterpret_cast<Cand*>(mem.data() + sizeof(WarpScratch));
  quad.assign(4 * (size_t)std::max(kmax, 1), 0);
}

void centre_warp_emulated(const CpuArgs& a, const Prepared& P, int i, WarpEmu& W, PodVec<OutEdge>& out, int& kept_n,
                          long long& ncand) {
  const int g = P.graph_of[i];
  const Cell& cg = P.cells[g];
  Centre c;
  make_centre(i, a.ptr[g], a.ptr[g + 1] - a.ptr[g], a.pos, P.wfrac.data(), P.shift.data(), c);
  Items it;
  centre_items(cg, c, P.binned[g] != 0, it);
  WarpArgs wa{a.pos, P.wfrac.data(), P.shift.data(), P.binned[g] ? &P.bin_start[P.bin_off[g]] : nullptr,
              P.bin_atoms.data()};
  warp_select_emulated(W.ws, W.kept, cg, c, it, wa, P.cap[i], i, W.quad.data());
  kept_n = W.ws->nsel;
  ncand = (long long)W.ws->ncand;
  // Distances as the CUDA emit step computes them (emit_slot).
  for (int t = 0; t < kept_n; ++t) {
    const int* q = &W.quad[4 * t];
    const double d = edge_length(a.pos + 3 * i, a.pos + 3 * q[0], a.cells + 9 * g, q[1], q[2], q[3]);
    out.push_back(OutEdge{q[0], {q[1], q[2], q[3]}, d});
  }
}

namespace {

// The select phase of cuda_select (radius_graph_cuda.cu): prep, [scan, fill,] select kernels.
// Also checks what the GPU cannot afford to: every binned crystal's bins fit its scratch region
// and its bin CSR ends at the crystal's end. Returns false when they do not.
bool select_phase(const SelectArgs& a, int64_t* n_binned) {
  const int64_t N = a.n_atoms, G = a.n_graphs;
  for (long long t = 0; t < std::max(N, G); ++t) prep_thread(a, t);
  if (N == 0) return true;
  bool consistent = true;
  if (a.bins) {
    for (long long g = 0; g < G; ++g) {
      const ScanJob j = scan_job(a, g);
      if (!j.active) continue;
      ++*n_binned;
      int part[kWarp];
      for (int lane = 0; lane < kWarp; ++lane) scan_part(a, j, lane, part);
      for (int lane = 0; lane < kWarp; ++lane) scan_lane(a, j, lane, part);
      const long long n = a.ptr[g + 1] - a.ptr[g];
      if ((long long)j.nbins + 1 > 2 * n + 9 || a.bins[j.region + j.nbins] != a.ptr[g + 1]) consistent = false;
    }
    for (long long t = 0; t < N; ++t) fill_thread(a, t);
  }
  std::vector<unsigned char> mem(sizeof(WarpScratch) + sizeof(Cand) * (size_t)std::max<int64_t>(a.max_neighbors, 1));
  WarpScratch* ws = reinterpret_cast<WarpScratch*>(mem.data());
  Cand* kept = reinterpret_cast<Cand*>(mem.data() + sizeof(WarpScratch));
  CentreJob J;
  for (long long i = 0; i < N; ++i) {
    select_setup(a, i, J);
    if (!J.active) {
      a.kept_count[i] = 0;
      a.ncand[i] = 0;
      continue;
    }
    if (J.bad_reserved) set_status(a.status, kErrBadReserved);
    warp_select_emulated(ws, kept, J.g, J.c, J.it, J.wa, J.cap, (int)i, a.kept + 4 * a.max_neighbors * i);
    a.kept_count[i] = ws->nsel;
    a.ncand[i] = (long long)ws->ncand;
  }
  return consistent;
}

}  // namespace

int radius_graph_cuda_emulated(const CpuArgs& in, CpuOut& out, int64_t* n_binned, std::string* err) {
  out = CpuOut{};
  *n_binned = 0;
  const int64_t N = in.n_atoms, G = in.n_graphs, K = in.max_neighbors;
  if (N >= (int64_t(1) << 31) - 64 || K < 0 || K > (int64_t(1) << 20) || !(in.radius >= 0.0 && in.radius < 1e4)) {
    if (err) *err = "radius_graph: too many atoms, invalid max_neighbors or radius outside [0, 1e4)";
    return kErrBadPtr;
  }
  // Scratch as cuda_select's callers (e3relax_fast/ops/compiled.py) and cuda_select allocate it.
  std::vector<double> wfrac(3 * (size_t)N);
  std::vector<int32_t> shift(3 * (size_t)N), kept(4 * (size_t)std::max<int64_t>(N * K, 1));
  std::vector<int64_t> kept_count((size_t)N), ncand((size_t)N);
  int64_t status = 0;
  SelectArgs a;
  a.pos = in.pos;
  a.n_atoms = N;
  a.cells = in.cells;
  a.ptr = in.ptr;
  a.n_graphs = G;
  a.radius = in.radius;
  a.max_neighbors = K;
  a.reserved = in.reserved;
  a.cell_list_threshold = in.cell_list_threshold < 0 ? kDefaultCellListThreshold : in.cell_list_threshold;
  a.wfrac = wfrac.data();
  a.shift = shift.data();
  a.kept = kept.data();
  a.kept_count = kept_count.data();
  a.ncand = ncand.data();
  a.status = &status;
  std::vector<int32_t> scratch;
  if (N > a.cell_list_threshold) {  // as cuda_select
    const long long nb = bins_size(N, G);
    scratch.assign((size_t)(nb + 3 * N), 0);
    a.bins = scratch.data();
    a.bin_atoms = a.bins + nb;
    a.atom_bin = a.bin_atoms + N;
    a.atom_rank = a.atom_bin + N;
  }
  if ((N > 0 || G > 0) && !select_phase(a, n_binned) && !status) {
    if (err) *err = "radius_graph (CUDA emulation): inconsistent cell-list scratch";
    return kErrInternal;
  }
  if (status) {
    if (err) *err = error_message((int)status);
    return (int)status;
  }
  // rowptr: the Python side's cumsum of kept_count + 6; then the emit kernel's threads.
  out.rowptr = alloc_out<int64_t>((size_t)N + 1);
  out.ncand = alloc_out<int64_t>((size_t)N);
  if (!out.rowptr || !out.ncand) {
    out_free(out.rowptr);
    out_free(out.ncand);
    out = CpuOut{};
    if (err) *err = "radius_graph: out of memory";
    return kErrNoMemory;
  }
  out.rowptr[0] = 0;
  for (int64_t i = 0; i < N; ++i) {
    out.rowptr[i + 1] = out.rowptr[i] + kept_count[i] + 6;
    out.ncand[i] = ncand[i];
  }
  const int64_t E = out.rowptr[N];
  out.n_edges = E;
  out.edge_index = alloc_out<int64_t>(2 * (size_t)E);
  out.offsets = alloc_out<int64_t>(3 * (size_t)E);
  out.dist = alloc_out<double>((size_t)E);
  if (!out.edge_index || !out.offsets || !out.dist) {
    for (void* p : {(void*)out.edge_index, (void*)out.offsets, (void*)out.rowptr, (void*)out.dist, (void*)out.ncand})
      out_free(p);
    out = CpuOut{};
    if (err) *err = "radius_graph: out of memory";
    return kErrNoMemory;
  }
  if (G > 0) {
    EmitArgs e;
    e.pos = in.pos;
    e.n_atoms = N;
    e.cells = in.cells;
    e.ptr = in.ptr;
    e.n_graphs = G;
    e.max_neighbors = K;
    e.kept = kept.data();
    e.kept_count = kept_count.data();
    e.rowptr = out.rowptr;
    e.capacity = E;
    e.edge_index = out.edge_index;
    e.offsets = out.offsets;
    e.dist = out.dist;
    for (long long idx = 0; idx < N * (K + 6); ++idx) emit_thread(e, idx);
  }
  return 0;
}

}  // namespace e3rg
