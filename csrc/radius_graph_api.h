// Plain C++ interface of the radius-graph launchers (no nanobind, no CUDA headers), shared by
// module.cpp, the CPU launcher (radius_graph_cpu*.cpp, radius_graph_warp_emulation.cpp) and
// radius_graph_cuda.cu.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "output_cache.h"

namespace e3rg {

// Crystals with more atoms than this use the cell list (default of the CPU launcher's portable
// paths; its AVX-512 cell list overtakes the image box far earlier, see
// default_cell_list_threshold).
constexpr int64_t kDefaultCellListThreshold = 768;
constexpr int64_t kDefaultCellListThresholdAvx512 = 128;

// The CPU launcher's enumeration (radius_graph_cpu.cpp). Every path gives the reference's result
// exactly; all but Auto exist for the tests, which compare them. The values are the `algo`
// integers of the Python interface (module.cpp passes them through): keep them.
enum class GraphPath : int {
  Auto = 0,           // image box for small crystals, cell list for large ones; AVX-512 where the CPU has it
  WarpEmulation = 1,  // the CUDA kernel's warp algorithm, emulated lane by lane
  BruteForce = 2,     // exact per-pair image bounds for small crystals (cell list for large ones)
  Portable = 3,       // Auto without its AVX-512 paths
};

struct CpuArgs {
  const double* pos = nullptr;        // (N, 3) float64
  int64_t n_atoms = 0;
  const double* cells = nullptr;      // (G, 3, 3) float64, rows a, b, c
  const int64_t* ptr = nullptr;       // (G + 1,) int64
  int64_t n_graphs = 0;
  double radius = 6.0;
  int64_t max_neighbors = 50;
  const int64_t* reserved = nullptr;  // (N,) or null
  int num_threads = 0;                // <= 0: hardware concurrency
  int64_t cell_list_threshold = kDefaultCellListThreshold;  // < 0: default_cell_list_threshold(path)
  GraphPath path = GraphPath::Auto;
};

// Outputs, allocated by the launcher with out_alloc (output_cache.h; the caller releases them
// with out_free).
struct CpuOut {
  int64_t n_edges = 0;
  int64_t* edge_index = nullptr;  // (2, E)
  int64_t* offsets = nullptr;     // (E, 3)
  int64_t* rowptr = nullptr;      // (N + 1,)
  double* dist = nullptr;         // (E,)
  int64_t* ncand = nullptr;       // (N,)
};

// The outputs could not be allocated (CPU launcher only; the other error bits are in
// radius_graph.h).
constexpr int kErrNoMemory = 32;

// Returns 0 on success, otherwise a kErr* bit set (radius_graph.h, or kErrNoMemory) and a message
// in *err; the outputs are then null.
int radius_graph_cpu(const CpuArgs& args, CpuOut& out, std::string* err);

std::string error_message(int bits);

// Whether GraphPath::Auto takes the AVX-512 paths on this CPU (radius_graph_cpu_avx512.cpp).
bool cpu_simd_avx512();
// The default cell-list threshold of `path` on this CPU (measured crossovers on rattled diamond
// supercells: image box vs cell list ~500 atoms on the portable paths, < 128 with AVX-512; the
// MP-like mix, <= 64 atoms, is faster on the image box either way).
int64_t default_cell_list_threshold(GraphPath path);

// The CUDA launcher's select and emit phases run on the CPU, kernel after kernel, thread after
// thread (radius_graph_warp_emulation.cpp; the steps of radius_graph.h, "The CUDA launcher, step by
// step"), for the tests. Uses args' arrays, radius, max_neighbors, reserved and
// cell_list_threshold (< 0: kDefaultCellListThreshold, the CUDA launcher's default); the outputs
// as radius_graph_cpu's. *n_binned: how many crystals took the cell list. Returns 0 or the kErr*
// bits (message in *err, outputs null).
int radius_graph_cuda_emulated(const CpuArgs& args, CpuOut& out, int64_t* n_binned, std::string* err);

#ifdef E3RELAX_WITH_CUDA
// CUDA launchers (radius_graph_cuda.cu). All pointers are device pointers; `stream` is a
// cudaStream_t as an integer. Return "" on success, else the CUDA error string.
struct CudaSelectArgs {
  int device;                 // CUDA device of every array (this module has its own runtime state)
  const double* pos;          // (N, 3)
  int64_t n_atoms;
  const double* cells;        // (G, 3, 3)
  const int64_t* ptr;         // (G + 1,)
  int64_t n_graphs;
  double radius;
  int64_t max_neighbors;
  const int64_t* reserved;    // (N,) or null
  double* wfrac;              // scratch (N, 3)
  int32_t* shift;             // scratch (N, 3)
  int32_t* kept;              // scratch (N, K, 4): (j, o0, o1, o2) of the kept non-self edges
  int64_t* kept_count;        // (N,) out: kept non-self edges per centre
  int64_t* ncand;             // (N,) out
  int64_t* status;            // (1,) out: error bits (OR-ed in; zero it before the call)
  int64_t cell_list_threshold;  // crystals with more atoms use the cell list (< 0: kDefaultCellListThreshold)
};
struct CudaEmitArgs {
  int device;
  const double* pos;
  int64_t n_atoms;
  const double* cells;
  const int64_t* ptr;
  int64_t n_graphs;
  int64_t max_neighbors;
  const int32_t* kept;        // from select
  const int64_t* kept_count;  // from select
  const int64_t* rowptr;      // (N + 1,) exclusive scan of kept_count + 6
  int64_t capacity;           // edges allocated in the outputs (E or a fixed capacity)
  int64_t* edge_index;        // (2, capacity)
  int64_t* offsets;           // (capacity, 3)
  double* dist;               // (capacity,)
};
std::string cuda_select(const CudaSelectArgs& a, uintptr_t stream);
std::string cuda_emit(const CudaEmitArgs& a, uintptr_t stream);
// Number of CUDA devices, or -1 with the reason in *why.
int cuda_device_count(std::string* why);
std::string cuda_runtime_version();
#endif

}  // namespace e3rg
