// CUDA launcher of the periodic radius graph (spec §3): a thin shell around radius_graph.h.
//
//   prep_kernel    one thread per atom: wrapped fractional coordinates and integer shifts, input
//                  checks (error bits OR-ed into status[0]).
//   select_kernel  one warp per centre (grid-stride over centres): the warp form of the header
//                  (histogram pass, threshold, collect pass, rank sort in shared memory; no
//                  global sort), writes the kept non-self (j, o) of centre i to kept[i, :, :] and
//                  kept_count[i], ncand[i].
//   emit_kernel    one thread per (centre, slot < K + 6): the kept edges and the six self-image
//                  edges of centre i at rowptr[i] + slot, skipping positions >= capacity (the
//                  caller compares rowptr[N] with the capacity: no silent truncation).
//
// No host synchronisation in here; rowptr (a cumsum) and the single read of the edge count are
// done by the Python side on the caller's stream. Device code is compiled with -fmad=false and
// the header uses __dmul_rn/__dadd_rn/__dsqrt_rn/__ddiv_rn for the contract operations.

#include <cuda_runtime.h>

#include <string>

#include "radius_graph.h"
#include "radius_graph_api.h"

namespace e3rg {

namespace {

constexpr int kThreadsSelect = 128;  // 4 warps per block (fewer when K is large)
constexpr int kThreadsElem = 256;

__device__ __forceinline__ void set_error(int64_t* status, int bits) {
  atomicOr(reinterpret_cast<unsigned long long*>(status), (unsigned long long)bits);
}

__global__ void prep_kernel(CudaSelectArgs a) {
  const long long n = a.n_atoms > a.n_graphs ? a.n_atoms : a.n_graphs;
  for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (long long)gridDim.x * blockDim.x) {
    if (t < a.n_graphs) {
      if (a.ptr[t + 1] < a.ptr[t]) set_error(a.status, kErrBadPtr);
      if (t == 0 && (a.ptr[0] != 0 || a.ptr[a.n_graphs] != a.n_atoms)) set_error(a.status, kErrBadPtr);
      Cell g;
      if (!cell_setup(a.cells + 9 * t, a.radius, g)) set_error(a.status, kErrSingularCell);
    }
    if (t < a.n_atoms) {
      double* w = a.wfrac + 3 * t;
      int* s = a.shift + 3 * t;
      w[0] = w[1] = w[2] = 0.0;
      s[0] = s[1] = s[2] = 0;
      if (a.n_graphs <= 0) {
        set_error(a.status, kErrBadPtr);
        continue;
      }
      const int gi = crystal_of(a.ptr, (int)a.n_graphs, t);
      Cell g;
      if (!cell_setup(a.cells + 9 * gi, a.radius, g)) continue;
      if (!atom_frac(a.pos + 3 * t, g, w, s)) set_error(a.status, kErrCoordRange);
    }
  }
}

__host__ __device__ inline size_t warp_bytes(long long kmax) {
  size_t b = sizeof(WarpScratch) + sizeof(Cand) * (size_t)(kmax > 0 ? kmax : 1);
  return (b + 15) & ~size_t(15);
}

__global__ void select_kernel(CudaSelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & (kWarp - 1);
  const int wib = threadIdx.x / kWarp;
  const int wpb = blockDim.x / kWarp;
  const long long K = a.max_neighbors;
  WarpScratch* ws = reinterpret_cast<WarpScratch*>(smem + wib * warp_bytes(K));
  Cand* kept = reinterpret_cast<Cand*>(reinterpret_cast<unsigned char*>(ws) + sizeof(WarpScratch));
  const long long nwarps = (long long)gridDim.x * wpb;
  if (a.n_graphs <= 0) return;
  for (long long i = (long long)blockIdx.x * wpb + wib; i < a.n_atoms; i += nwarps) {
    // Warp-uniform set-up: every lane computes the same values.
    const int gi = crystal_of(a.ptr, (int)a.n_graphs, i);
    Cell g;
    const bool ok = cell_setup(a.cells + 9 * gi, a.radius, g);
    long long start = a.ptr[gi], end = a.ptr[gi + 1];
    start = start < 0 ? 0 : (start > a.n_atoms ? a.n_atoms : start);
    end = end < start ? start : (end > a.n_atoms ? a.n_atoms : end);
    if (!ok || i < start || i >= end) {  // reported by prep_kernel
      if (lane == 0) {
        a.kept_count[i] = 0;
        a.ncand[i] = 0;
      }
      continue;
    }
    Centre c;
    make_centre((int)i, start, end - start, a.pos, a.wfrac, a.shift, c);
    Items it;
    centre_items(g, c, false, it);
    const WarpArgs wa{a.pos, a.wfrac, a.shift, nullptr, nullptr};
    long long res = a.reserved ? a.reserved[i] : 0;
    if (res < 0) {
      if (lane == 0) set_error(a.status, kErrBadReserved);
      res = 0;
    }
    long long capl = K - res;
    const int cap = (int)(capl < 0 ? 0 : (capl > K ? K : capl));
    int* out = a.kept + 4 * K * i;

    warp_begin(ws, lane);
    __syncwarp();
    warp_pass1(ws, g, c, it, wa, lane);
    __syncwarp();
    warp_hist_part(ws, lane);
    __syncwarp();
    const Threshold th = warp_threshold(ws, cap);
    if (cap == 0) {
      // nothing kept
    } else if (th.bcount > kBoundaryCap) {
      if (lane == 0) warp_fallback(ws, kept, cap, g, c, it, wa, out);
    } else {
      warp_pass2(ws, kept, g, c, it, wa, th.T, lane);
      __syncwarp();
      warp_finalize(ws, kept, th, (int)i, lane, out);
    }
    __syncwarp();
    if (lane == 0) {
      a.kept_count[i] = ws->nsel;
      a.ncand[i] = ws->ncand;
    }
    __syncwarp();
  }
}

__global__ void emit_kernel(CudaEmitArgs a) {
  const long long K = a.max_neighbors;
  const long long slots = K + 6;
  const long long total = a.n_atoms * slots;
  if (a.n_graphs <= 0) return;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const long long i = idx / slots;
    const int t = (int)(idx - i * slots);
    const int kc = (int)a.kept_count[i];
    if (t >= kc + 6) continue;
    const long long e = a.rowptr[i] + t;
    if (e < 0 || e >= a.capacity) continue;
    const int gi = crystal_of(a.ptr, (int)a.n_graphs, i);
    emit_slot((int)i, t, kc, a.kept + 4 * K * i, a.pos, a.cells + 9 * gi, e, a.edge_index, a.capacity, a.offsets,
              a.dist);
  }
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

}  // namespace

std::string cuda_select(const CudaSelectArgs& a, uintptr_t stream_handle) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (a.n_atoms == 0 && a.n_graphs == 0) return {};
  // This module links its own (static) CUDA runtime, whose current device is independent of
  // torch's: select the arrays' device explicitly.
  if (cudaSetDevice(a.device) != cudaSuccess) return last_error();
  const long long nprep = a.n_atoms > a.n_graphs ? a.n_atoms : a.n_graphs;
  prep_kernel<<<grid_for(nprep, kThreadsElem), kThreadsElem, 0, stream>>>(a);
  std::string err = last_error();
  if (!err.empty() || a.n_atoms == 0) return err;

  const int dev = a.device;
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

std::string cuda_emit(const CudaEmitArgs& a, uintptr_t stream_handle) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const long long total = a.n_atoms * (a.max_neighbors + 6);
  if (total == 0 || a.capacity == 0) return {};
  if (cudaSetDevice(a.device) != cudaSuccess) return last_error();
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
