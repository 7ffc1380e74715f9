// GraphPath::WarpEmulation (algo=1, tests only): the CUDA kernel's warp algorithm run on the CPU,
// its 32 lanes emulated in turn through the same header steps as the kernel (radius_graph.h, "The
// warp form, step by step"; radius_graph_cuda.cu), so that the tests check the kernel's selection
// exactly against the reference on machines without a GPU. The launcher (radius_graph_cpu.cpp)
// calls centre_warp_emulated for every centre of the batch.

#include <algorithm>
#include <cstddef>
#include <vector>

#include "radius_graph_cpu_internal.h"

namespace e3rg {

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
    const double d = edge_length(a.pos + 3 * i, a.pos + 3 * q[0], a.cells + 9 * g, q[1], q[2], q[3]);
    out.push_back(OutEdge{q[0], {q[1], q[2], q[3]}, d});
  }
}

}  // namespace e3rg
