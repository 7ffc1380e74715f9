// CUDA launcher of the fused message op (spec §6 Step B), forward only: a thin shell around
// message_passing.h.
//
//   mp_kernel  one block per receiver (grid-stride), one thread per channel (blockDim = H rounded
//              up to a warp, at most kMaxThreads; a larger H is split into channel groups, each
//              its own work item that recomputes the tile geometry and basis). Per tile of kEdgeTile edges of the receiver: threads q < ne compute
//              the geometry of edge q (tile_geometry), the block computes the tile's basis rows f
//              into shared memory (threads over (edge, r)), then thread c evaluates its three gate
//              rows for the whole tile (gate_rows_tile: W read once per tile, coalesced when W is
//              passed transposed, i.e. with w_stride_c == 1) and adds the messages in edge order.
//              Each thread stores its channel of ds[i], dv[i] once: no atomics, deterministic.
//
// No host synchronisation. Device code is compiled with -fmad=false (setup.py), like the CPU
// launcher's -ffp-contract=off, so both perform the same roundings (up to exp).

#include <cuda_runtime.h>

#include <string>

#include "message_passing.h"
#include "message_passing_api.h"

namespace e3mp {

namespace {

constexpr int kMaxThreads = 256;  // channels per block; larger H loops over channel groups

template <class T>
__global__ void __launch_bounds__(kMaxThreads) mp_kernel(Params<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t R = p.num_rbf, H = p.hidden;
  T* f = reinterpret_cast<T*>(smem);  // kEdgeTile * R
  T* u = f + kEdgeTile * R;           // kEdgeTile * 3
  T* x = u + kEdgeTile * 3;           // kEdgeTile
  T* env = x + kEdgeTile;             // kEdgeTile
  int64_t* js = reinterpret_cast<int64_t*>(env + kEdgeTile + (kEdgeTile & 1));  // kEdgeTile, 8-aligned
  __shared__ int tile_bad;
  const int tid = threadIdx.x;
  // (receiver, channel group) work items: channels [cg, cg + blockDim) of receiver i.
  const int64_t groups = (H + blockDim.x - 1) / blockDim.x;
  for (int64_t w = blockIdx.x; w < p.n_atoms * groups; w += gridDim.x) {
    const int64_t i = w / groups;
    const int64_t c = (w - i * groups) * blockDim.x + tid;
    Acc<T> acc{0, 0, 0, 0};
    int64_t beg, end;
    bool ok = edge_range(p, i, beg, end);  // uniform over the block
    for (int64_t t = beg; ok && t < end; t += kEdgeTile) {
      const int ne = (int)(end - t < kEdgeTile ? end - t : kEdgeTile);
      if (tid == 0) tile_bad = 0;
      __syncthreads();
      if (tid < ne) {
        js[tid] = tile_geometry(p, t + tid, i, u + 3 * tid, x[tid], env[tid]);
        if (js[tid] < 0) atomicOr(&tile_bad, 1);
      }
      __syncthreads();
      for (int64_t k = tid; k < ne * R; k += blockDim.x) {
        const int q = (int)(k / R);
        f[k] = rbf_value(p, x[q], env[q], k - q * R);
      }
      __syncthreads();
      ok = tile_bad == 0;
      if (ok && c < H) {
        T g[kEdgeTile][3];
        gate_rows_tile(p, f, R, ne, c, g);
#pragma unroll
        for (int q = 0; q < kEdgeTile; ++q) {  // constant trip count: g stays in registers
          if (q < ne) add_message(p, js[q], u + 3 * q, g[q], c, acc);
        }
      }
      __syncthreads();  // the next tile overwrites the shared arrays
    }
    if (c < H) store(p, i, c, acc, ok);
  }
}

std::string last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

template <class T>
std::string launch(const Params<T>& p, int device, uintptr_t stream_handle) {
  if (p.n_atoms <= 0 || p.hidden <= 0) return {};
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  // This module links its own (static) CUDA runtime: select the arrays' device explicitly.
  if (cudaSetDevice(device) != cudaSuccess) return last_error();
  const int threads = (int)(p.hidden >= kMaxThreads ? kMaxThreads : (p.hidden + 31) / 32 * 32);
  const size_t smem = sizeof(T) * (size_t)(kEdgeTile * p.num_rbf + kEdgeTile * 5 + 2) + sizeof(int64_t) * kEdgeTile;
  const size_t smem_default = 48 * 1024;
  if (smem > smem_default) {
    int optin = 0;
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (smem > (size_t)optin) return "num_rbf too large for the GPU's shared memory";
    cudaFuncSetAttribute(mp_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  }
  const int64_t items = p.n_atoms * ((p.hidden + threads - 1) / threads);
  const int64_t blocks = items < (int64_t(1) << 24) ? items : (int64_t(1) << 24);
  mp_kernel<T><<<(unsigned)blocks, threads, smem, stream>>>(p);
  return last_error();
}

}  // namespace

std::string message_passing_cuda(const Params<float>& p, int device, uintptr_t stream) {
  return launch(p, device, stream);
}
std::string message_passing_cuda(const Params<double>& p, int device, uintptr_t stream) {
  return launch(p, device, stream);
}

}  // namespace e3mp
