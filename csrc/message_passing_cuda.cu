// CUDA launcher of the fused message op (spec §6 Step B), forward only: a thin shell around
// message_passing.h.
//
//   mp_kernel  one block per receiver (grid-stride), one thread per channel (blockDim = H rounded
//              up to a warp, at most kMaxThreads; a larger H is split into channel groups, each
//              its own work item that recomputes the tile geometry and basis). Per tile of
//              EdgeTile<T>::value edges of the receiver (28 float, 14 double: W is read from L2
//              once per 28 or 14 edges instead of once per 8): threads q < ne compute the geometry
//              of edge q (tile_geometry), the block computes the tile's basis rows f into shared
//              memory (threads over (r, slot), r-major, zero in empty slots), then thread c
//              evaluates its three gate rows for the whole tile (gate_rows_tile: 3 W loads per r,
//              coalesced when W is passed transposed, i.e. with w_stride_c == 1; f by 16-byte
//              broadcast loads; 3 * tile accumulators in registers) and adds the messages in edge
//              order. Each thread stores its channel of ds[i], dv[i] once: no atomics,
//              deterministic.
//
// No host synchronisation. Compiled with nvcc's default FMA contraction (setup.py): the gate sums
// are FFMA/DFMA in the same order as the CPU emulation's separate multiply and add.

#include <cuda_runtime.h>

#include <string>

#include "message_passing.h"
#include "message_passing_api.h"

namespace e3mp {

namespace {

constexpr int kMaxThreads = 256;  // channels per block; larger H loops over channel groups
// Two blocks of kMaxThreads per SM: at most 128 registers (no spills, ptxas -v, float and double).

// Dynamic shared memory of a tile: f (tile * R), u (3 tile), x, env (tile each), js (tile int64).
template <class T>
__host__ __device__ constexpr size_t tile_smem_elems(int64_t num_rbf) {
  return (size_t)EdgeTile<T>::value * (size_t)(num_rbf + 5);
}

template <class T>
__global__ void __launch_bounds__(kMaxThreads, 2) mp_kernel(Params<T> p) {
  constexpr int kTile = EdgeTile<T>::value;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t R = p.num_rbf, H = p.hidden;
  T* f = reinterpret_cast<T*>(smem);  // kTile * R, r-major
  T* u = f + kTile * R;               // kTile * 3
  T* x = u + kTile * 3;               // kTile
  T* env = x + kTile;                 // kTile
  int64_t* js = reinterpret_cast<int64_t*>(smem + sizeof(T) * tile_smem_elems<T>(R));  // kTile, 8-aligned
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
    for (int64_t t = beg; ok && t < end; t += kTile) {
      const int ne = (int)(end - t < kTile ? end - t : kTile);
      if (tid == 0) tile_bad = 0;
      __syncthreads();
      if (tid < ne) {
        js[tid] = tile_geometry(p, t + tid, i, u + 3 * tid, x[tid], env[tid]);
        if (js[tid] < 0) atomicOr(&tile_bad, 1);
      }
      __syncthreads();
      for (int64_t k = tid; k < kTile * R; k += blockDim.x) tile_basis_entry(p, x, env, ne, k, f);
      __syncthreads();
      ok = tile_bad == 0;
      if (ok && c < H) {
        T g[kTile][3];
        gate_rows_tile(p, f, c, g);
#pragma unroll
        for (int q = 0; q < kTile; ++q) {  // constant trip count: g stays in registers
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
  const size_t smem = sizeof(T) * tile_smem_elems<T>(p.num_rbf) + sizeof(int64_t) * EdgeTile<T>::value;
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
