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

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "radius_graph.h"
#include "radius_graph_api.h"
#include "message_passing.h"
#include "message_passing_api.h"
#include "fused_cpu.h"
#include "frame_cpu.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using CpuPos = nb::ndarray<const double, nb::shape<-1, 3>, nb::c_contig, nb::device::cpu>;
using CpuCells = nb::ndarray<const double, nb::shape<-1, 3, 3>, nb::c_contig, nb::device::cpu>;
using CpuI64 = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// A numpy array owning a block of e3rg::out_alloc (released to the launcher's cache).
template <class T>
nb::ndarray<nb::numpy, T> own(T* p, std::initializer_list<size_t> shape) {
  nb::capsule owner(p, [](void* q) noexcept { e3rg::out_free(q); });
  return nb::ndarray<nb::numpy, T>(p, shape, owner);
}

nb::tuple radius_graph_cpu(CpuPos pos, CpuCells cells, CpuI64 ptr, double radius, int64_t max_neighbors,
                           std::optional<CpuI64> reserved, int num_threads, int64_t cell_list_threshold, int algo) {
  const int64_t N = (int64_t)pos.shape(0), G = (int64_t)cells.shape(0);
  if ((int64_t)ptr.shape(0) != G + 1) throw nb::value_error("radius_graph: ptr must have G + 1 entries");
  if (reserved && (int64_t)reserved->shape(0) != N)
    throw nb::value_error("radius_graph: reserved must have one entry per atom");
  if (!(radius >= 0.0) || !(radius < 1e4)) throw nb::value_error("radius_graph: radius must be in [0, 1e4)");
  if (algo < 0 || algo > 3) throw nb::value_error("radius_graph: algo must be 0, 1, 2 or 3");
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
  a.path = static_cast<e3rg::GraphPath>(algo);  // checked above; the ints are GraphPath's values
  e3rg::CpuOut o;
  std::string err;
  int rc;
  {
    nb::gil_scoped_release release;
    rc = e3rg::radius_graph_cpu(a, o, &err);
  }
  if (rc != 0) {
    e3rg::out_free(o.edge_index);
    e3rg::out_free(o.offsets);
    e3rg::out_free(o.rowptr);
    e3rg::out_free(o.dist);
    e3rg::out_free(o.ncand);
    if (rc == e3rg::kErrNoMemory) {
      PyErr_SetString(PyExc_MemoryError, err.c_str());
      throw nb::python_error();
    }
    throw nb::value_error(err.c_str());
  }
  const size_t E = (size_t)o.n_edges;
  return nb::make_tuple(own(o.edge_index, {2, E}), own(o.offsets, {E, 3}), own(o.rowptr, {(size_t)N + 1}),
                        own(o.dist, {E}), own(o.ncand, {(size_t)N}));
}

// The CUDA launcher run on the CPU (radius_graph_warp_emulation.cpp): radius_graph_cpu's outputs
// plus the number of crystals that took the cell list.
nb::tuple radius_graph_cuda_emulated(CpuPos pos, CpuCells cells, CpuI64 ptr, double radius, int64_t max_neighbors,
                                     std::optional<CpuI64> reserved, int64_t cell_list_threshold) {
  const int64_t N = (int64_t)pos.shape(0), G = (int64_t)cells.shape(0);
  if ((int64_t)ptr.shape(0) != G + 1) throw nb::value_error("radius_graph: ptr must have G + 1 entries");
  if (reserved && (int64_t)reserved->shape(0) != N)
    throw nb::value_error("radius_graph: reserved must have one entry per atom");
  e3rg::CpuArgs a;
  a.pos = pos.data();
  a.n_atoms = N;
  a.cells = cells.data();
  a.ptr = ptr.data();
  a.n_graphs = G;
  a.radius = radius;
  a.max_neighbors = max_neighbors;
  a.reserved = reserved ? reserved->data() : nullptr;
  a.cell_list_threshold = cell_list_threshold;
  e3rg::CpuOut o;
  std::string err;
  int64_t n_binned = 0;
  int rc;
  {
    nb::gil_scoped_release release;
    rc = e3rg::radius_graph_cuda_emulated(a, o, &n_binned, &err);
  }
  if (rc != 0) {
    if (rc == e3rg::kErrNoMemory) {
      PyErr_SetString(PyExc_MemoryError, err.c_str());
      throw nb::python_error();
    }
    throw nb::value_error(err.c_str());
  }
  const size_t E = (size_t)o.n_edges;
  return nb::make_tuple(own(o.edge_index, {2, E}), own(o.offsets, {E, 3}), own(o.rowptr, {(size_t)N + 1}),
                        own(o.dist, {E}), own(o.ncand, {(size_t)N}), n_binned);
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
                              GpuI64Out kept_count, GpuI64Out ncand, GpuI64Out status, uintptr_t stream,
                              int64_t cell_list_threshold) {
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
                         kept_count.data(), ncand.data(), status.data(), cell_list_threshold};
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

