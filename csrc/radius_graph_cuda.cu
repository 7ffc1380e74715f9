// CUDA launcher of the periodic radius graph (spec §3): a thin shell around radius_graph.h, whose
// "CUDA launcher, step by step" section holds every thread's work (the CPU emulation,
// radius_graph_warp_emulation.cpp, runs the same steps for the tests).
//
//   prep_kernel    one thread per atom (and crystal): wrapped fractional coordinates and integer
//                  shifts, input checks (error bits OR-ed into status[0]); in crystals with more
//                  than cell_list_threshold atoms (the CPU launcher's rule and bins), the atom's
//                  bin and its rank in it (atomic count).
//   scan_kernel    one warp per crystal (binned ones only): bin counts -> bin starts, in place.
//   fill_kernel    one thread per atom of a binned crystal: atoms sorted by bin.
//   select_kernel  one warp per centre (grid-stride over centres): the warp form of the header
//                  (histogram pass, threshold, collect pass, rank sort in shared memory; no
//                  global sort) over brute-force items (small crystals: O(n) per centre) or cell-
//                  list bins (large crystals: O(atoms within reach)), writes the kept non-self
//                  (j, o) of centre i to kept[i, :, :] and kept_count[i], ncand[i].
//   emit_kernel    one thread per (centre, slot < K + 6): the kept edges and the six self-image
//                  edges of centre i at rowptr[i] + slot, skipping positions >= capacity (the
//                  caller compares rowptr[N] with the capacity: no silent truncation).
//
// No host synchronisation in here; rowptr (a cumsum) and the single read of the edge count are
// done by the Python side on the caller's stream. The cell-list scratch (about 20 bytes per atom,
// only when the batch has more than cell_list_threshold atoms) is stream-ordered memory
// (cudaMallocAsync / cudaFreeAsync on the caller's stream, capturable in a CUDA graph).
// Device code is compiled with -fmad=false (setup.py) and the header uses
// __dmul_rn/__dadd_rn/__dsqrt_rn/__ddiv_rn for the contract operations.

#include <cuda_runtime.h>

#include <string>

#include "radius_graph.h"
#include "radius_graph_api.h"

namespace e3rg {

namespace {

constexpr int kThreadsSelect = 128;  // 4 warps per block (fewer when K is large)
constexpr int kThreadsElem = 256;
constexpr int kThreadsScan = 128;    // 4 crystals per block

__global__ void prep_kernel(SelectArgs a) {
  const long long n = a.n_atoms > a.n_graphs ? a.n_atoms : a.n_graphs;
  for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (long long)gridDim.x * blockDim.x)
    prep_thread(a, t);
}

__global__ void scan_kernel(SelectArgs a) {
  __shared__ int part[kThreadsScan / kWarp][kWarp];
  const int lane = threadIdx.x & (kWarp - 1);
  const int wib = threadIdx.x / kWarp;
  const long long nwarps = (long long)gridDim.x * (blockDim.x / kWarp);
  for (long long g = (long long)blockIdx.x * (blockDim.x / kWarp) + wib; g < a.n_graphs; g += nwarps) {
    const ScanJob j = scan_job(a, g);  // warp-uniform
    if (!j.active) continue;
    scan_part(a, j, lane, part[wib]);
    __syncwarp();
    scan_lane(a, j, lane, part[wib]);
    __syncwarp();  // part[] is reused by the warp's next crystal
  }
}

__global__ void fill_kernel(SelectArgs a) {
  for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < a.n_atoms;
       t += (long long)gridDim.x * blockDim.x)
    fill_thread(a, t);
}

__host__ __device__ inline size_t warp_bytes(long long kmax) {
  size_t b = sizeof(WarpScratch) + sizeof(Cand) * (size_t)(kmax > 0 ? kmax : 1);
  return (b + 15) & ~size_t(15);
}

__global__ void select_kernel(SelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & (kWarp - 1);
  const int wib = threadIdx.x / kWarp;
  const int wpb = blockDim.x / kWarp;
  const long long K = a.max_neighbors;
  WarpScratch* ws = reinterpret_cast<WarpScratch*>(smem + wib * warp_bytes(K));
  Cand* kept = reinterpret_cast<Cand*>(reinterpret_cast<unsigned char*>(ws) + sizeof(WarpScratch));
  const long long nwarps = (long long)gridDim.x * wpb;
  for (long long i = (long long)blockIdx.x * wpb + wib; i < a.n_atoms; i += nwarps) {
    CentreJob J;
    select_setup(a, i, J);  // warp-uniform: every lane computes the same values
    if (!J.active) {  // reported by prep_kernel
      if (lane == 0) {
        a.kept_count[i] = 0;
        a.ncand[i] = 0;
      }
      continue;
    }
    if (J.bad_reserved && lane == 0) set_status(a.status, kErrBadReserved);
    int* out = a.kept + 4 * K * i;

    warp_begin(ws, lane);
    __syncwarp();
    warp_pass1(ws, J.g, J.c, J.it, J.wa, lane);
    __syncwarp();
    warp_hist_part(ws, lane);
    __syncwarp();
    const Threshold th = warp_threshold(ws, J.cap);
    if (J.cap == 0) {
      // nothing kept
    } else if (th.bcount > kBoundaryCap) {
      if (lane == 0) warp_fallback(ws, kept, J.cap, J.g, J.c, J.it, J.wa, out);
    } else {
      warp_pass2(ws, kept, J.g, J.c, J.it, J.wa, th.T, lane);
      __syncwarp();
      warp_finalize(ws, kept, th, (int)i, lane, out);
    }
    __syncwarp();
    if (lane == 0) {
      a.kept_count[i] = ws->nsel;
      a.ncand[i] = (long long)ws->ncand;
    }
    __syncwarp();
  }
}

