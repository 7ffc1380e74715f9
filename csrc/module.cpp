// nanobind module e3relax_fast._C: the radius-graph launchers over DLPack arrays.
//
// No torch headers: tensors arrive through DLPack (`nb::ndarray`, cpu or cuda), so the module is
// independent of the installed torch version. The Python side (e3relax_fast/_ext.py) prepares
// contiguous float64/int64 inputs, allocates the CUDA outputs with torch (caching allocator,
// current stream) and turns the error codes into exceptions.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "radius_graph.h"
#include "radius_graph_api.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using CpuPos = nb::ndarray<const double, nb::shape<-1, 3>, nb::c_contig, nb::device::cpu>;
using CpuCells = nb::ndarray<const double, nb::shape<-1, 3, 3>, nb::c_contig, nb::device::cpu>;
using CpuI64 = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

template <class T>
nb::ndarray<nb::numpy, T> own(T* p, std::initializer_list<size_t> shape) {
  nb::capsule owner(p, [](void* q) noexcept { std::free(q); });
  return nb::ndarray<nb::numpy, T>(p, shape, owner);
}

nb::tuple radius_graph_cpu(CpuPos pos, CpuCells cells, CpuI64 ptr, double radius, int64_t max_neighbors,
                           std::optional<CpuI64> reserved, int num_threads, int64_t cell_list_threshold, int algo) {
  const int64_t N = (int64_t)pos.shape(0), G = (int64_t)cells.shape(0);
  if ((int64_t)ptr.shape(0) != G + 1) throw nb::value_error("radius_graph: ptr must have G + 1 entries");
  if (reserved && (int64_t)reserved->shape(0) != N)
    throw nb::value_error("radius_graph: reserved must have one entry per atom");
  if (!(radius >= 0.0) || !(radius < 1e4)) throw nb::value_error("radius_graph: radius must be in [0, 1e4)");
  if (algo < 0 || algo > 2) throw nb::value_error("radius_graph: algo must be 0, 1 or 2");
  e3rg::CpuArgs a;
  a.pos = pos.data();
  a.n_atoms = N;
  a.cells = cells.data();
  a.ptr = ptr.data();
  a.n_graphs = G;
  a.radius = radius;
  a.max_neighbors = max_neighbors;
  a.reserved = reserved ? reserved->data() : nullptr;
  a.num_threads = num_threads;
  a.cell_list_threshold = cell_list_threshold;
  a.algo = algo;
  e3rg::CpuOut o;
  std::string err;
  int rc;
  {
    nb::gil_scoped_release release;
    rc = e3rg::radius_graph_cpu(a, o, &err);
  }
  if (rc != 0) {
    std::free(o.edge_index);
    std::free(o.offsets);
    std::free(o.rowptr);
    std::free(o.dist);
    std::free(o.ncand);
    throw nb::value_error(err.c_str());
  }
  const size_t E = (size_t)o.n_edges;
  return nb::make_tuple(own(o.edge_index, {2, E}), own(o.offsets, {E, 3}), own(o.rowptr, {(size_t)N + 1}),
                        own(o.dist, {E}), own(o.ncand, {(size_t)N}));
}

#ifdef E3RELAX_WITH_CUDA
using GpuPos = nb::ndarray<const double, nb::shape<-1, 3>, nb::c_contig, nb::device::cuda>;
using GpuCells = nb::ndarray<const double, nb::shape<-1, 3, 3>, nb::c_contig, nb::device::cuda>;
using GpuI64 = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cuda>;
using GpuI64Out = nb::ndarray<int64_t, nb::c_contig, nb::device::cuda>;
using GpuF64Out = nb::ndarray<double, nb::c_contig, nb::device::cuda>;
using GpuI32Out = nb::ndarray<int32_t, nb::c_contig, nb::device::cuda>;
using GpuI32 = nb::ndarray<const int32_t, nb::c_contig, nb::device::cuda>;

void check_cuda(const std::string& msg) {
  if (!msg.empty()) throw std::runtime_error("radius_graph (CUDA): " + msg);
}

void radius_graph_cuda_select(GpuPos pos, GpuCells cells, GpuI64 ptr, double radius, int64_t max_neighbors,
                              std::optional<GpuI64> reserved, GpuF64Out wfrac, GpuI32Out shift, GpuI32Out kept,
                              GpuI64Out kept_count, GpuI64Out ncand, GpuI64Out status, uintptr_t stream) {
  const int64_t N = (int64_t)pos.shape(0), G = (int64_t)cells.shape(0);
  const int64_t K = max_neighbors;
  if ((int64_t)ptr.shape(0) != G + 1) throw nb::value_error("radius_graph: ptr must have G + 1 entries");
  if (reserved && (int64_t)reserved->shape(0) != N) throw nb::value_error("radius_graph: bad reserved");
  if (K < 0 || K > (1 << 20)) throw nb::value_error("radius_graph: max_neighbors out of range");
  if ((int64_t)wfrac.size() < 3 * N || (int64_t)shift.size() < 3 * N || (int64_t)kept.size() < 4 * N * K ||
      (int64_t)kept_count.size() < N || (int64_t)ncand.size() < N || status.size() < 1)
    throw nb::value_error("radius_graph: scratch/output buffers too small");
  if (N >= (int64_t(1) << 31) - 64) throw nb::value_error("radius_graph: too many atoms");
  e3rg::CudaSelectArgs a{(int)pos.device_id(), pos.data(), N, cells.data(), ptr.data(), G, radius, K,
                         reserved ? reserved->data() : nullptr, wfrac.data(), shift.data(), kept.data(),
                         kept_count.data(), ncand.data(), status.data()};
  std::string err;
  {
    nb::gil_scoped_release release;
    err = e3rg::cuda_select(a, stream);
  }
  check_cuda(err);
}