// ---------------------------------------------------------------------------------------------
// Fused message passing (message_passing.h): outputs written into caller buffers (every element).
// ---------------------------------------------------------------------------------------------
template <class T, class Dev>
using MpIn = nb::ndarray<const T, nb::c_contig, Dev>;
template <class T, class Dev>
using MpW = nb::ndarray<const T, nb::ndim<2>, Dev>;  // any strides
template <class T, class Dev>
using MpOut = nb::ndarray<T, nb::c_contig, Dev>;

template <class A>
bool has_shape(const A& a, std::initializer_list<int64_t> shape) {
  if (a.ndim() != shape.size()) return false;
  size_t k = 0;
  for (int64_t s : shape) {
    if ((int64_t)a.shape(k++) != s) return false;
  }
  return true;
}

template <class T, class Dev>
e3mp::Params<T> mp_params(const MpIn<T, Dev>& x_proj, const MpIn<T, Dev>& vec, const MpIn<T, Dev>& pos,
                          const MpIn<T, Dev>& cells, const MpIn<int64_t, Dev>& edge_index,
                          const MpIn<int64_t, Dev>& offsets, const MpIn<int64_t, Dev>& edge_graph,
                          const MpIn<int64_t, Dev>& rowptr, const MpW<T, Dev>& weight, const MpIn<T, Dev>& bias,
                          const MpIn<T, Dev>& centres, double coeff, double cutoff) {
  if (vec.ndim() != 3 || vec.shape(1) != 3) throw nb::value_error("message_passing: vec must be (N, 3, H)");
  const int64_t N = (int64_t)vec.shape(0), H = (int64_t)vec.shape(2);
  if (cells.ndim() != 3) throw nb::value_error("message_passing: cells must be (G, 3, 3)");
  const int64_t G = (int64_t)cells.shape(0);
  if (edge_index.ndim() != 2 || edge_index.shape(0) != 2) throw nb::value_error("message_passing: edge_index must be (2, E)");
  const int64_t E = (int64_t)edge_index.shape(1);
  if (centres.ndim() != 1) throw nb::value_error("message_passing: rbf_centres must be (R,)");
  const int64_t R = (int64_t)centres.shape(0);
  if (!has_shape(x_proj, {N, 3 * H})) throw nb::value_error("message_passing: x_proj must be (N, 3H)");
  if (!has_shape(pos, {N, 3})) throw nb::value_error("message_passing: positions must be (N, 3)");
  if (!has_shape(cells, {G, 3, 3})) throw nb::value_error("message_passing: cells must be (G, 3, 3)");
  if (!has_shape(offsets, {E, 3})) throw nb::value_error("message_passing: cell_offsets must be (E, 3)");
  if (!has_shape(edge_graph, {E})) throw nb::value_error("message_passing: edge_graph must be (E,)");
  if (!has_shape(rowptr, {N + 1})) throw nb::value_error("message_passing: rowptr must be (N + 1,)");
  if (!has_shape(weight, {3 * H, R})) throw nb::value_error("message_passing: edge_weight must be (3H, R)");
  if (!has_shape(bias, {3 * H})) throw nb::value_error("message_passing: edge_bias must be (3H,)");
  if (!(cutoff > 0.0)) throw nb::value_error("message_passing: cutoff must be > 0");
  e3mp::Params<T> p;
  p.x_proj = x_proj.data();
  p.vec = vec.data();
  p.pos = pos.data();
  p.cells = cells.data();
  p.src = edge_index.data();
  p.dst = edge_index.data() + E;
  p.offsets = offsets.data();
  p.edge_graph = edge_graph.data();
  p.rowptr = rowptr.data();
  p.weight = weight.data();
  p.w_stride_c = (int64_t)weight.stride(0);
  p.w_stride_r = (int64_t)weight.stride(1);
  p.bias = bias.data();
  p.centres = centres.data();
  p.coeff = (T)coeff;
  p.cutoff = (T)cutoff;
  p.inv_sqrt3 = (T)(1.0 / std::sqrt(3.0));
  p.inv_sqrt_h = (T)(1.0 / std::sqrt((double)(H > 0 ? H : 1)));
  p.n_atoms = N;
  p.n_graphs = G;
  p.n_edges = E;
  p.hidden = H;
  p.num_rbf = R;
  return p;
}

// The message op's outputs ds (N, H) and dv (N, 3, H) into p.
template <class T, class Dev>
void mp_outputs(e3mp::Params<T>& p, MpOut<T, Dev>& ds, MpOut<T, Dev>& dv) {
  if (!has_shape(ds, {p.n_atoms, p.hidden}) || !has_shape(dv, {p.n_atoms, 3, p.hidden}))
    throw nb::value_error("message_passing: outputs must be (N, H) and (N, 3, H)");
  p.ds = ds.data();
  p.dv = dv.data();
}

