// Output memory of the CPU radius-graph launcher (output_cache.cpp). Its outputs (CpuOut,
// radius_graph_api.h) are allocated with out_alloc and released by the caller (module.cpp: when
// the numpy array that owns them dies) with out_free, which keeps released blocks, up to 128 MB,
// for later calls.
#pragma once

#include <cstddef>

namespace e3rg {

void* out_alloc(size_t bytes);  // null when the memory cannot be allocated
void out_free(void* p);         // p from out_alloc, or null

}  // namespace e3rg