__global__ void emit_kernel(EmitArgs a) {
  const long long total = a.n_atoms * (a.max_neighbors + 6);
  if (a.n_graphs <= 0) return;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x)
    emit_thread(a, idx);
}

std::string last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

int grid_for(long long work, int threads) {
  long long b = (work + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > (1 << 20)) b = 1 << 20;
  return (int)b;
}

// The select phase's kernels on `stream` (the scratch, if any, is allocated and zeroed).
std::string launch_select(const SelectArgs& a, int dev, cudaStream_t stream) {
  const long long nprep = a.n_atoms > a.n_graphs ? a.n_atoms : a.n_graphs;
  prep_kernel<<<grid_for(nprep, kThreadsElem), kThreadsElem, 0, stream>>>(a);
  std::string err = last_error();
  if (!err.empty() || a.n_atoms == 0) return err;
  if (a.bins) {
    scan_kernel<<<grid_for(a.n_graphs, kThreadsScan / kWarp), kThreadsScan, 0, stream>>>(a);
    fill_kernel<<<grid_for(a.n_atoms, kThreadsElem), kThreadsElem, 0, stream>>>(a);
    err = last_error();
    if (!err.empty()) return err;
  }
  int smem_optin = 0, smem_default = 48 * 1024;
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  const size_t per_warp = warp_bytes(a.max_neighbors);
  int wpb = kThreadsSelect / kWarp;
  while (wpb > 1 && per_warp * wpb > (size_t)smem_default) --wpb;
  const size_t smem = per_warp * wpb;
  if (smem > (size_t)smem_default) {
    if (smem > (size_t)smem_optin) return "max_neighbors too large for the GPU's shared memory";
    cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  }
  select_kernel<<<grid_for(a.n_atoms, wpb), wpb * kWarp, smem, stream>>>(a);
  return last_error();
}

}  // namespace

std::string cuda_select(const CudaSelectArgs& c, uintptr_t stream_handle) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (c.n_atoms == 0 && c.n_graphs == 0) return {};
  // This module links its own (static) CUDA runtime, whose current device is independent of
  // torch's: select the arrays' device explicitly.
  if (cudaSetDevice(c.device) != cudaSuccess) return last_error();
  SelectArgs a;
  a.pos = c.pos;
  a.n_atoms = c.n_atoms;
  a.cells = c.cells;
  a.ptr = c.ptr;
  a.n_graphs = c.n_graphs;
  a.radius = c.radius;
  a.max_neighbors = c.max_neighbors;
  a.reserved = c.reserved;
  a.cell_list_threshold = c.cell_list_threshold < 0 ? kDefaultCellListThreshold : c.cell_list_threshold;
  a.wfrac = c.wfrac;
  a.shift = c.shift;
  a.kept = c.kept;
  a.kept_count = c.kept_count;
  a.ncand = c.ncand;
  a.status = c.status;
  // Cell-list scratch only when a crystal can have more than the threshold's atoms.
  void* scratch = nullptr;
  if (c.n_atoms > a.cell_list_threshold) {
    const long long nb = bins_size(c.n_atoms, c.n_graphs);
    const size_t bytes = sizeof(int32_t) * (size_t)(nb + 3 * c.n_atoms);
    if (cudaMallocAsync(&scratch, bytes, stream) != cudaSuccess) return last_error();
    a.bins = static_cast<int32_t*>(scratch);
    a.bin_atoms = a.bins + nb;
    a.atom_bin = a.bin_atoms + c.n_atoms;
    a.atom_rank = a.atom_bin + c.n_atoms;
    if (cudaMemsetAsync(a.bins, 0, sizeof(int32_t) * (size_t)nb, stream) != cudaSuccess) {
      const std::string err = last_error();
      cudaFreeAsync(scratch, stream);
      return err;
    }
  }
  std::string err = launch_select(a, c.device, stream);
  if (scratch && cudaFreeAsync(scratch, stream) != cudaSuccess && err.empty()) err = last_error();
  return err;
}

std::string cuda_emit(const CudaEmitArgs& c, uintptr_t stream_handle) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const long long total = c.n_atoms * (c.max_neighbors + 6);
  if (total == 0 || c.capacity == 0) return {};
  if (cudaSetDevice(c.device) != cudaSuccess) return last_error();
  EmitArgs a;
  a.pos = c.pos;
  a.n_atoms = c.n_atoms;
  a.cells = c.cells;
  a.ptr = c.ptr;
  a.n_graphs = c.n_graphs;
  a.max_neighbors = c.max_neighbors;
  a.kept = c.kept;
  a.kept_count = c.kept_count;
  a.rowptr = c.rowptr;
  a.capacity = c.capacity;
  a.edge_index = c.edge_index;
  a.offsets = c.offsets;
  a.dist = c.dist;
  emit_kernel<<<grid_for(total, kThreadsElem), kThreadsElem, 0, stream>>>(a);
  return last_error();
}
int cuda_device_count(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why) *why = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    cudaGetLastError();  // clear the sticky-free error state
    return -1;
  }
  return n;
}

std::string cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace e3rg