template <class T>
void message_passing_cuda_emulated(MpIn<T, nb::device::cpu> x_proj, MpIn<T, nb::device::cpu> vec,
                         MpIn<T, nb::device::cpu> pos, MpIn<T, nb::device::cpu> cells,
                         MpIn<int64_t, nb::device::cpu> edge_index, MpIn<int64_t, nb::device::cpu> offsets,
                         MpIn<int64_t, nb::device::cpu> edge_graph, MpIn<int64_t, nb::device::cpu> rowptr,
                         MpW<T, nb::device::cpu> weight, MpIn<T, nb::device::cpu> bias,
                         MpIn<T, nb::device::cpu> centres, double coeff, double cutoff, MpOut<T, nb::device::cpu> ds,
                         MpOut<T, nb::device::cpu> dv, int num_threads) {
  e3mp::Params<T> p = mp_params<T, nb::device::cpu>(x_proj, vec, pos, cells, edge_index, offsets, edge_graph,
                                                          rowptr, weight, bias, centres, coeff, cutoff);
  mp_outputs(p, ds, dv);
  int64_t bad;
  {
    nb::gil_scoped_release release;
    bad = e3mp::message_passing_cuda_emulated(p, num_threads);
  }
  if (bad)
    throw nb::value_error(("message_passing: " + std::to_string(bad) + " receiver(s) with invalid edges (rowptr " +
                           "must be the receiver CSR of receiver-sorted edges; source and crystal indices in range)")
                              .c_str());
}

// ---------------------------------------------------------------------------------------------
// Backend `cpu` of the gated message ops (fused_cpu.h), outputs written into caller
// buffers (every element). `exact`: the radial projection on every centre instead of the window;
// path 0 = AVX-512 where the CPU has it, 1 = portable.
// ---------------------------------------------------------------------------------------------
e3cpu::Path fused_path(int path) {
  if (path < 0 || path > 1) throw nb::value_error("path must be 0 (auto) or 1 (portable)");
  return static_cast<e3cpu::Path>(path);
}

// The fused CPU launchers' view of the checked arrays.
template <class T>
e3cpu::MessageArgs<T> message_args(const e3mp::Params<T>& p, double coeff, double cutoff) {
  e3cpu::MessageArgs<T> a;
  a.x_proj = p.x_proj;
  a.vec = p.vec;
  a.pos = p.pos;
  a.cells = p.cells;
  a.src = p.src;
  a.dst = p.dst;
  a.offsets = p.offsets;
  a.edge_graph = p.edge_graph;
  a.rowptr = p.rowptr;
  a.weight = p.weight;
  a.w_stride_c = p.w_stride_c;
  a.w_stride_r = p.w_stride_r;
  a.bias = p.bias;
  a.centres = p.centres;
  a.coeff = coeff;
  a.cutoff = cutoff;
  a.n_atoms = p.n_atoms;
  a.n_graphs = p.n_graphs;
  a.n_edges = p.n_edges;
  a.hidden = p.hidden;
  a.num_rbf = p.num_rbf;
  a.ds = p.ds;
  a.dv = p.dv;
  return a;
}

void raise_invalid_edges(int64_t bad) {
  if (bad)
    throw nb::value_error(("message_passing: " + std::to_string(bad) + " receiver(s) with invalid edges (rowptr " +
                           "must be the receiver CSR of receiver-sorted edges; source and crystal indices in range)")
                              .c_str());
}

template <class T>
void message_passing_fused_cpu(MpIn<T, nb::device::cpu> x_proj, MpIn<T, nb::device::cpu> vec,
                               MpIn<T, nb::device::cpu> pos, MpIn<T, nb::device::cpu> cells,
                               MpIn<int64_t, nb::device::cpu> edge_index, MpIn<int64_t, nb::device::cpu> offsets,
                               MpIn<int64_t, nb::device::cpu> edge_graph, MpIn<int64_t, nb::device::cpu> rowptr,
                               MpW<T, nb::device::cpu> weight, MpIn<T, nb::device::cpu> bias,
                               MpIn<T, nb::device::cpu> centres, double coeff, double cutoff,
                               MpOut<T, nb::device::cpu> ds, MpOut<T, nb::device::cpu> dv, int num_threads, bool exact,
                               int path) {
  e3mp::Params<T> p = mp_params<T, nb::device::cpu>(x_proj, vec, pos, cells, edge_index, offsets, edge_graph,
                                                    rowptr, weight, bias, centres, coeff, cutoff);
  mp_outputs(p, ds, dv);
  const e3cpu::MessageArgs<T> a = message_args(p, coeff, cutoff);
  const e3cpu::Path how = fused_path(path);
  int64_t bad;
  {
    nb::gil_scoped_release release;
    bad = e3cpu::message_passing(a, num_threads, exact, how);
  }
  raise_invalid_edges(bad);
}