void radius_graph_cuda_emit(GpuPos pos, GpuCells cells, GpuI64 ptr, int64_t max_neighbors, GpuI32 kept,
                            GpuI64 kept_count, GpuI64 rowptr, GpuI64Out edge_index, GpuI64Out offsets,
                            GpuF64Out dist, uintptr_t stream) {
  const int64_t N = (int64_t)pos.shape(0), G = (int64_t)cells.shape(0);
  const int64_t cap = (int64_t)dist.size();
  if ((int64_t)ptr.shape(0) != G + 1 || (int64_t)rowptr.size() != N + 1 || (int64_t)kept_count.size() < N ||
      (int64_t)kept.size() < 4 * N * max_neighbors || (int64_t)edge_index.size() != 2 * cap ||
      (int64_t)offsets.size() != 3 * cap)
    throw nb::value_error("radius_graph: inconsistent emit buffers");
  e3rg::CudaEmitArgs a{(int)pos.device_id(), pos.data(), N, cells.data(), ptr.data(), G, max_neighbors, kept.data(), kept_count.data(),
                       rowptr.data(), cap, edge_index.data(), offsets.data(), dist.data()};
  std::string err;
  {
    nb::gil_scoped_release release;
    err = e3rg::cuda_emit(a, stream);
  }
  check_cuda(err);
}
#endif

bool cuda_available() {
#ifdef E3RELAX_WITH_CUDA
  std::string why;
  return e3rg::cuda_device_count(&why) > 0;
#else
  return false;
#endif
}

std::string cuda_status() {
#ifdef E3RELAX_WITH_CUDA
  std::string why;
  const int n = e3rg::cuda_device_count(&why);
  if (n > 0) return "ok: " + std::to_string(n) + " device(s), CUDA runtime " + e3rg::cuda_runtime_version();
  if (n == 0) return "no CUDA device (CUDA runtime " + e3rg::cuda_runtime_version() + ")";
  return "CUDA unavailable: " + why;
#else
  return "built without CUDA (nvcc not found at build time, or E3RELAX_NO_CUDA=1)";
#endif
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "e3relax_fast compiled kernels (nanobind over DLPack): periodic radius graph.";
#ifdef E3RELAX_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.attr("DEFAULT_CELL_LIST_THRESHOLD") = e3rg::kDefaultCellListThreshold;
  m.attr("HIST_BINS") = e3rg::kHistBins;
  m.attr("BOUNDARY_CAP") = e3rg::kBoundaryCap;
  m.def("radius_graph_cpu", &radius_graph_cpu, "positions"_a, "cells"_a, "ptr"_a, "radius"_a, "max_neighbors"_a,
        "reserved"_a.none(), "num_threads"_a = 0, "cell_list_threshold"_a = e3rg::kDefaultCellListThreshold,
        "algo"_a = 0,
        "Radius graph of a batch on the CPU. Inputs: (N,3) float64, (G,3,3) float64, (G+1,) int64, and an\n"
        "optional (N,) int64 `reserved`; all C-contiguous. Returns numpy arrays (edge_index (2,E),\n"
        "cell_offsets (E,3), rowptr (N+1,), distances (E,), num_candidates (N,)). num_threads <= 0: all\n"
        "cores. Crystals with more than cell_list_threshold atoms use the cell list. algo=1 runs the\n"
        "CUDA kernel's warp algorithm, emulated (tests only).");
  m.def("cuda_available", &cuda_available, "True when built with CUDA and a CUDA device is usable.");
  m.def("cuda_status", &cuda_status, "Why CUDA is or is not usable (never raises).");
#ifdef E3RELAX_WITH_CUDA
  m.def("radius_graph_cuda_select", &radius_graph_cuda_select, "positions"_a, "cells"_a, "ptr"_a, "radius"_a,
        "max_neighbors"_a, "reserved"_a.none(), "wfrac"_a, "shift"_a, "kept"_a, "kept_count"_a, "ncand"_a,
        "status"_a, "stream"_a,
        "Phase 1 on the GPU: per-centre candidates and top-K (one warp per centre). No host sync.");
  m.def("radius_graph_cuda_emit", &radius_graph_cuda_emit, "positions"_a, "cells"_a, "ptr"_a, "max_neighbors"_a,
        "kept"_a, "kept_count"_a, "rowptr"_a, "edge_index"_a, "cell_offsets"_a, "distances"_a, "stream"_a,
        "Phase 2 on the GPU: writes the edges of every centre at rowptr (those below the outputs'\n"
        "capacity). No host sync.");
#endif
}