// Its backward (message_passing_backward_cpu.cpp): the forward's arrays, the upstream gradients
// gds (N, H) and gdv (N, 3, H), and the gradients, added into (N, 3H), (N, 3, H), (N, 3), (G, 3, 3),
// (3H, R) and (3H,) C-contiguous arrays.
template <class T>
void message_passing_backward_cpu(MpIn<T, nb::device::cpu> x_proj, MpIn<T, nb::device::cpu> vec,
                                  MpIn<T, nb::device::cpu> pos, MpIn<T, nb::device::cpu> cells,
                                  MpIn<int64_t, nb::device::cpu> edge_index, MpIn<int64_t, nb::device::cpu> offsets,
                                  MpIn<int64_t, nb::device::cpu> edge_graph, MpIn<int64_t, nb::device::cpu> rowptr,
                                  MpW<T, nb::device::cpu> weight, MpIn<T, nb::device::cpu> bias,
                                  MpIn<T, nb::device::cpu> centres, double coeff, double cutoff,
                                  MpIn<T, nb::device::cpu> gds, MpIn<T, nb::device::cpu> gdv,
                                  MpOut<T, nb::device::cpu> gx_proj, MpOut<T, nb::device::cpu> gvec,
                                  MpOut<T, nb::device::cpu> gpos, MpOut<T, nb::device::cpu> gcells,
                                  MpOut<T, nb::device::cpu> gweight, MpOut<T, nb::device::cpu> gbias, bool exact,
                                  int path) {
  const e3mp::Params<T> p = mp_params<T, nb::device::cpu>(x_proj, vec, pos, cells, edge_index, offsets, edge_graph,
                                                          rowptr, weight, bias, centres, coeff, cutoff);
  const int64_t N = p.n_atoms, H = p.hidden, G = p.n_graphs, R = p.num_rbf;
  if (!has_shape(gds, {N, H}) || !has_shape(gdv, {N, 3, H}))
    throw nb::value_error("message_passing backward: gds, gdv must be (N, H) and (N, 3, H)");
  if (!has_shape(gx_proj, {N, 3 * H}) || !has_shape(gvec, {N, 3, H}) || !has_shape(gpos, {N, 3}) ||
      !has_shape(gcells, {G, 3, 3}) || !has_shape(gweight, {3 * H, R}) || !has_shape(gbias, {3 * H}))
    throw nb::value_error("message_passing backward: gradients must have their inputs' shapes");
  const e3cpu::MessageArgs<T> a = message_args(p, coeff, cutoff);
  e3cpu::MessageGrads<T> g;
  g.gds = gds.data();
  g.gdv = gdv.data();
  g.gx_proj = gx_proj.data();
  g.gvec = gvec.data();
  g.gpos = gpos.data();
  g.gcells = gcells.data();
  g.gweight = gweight.data();
  g.gbias = gbias.data();
  const e3cpu::Path how = fused_path(path);
  int64_t bad;
  {
    nb::gil_scoped_release release;
    bad = e3cpu::message_passing_backward(a, g, exact, how);
  }
  raise_invalid_edges(bad);
}

template <class T>
void lattice_message_fused_cpu(MpIn<T, nb::device::cpu> x_proj, MpIn<T, nb::device::cpu> vec,
                               MpIn<T, nb::device::cpu> pos, MpIn<T, nb::device::cpu> cells,
                               MpIn<int64_t, nb::device::cpu> graph_index,
                               std::optional<MpIn<T, nb::device::cpu>> centres, int64_t k,
                               MpW<T, nb::device::cpu> weight, MpIn<T, nb::device::cpu> bias,
                               MpIn<T, nb::device::cpu> rbf_centres, double coeff, double cutoff,
                               MpOut<T, nb::device::cpu> ds, MpOut<T, nb::device::cpu> v_out, int num_threads,
                               bool exact, int path) {
  if (vec.ndim() != 3 || vec.shape(1) != 3) throw nb::value_error("lattice_message: vec must be (N, 3, H)");
  const int64_t N = (int64_t)vec.shape(0), H = (int64_t)vec.shape(2);
  if (cells.ndim() != 3) throw nb::value_error("lattice_message: cells must be (G, 3, 3)");
  const int64_t G = (int64_t)cells.shape(0);
  if (rbf_centres.ndim() != 1) throw nb::value_error("lattice_message: rbf_centres must be (R,)");
  const int64_t R = (int64_t)rbf_centres.shape(0);
  if (!has_shape(x_proj, {N, 3 * H})) throw nb::value_error("lattice_message: x_proj must be (N, 3H)");
  if (!has_shape(pos, {N, 3})) throw nb::value_error("lattice_message: positions must be (N, 3)");
  if (!has_shape(cells, {G, 3, 3})) throw nb::value_error("lattice_message: cells must be (G, 3, 3)");
  if (!has_shape(graph_index, {N})) throw nb::value_error("lattice_message: graph_index must be (N,)");
  if (centres && !has_shape(*centres, {G, 3})) throw nb::value_error("lattice_message: centres must be (G, 3)");
  if (k < 0 || k > 2) throw nb::value_error("lattice_message: lattice node k must be 0, 1 or 2");
  if (!has_shape(weight, {3 * H, R})) throw nb::value_error("lattice_message: edge_weight must be (3H, R)");
  if (!has_shape(bias, {3 * H})) throw nb::value_error("lattice_message: edge_bias must be (3H,)");
  if (!has_shape(ds, {N, H}) || !has_shape(v_out, {N, 3, H}))
    throw nb::value_error("lattice_message: outputs must be (N, H) and (N, 3, H)");
  if (!(cutoff > 0.0)) throw nb::value_error("lattice_message: cutoff must be > 0");
  e3cpu::LatticeArgs<T> a;
  a.x_proj = x_proj.data();
  a.vec = vec.data();
  a.pos = pos.data();
  a.cells = cells.data();
  a.graph_index = graph_index.data();
  a.centres = centres ? centres->data() : nullptr;
  a.k = k;
  a.weight = weight.data();
  a.w_stride_c = (int64_t)weight.stride(0);
  a.w_stride_r = (int64_t)weight.stride(1);
  a.bias = bias.data();
  a.rbf_centres = rbf_centres.data();
  a.coeff = coeff;
  a.cutoff = cutoff;
  a.n_atoms = N;
  a.n_graphs = G;
  a.hidden = H;
  a.num_rbf = R;
  a.ds = ds.data();
  a.v_out = v_out.data();
  const e3cpu::Path how = fused_path(path);
  int64_t bad;
  {
    nb::gil_scoped_release release;
    bad = e3cpu::lattice_message(a, num_threads, exact, how);
  }
  if (bad)
    throw nb::value_error(("lattice_message: " + std::to_string(bad) + " atom(s) with a crystal index out of range")
                              .c_str());
}

nb::tuple radial_window(nb::ndarray<const double, nb::ndim<1>, nb::c_contig, nb::device::cpu> centres, double coeff,
                        bool exact) {
  const e3cpu::RadialWindow w = e3cpu::make_window(centres.data(), (int64_t)centres.shape(0), coeff, exact);
  return nb::make_tuple(w.halfwidth, w.size, w.first, w.spacing, w.tail);
}

#ifdef E3RELAX_WITH_CUDA
template <class T>
void message_passing_cuda(MpIn<T, nb::device::cuda> x_proj, MpIn<T, nb::device::cuda> vec,
                          MpIn<T, nb::device::cuda> pos, MpIn<T, nb::device::cuda> cells,
                          MpIn<int64_t, nb::device::cuda> edge_index, MpIn<int64_t, nb::device::cuda> offsets,
                          MpIn<int64_t, nb::device::cuda> edge_graph, MpIn<int64_t, nb::device::cuda> rowptr,
                          MpW<T, nb::device::cuda> weight, MpIn<T, nb::device::cuda> bias,
                          MpIn<T, nb::device::cuda> centres, double coeff, double cutoff,
                          MpOut<T, nb::device::cuda> ds, MpOut<T, nb::device::cuda> dv, uintptr_t stream) {
  e3mp::Params<T> p = mp_params<T, nb::device::cuda>(x_proj, vec, pos, cells, edge_index, offsets, edge_graph,
                                                           rowptr, weight, bias, centres, coeff, cutoff);
  mp_outputs(p, ds, dv);
  const int dev = (int)ds.device_id();
  const int ids[] = {(int)x_proj.device_id(), (int)vec.device_id(), (int)pos.device_id(), (int)cells.device_id(),
                     (int)edge_index.device_id(), (int)offsets.device_id(), (int)edge_graph.device_id(),
                     (int)rowptr.device_id(), (int)weight.device_id(), (int)bias.device_id(),
                     (int)centres.device_id(), (int)dv.device_id()};
  for (int id : ids) {
    if (id != dev) throw nb::value_error("message_passing: all arrays must be on the same CUDA device");
  }
  std::string err;
  {
    nb::gil_scoped_release release;
    err = e3mp::message_passing_cuda(p, dev, stream);
  }
  if (!err.empty()) throw std::runtime_error("message_passing (CUDA): " + err);
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

// --- the canonical frame's host ops (csrc/frame_cpu.h) ------------------------------------------------

template <class T, class... Shape>
using HostIn = nb::ndarray<const T, nb::c_contig, nb::device::cpu, Shape...>;

// A fresh numpy array of `shape` (freed with it), poisoned (NaN, -7) so that an element the op
// fails to write shows in the tests against the reference.
template <class T>
nb::ndarray<nb::numpy, T> fresh(std::initializer_list<size_t> shape) {
  size_t size = 1;
  for (size_t s : shape) size *= s;
  T* p = new T[size > 0 ? size : 1];
  if constexpr (std::is_floating_point_v<T>)
    std::fill(p, p + size, std::numeric_limits<T>::quiet_NaN());
  else
    std::fill(p, p + size, T(-7));
  nb::capsule owner(p, [](void* q) noexcept { delete[] static_cast<T*>(q); });
  return nb::ndarray<nb::numpy, T>(p, shape, owner);
}

// Returns (message, outputs): message "" and the reference's ten arrays, or the FrameError reason and None.
nb::tuple frame_bookkeeping(HostIn<double, nb::shape<3, 3>> basis, HostIn<int64_t, nb::ndim<1>> numbers,
                            HostIn<double, nb::shape<-1, 3>> x_std, HostIn<double, nb::shape<-1, 3, 3>> norm_linear,
                            HostIn<double, nb::shape<-1, 3>> norm_shift, HostIn<double, nb::shape<-1, 3>> polar,
                            HostIn<int64_t, nb::shape<-1, 3, 3>> rotations,
                            HostIn<double, nb::shape<-1, 3>> translations, HostIn<bool, nb::ndim<1>> moving,
                            HostIn<int64_t, nb::ndim<1>> mapping, HostIn<double, nb::shape<3, 3>> rotation,
                            HostIn<double, nb::shape<3, 3>> lattice, HostIn<double, nb::shape<-1, 3>> positions,
                            double symprec) {
  const size_t m = numbers.shape(0), c = norm_linear.shape(0), k = rotations.shape(0), n = mapping.shape(0);
  if (x_std.shape(0) != m || norm_shift.shape(0) != c || translations.shape(0) != k || moving.shape(0) != k ||
      positions.shape(0) != n)
    throw nb::value_error("frame_bookkeeping: inconsistent shapes (m atoms, c normalizer elements, k operations, "
                          "n user atoms)");
  if (polar.shape(0) > 3) throw nb::value_error("frame_bookkeeping: at most 3 polar directions");
  auto out_numbers = fresh<int64_t>({m});
  auto out_positions = fresh<double>({m, 3});
  auto out_linear = fresh<int64_t>({3, 3});
  auto out_shift = fresh<double>({3});
  auto out_choice_images = fresh<int64_t>({m, 3});
  auto out_permutations = fresh<int64_t>({k, m});
  auto out_user_cell = fresh<int64_t>({3, 3});
  auto out_atom_map = fresh<int64_t>({n});
  auto out_images = fresh<int64_t>({n, 3});
  auto out_offset = fresh<double>({3});
  e3frame::BookkeepingIn in{basis.data(), numbers.data(), x_std.data(), (int64_t)m, norm_linear.data(),
                            norm_shift.data(), (int64_t)c, polar.data(), (int64_t)polar.shape(0), rotations.data(),
                            translations.data(), moving.data(), (int64_t)k, mapping.data(), (int64_t)n,
                            rotation.data(), lattice.data(), positions.data(), symprec};
  e3frame::BookkeepingOut out{out_numbers.data(), out_positions.data(), out_linear.data(), out_shift.data(),
                              out_choice_images.data(), out_permutations.data(), out_user_cell.data(),
                              out_atom_map.data(), out_images.data(), out_offset.data()};
  const std::string message = e3frame::frame_bookkeeping(in, out);
  if (!message.empty()) return nb::make_tuple(message, nb::none());
  return nb::make_tuple(message, nb::make_tuple(out_numbers, out_positions, out_linear, out_shift, out_choice_images,
                                                out_permutations, out_user_cell, out_atom_map, out_images,
                                                out_offset));
}

nb::tuple frame_map_back(HostIn<double, nb::shape<-1, 3>> positions, HostIn<double, nb::shape<3, 3>> cell,
                         HostIn<double, nb::shape<-1, 3>> frame_positions, HostIn<double, nb::shape<3, 3>> frame_cell,
                         HostIn<int64_t, nb::shape<-1, 3, 3>> rotations, HostIn<int64_t, nb::ndim<2>> permutations,
                         HostIn<int64_t, nb::shape<3, 3>> choice_linear, HostIn<double, nb::shape<3>> choice_shift,
                         HostIn<int64_t, nb::shape<-1, 3>> choice_images, HostIn<int64_t, nb::ndim<1>> atom_map,
                         HostIn<int64_t, nb::shape<-1, 3>> images, HostIn<double, nb::shape<3>> offset,
                         HostIn<int64_t, nb::shape<3, 3>> user_cell, HostIn<double, nb::shape<3, 3>> rotation,
                         bool symmetrize) {
  const size_t m = positions.shape(0), k = rotations.shape(0), n = atom_map.shape(0);
  if (frame_positions.shape(0) != m || permutations.shape(0) != k || permutations.shape(1) != m ||
      choice_images.shape(0) != m || images.shape(0) != n)
    throw nb::value_error("frame_map_back: inconsistent shapes (m canonical atoms, k operations, n user atoms)");
  auto out_positions = fresh<double>({n, 3});
  auto out_cell = fresh<double>({3, 3});
  e3frame::MapBackIn in{positions.data(), cell.data(), frame_positions.data(), frame_cell.data(), (int64_t)m,
                        rotations.data(), permutations.data(), (int64_t)k, choice_linear.data(), choice_shift.data(),
                        choice_images.data(), atom_map.data(), images.data(), (int64_t)n, offset.data(),
                        user_cell.data(), rotation.data(), symmetrize};
  const std::string message = e3frame::frame_map_back(in, out_positions.data(), out_cell.data());
  if (!message.empty()) throw nb::value_error(message.c_str());
  return nb::make_tuple(out_positions, out_cell);
}

bool frame_p1_certificate(HostIn<int64_t, nb::ndim<1>> numbers, HostIn<double, nb::shape<-1, 3>> x,
                          HostIn<double, nb::shape<3, 3>> basis, double tolerance) {
  if (x.shape(0) != numbers.shape(0)) throw nb::value_error("frame_p1_certificate: numbers and x differ in length");
  return e3frame::frame_p1_certificate(numbers.data(), x.data(), (int64_t)numbers.shape(0), basis.data(), tolerance);
}

}  // namespace

#define MP_ARGS_COMMON                                                                                  \
  "x_proj"_a, "vec"_a, "positions"_a, "cells"_a, "edge_index"_a, "cell_offsets"_a, "edge_graph"_a, "rowptr"_a, \
      "edge_weight"_a, "edge_bias"_a, "rbf_centres"_a, "rbf_coeff"_a, "cutoff"_a, "ds"_a.noconvert(),           \
      "dv"_a.noconvert()
#define MP_CPU_ARGS MP_ARGS_COMMON, "num_threads"_a = 0
#define MP_CUDA_ARGS MP_ARGS_COMMON, "stream"_a
#define MP_CPU_DOC                                                                                     \
  "The CUDA kernel's logic on CPU threads (tests): into ds (N,H), dv (N,3,H) (every element written). float32 or\n"  \
  "float64 arrays of one dtype, int64 indices, all C-contiguous except edge_weight (3H,R), any\n"     \
  "strides. Edges receiver-sorted with receiver CSR rowptr. Raises ValueError on invalid edges."
#define MP_FUSED_DOC                                                                                   \
  "Backend `cpu` of the message op (fused_cpu.h): the arrays of message_passing_cuda_emulated;\n"       \
  "exact: every centre of the basis instead of the window; path 0 auto, 1 portable."
#define MP_BACKWARD_ARGS                                                                               \
  "x_proj"_a, "vec"_a, "positions"_a, "cells"_a, "edge_index"_a, "cell_offsets"_a, "edge_graph"_a, "rowptr"_a, \
      "edge_weight"_a, "edge_bias"_a, "rbf_centres"_a, "rbf_coeff"_a, "cutoff"_a, "gds"_a, "gdv"_a,           \
      "gx_proj"_a.noconvert(), "gvec"_a.noconvert(), "gpos"_a.noconvert(), "gcells"_a.noconvert(),            \
      "gweight"_a.noconvert(), "gbias"_a.noconvert(), "exact"_a = false, "path"_a = 0
#define MP_BACKWARD_DOC                                                                                \
  "Backward of message_passing_fused_cpu (message_passing_backward_cpu.cpp): its arrays, the upstream\n" \
  "gradients gds (N,H), gdv (N,3,H); the input gradients added into gx_proj (N,3H), gvec (N,3,H), gpos (N,3),\n" \
  "gcells (G,3,3), gweight (3H,R), gbias (3H,), C-contiguous. One thread; path 0 auto, 1 portable (same bits).\n" \
  "Raises ValueError on invalid edges."
#define LM_ARGS                                                                                        \
  "x_proj"_a, "vec"_a, "positions"_a, "cells"_a, "graph_index"_a, "centres"_a.none(), "k"_a, "edge_weight"_a, \
      "edge_bias"_a, "rbf_centres"_a, "rbf_coeff"_a, "cutoff"_a, "ds"_a.noconvert(), "v_out"_a.noconvert(),  \
      "num_threads"_a = 0, "exact"_a = false, "path"_a = 0
#define LM_DOC                                                                                         \
  "Backend `cpu` of the lattice message op (fused_cpu.h) into ds (N,H), v_out (N,3,H). float32 or\n"  \
  "float64 arrays of one dtype, int64 graph_index, C-contiguous except edge_weight (3H,R)."
#define MP_CUDA_DOC                                                                                    \
  "Fused message passing on a CUDA device (forward only, on `stream`, no host sync): same arrays\n"  \
  "as message_passing_cuda_emulated; edge_weight best passed transposed in memory (stride (1, 3H)). Invalid\n" \
  "receivers get NaN outputs."

NB_MODULE(_C, m) {
  m.doc() = "e3relax_fast compiled kernels (nanobind over DLPack): periodic radius graph, fused message passing.";
#ifdef E3RELAX_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.attr("DEFAULT_CELL_LIST_THRESHOLD") = e3rg::default_cell_list_threshold(e3rg::GraphPath::Auto);
  m.attr("HIST_BINS") = e3rg::kHistBins;
  m.attr("BOUNDARY_CAP") = e3rg::kBoundaryCap;
  m.def("radius_graph_cpu", &radius_graph_cpu, "positions"_a, "cells"_a, "ptr"_a, "radius"_a, "max_neighbors"_a,
        "reserved"_a.none(), "num_threads"_a = 0, "cell_list_threshold"_a = -1,
        "algo"_a = 0,
        "Radius graph of a batch on the CPU. Inputs: (N,3) float64, (G,3,3) float64, (G+1,) int64, and an\n"
        "optional (N,) int64 `reserved`; all C-contiguous. Returns numpy arrays (edge_index (2,E),\n"
        "cell_offsets (E,3), rowptr (N+1,), distances (E,), num_candidates (N,)). num_threads <= 0: all\n"
        "cores. Crystals with more than cell_list_threshold atoms use the cell list (< 0: the default of\n"
        "algo on this CPU, DEFAULT_CELL_LIST_THRESHOLD for algo 0). algo=1 runs the\n"
        "CUDA kernel's warp algorithm, emulated, algo=2 brute force with per-pair bounds, algo=3 the\n"
        "default without its AVX-512 path (tests only).");
  m.attr("CPU_AVX512") = e3rg::cpu_simd_avx512();
  m.def("frame_bookkeeping", &frame_bookkeeping, "basis"_a, "numbers"_a, "x_std"_a, "normalizer_linear"_a,
        "normalizer_shift"_a, "polar"_a, "rotations"_a, "translations"_a, "moving"_a, "mapping"_a, "rotation"_a,
        "lattice"_a, "positions"_a, "symprec"_a,
        "The canonical frame's bookkeeping after the symmetry search, for one crystal (arguments and\n"
        "results of e3relax_fast.reference.frame_bookkeeping). Returns (message, arrays): message '' and\n"
        "the ten arrays, or the reason the frame cannot be built and None.");
  m.def("frame_map_back", &frame_map_back, "positions"_a, "cell"_a, "frame_positions"_a, "frame_cell"_a,
        "rotations"_a, "permutations"_a, "choice_linear"_a, "choice_shift"_a, "choice_images"_a, "atom_map"_a,
        "images"_a, "offset"_a, "user_cell"_a, "rotation"_a, "symmetrize"_a,
        "A prediction for the canonical cell in the user's description (arguments and results of\n"
        "e3relax_fast.reference.frame_map_back): (positions (n, 3), cell (3, 3)).");
  m.def("frame_p1_certificate", &frame_p1_certificate, "numbers"_a, "x"_a, "basis"_a, "tolerance"_a,
        "Whether no pure translation and no inversion maps the crystal onto itself within tolerance (Å)\n"
        "(arguments and result of e3relax_fast.reference.frame_p1_certificate.frame_p1_certificate).");
  m.attr("CUDA_CELL_LIST_THRESHOLD") = e3rg::kDefaultCellListThreshold;
  m.def("radius_graph_cuda_emulated", &radius_graph_cuda_emulated, "positions"_a, "cells"_a, "ptr"_a, "radius"_a,
        "max_neighbors"_a, "reserved"_a.none(), "cell_list_threshold"_a = -1,
        "The CUDA radius graph's launcher (select kernels, cell list included, then emit) run on the CPU,\n"
        "thread after thread, for the tests. Inputs as radius_graph_cpu; cell_list_threshold < 0:\n"
        "CUDA_CELL_LIST_THRESHOLD. Returns radius_graph_cpu's five arrays and the number of crystals\n"
        "that took the cell list.");
  m.def("message_passing_cuda_emulated", &message_passing_cuda_emulated<float>, MP_CPU_ARGS, MP_CPU_DOC);
  m.def("message_passing_cuda_emulated", &message_passing_cuda_emulated<double>, MP_CPU_ARGS, MP_CPU_DOC);
  m.def("message_passing_fused_cpu", &message_passing_fused_cpu<float>, MP_CPU_ARGS, "exact"_a = false,
        "path"_a = 0, MP_FUSED_DOC);
  m.def("message_passing_fused_cpu", &message_passing_fused_cpu<double>, MP_CPU_ARGS, "exact"_a = false,
        "path"_a = 0, MP_FUSED_DOC);
  m.def("message_passing_backward_cpu", &message_passing_backward_cpu<float>, MP_BACKWARD_ARGS, MP_BACKWARD_DOC);
  m.def("message_passing_backward_cpu", &message_passing_backward_cpu<double>, MP_BACKWARD_ARGS, MP_BACKWARD_DOC);
  m.def("lattice_message_fused_cpu", &lattice_message_fused_cpu<float>, LM_ARGS, LM_DOC);
  m.def("lattice_message_fused_cpu", &lattice_message_fused_cpu<double>, LM_ARGS, LM_DOC);
  m.def("radial_window", &radial_window, "centres"_a, "coeff"_a, "exact"_a = false,
        "The window of the fused CPU ops for a basis (radial_window.h): (halfwidth (-1: exact), size,\n"
        "first centre, spacing, tail bound).");
#ifdef E3RELAX_WITH_CUDA
  // Distinct names, no overloads: DLPack capsules must not meet a rejected overload first.
  m.def("message_passing_cuda_f32", &message_passing_cuda<float>, MP_CUDA_ARGS, MP_CUDA_DOC);
  m.def("message_passing_cuda_f64", &message_passing_cuda<double>, MP_CUDA_ARGS, MP_CUDA_DOC);
#endif
  m.def("cuda_available", &cuda_available, "True when built with CUDA and a CUDA device is usable.");
  m.def("cuda_status", &cuda_status, "Why CUDA is or is not usable (never raises).");
#ifdef E3RELAX_WITH_CUDA
  m.def("radius_graph_cuda_select", &radius_graph_cuda_select, "positions"_a, "cells"_a, "ptr"_a, "radius"_a,
        "max_neighbors"_a, "reserved"_a.none(), "wfrac"_a, "shift"_a, "kept"_a, "kept_count"_a, "ncand"_a,
        "status"_a, "stream"_a, "cell_list_threshold"_a = -1,
        "Phase 1 on the GPU: per-centre candidates and top-K (one warp per centre). Crystals with more\n"
        "than cell_list_threshold atoms (< 0: CUDA_CELL_LIST_THRESHOLD) use the cell list. No host sync.");
  m.def("radius_graph_cuda_emit", &radius_graph_cuda_emit, "positions"_a, "cells"_a, "ptr"_a, "max_neighbors"_a,
        "kept"_a, "kept_count"_a, "rowptr"_a, "edge_index"_a, "cell_offsets"_a, "distances"_a, "stream"_a,
        "Phase 2 on the GPU: writes the edges of every centre at rowptr (those below the outputs'\n"
        "capacity). No host sync.");
#endif
}
