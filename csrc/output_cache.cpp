// The output-block cache behind out_alloc / out_free (output_cache.h).

#include "output_cache.h"

#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

namespace e3rg {

namespace {

// Output blocks. The caller releases them with out_free, which keeps up to kOutCacheBytes of them
// for later calls: a graph's outputs are tens of MB, which glibc would map fresh (page faults, ~20 %
// of the copy phase) on every call and unmap on release. A 64-byte header holds the capacity.
constexpr size_t kOutCacheBytes = size_t(128) << 20;
constexpr size_t kOutHeader = 64;
// Never destroyed (like the worker pool, thread_pool.cpp): arrays released during interpreter
// shutdown, after static destructors ran, must still find it; the blocks it holds stay reachable.
struct OutCache {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> blocks;  // (capacity, block), most recently released last
  size_t bytes = 0;
};
OutCache& out_cache() {
  static OutCache* cache = new OutCache();
  return *cache;
}

}  // namespace

void* out_alloc(size_t bytes) {
  {
    OutCache& c = out_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    // The smallest cached block that fits without wasting more than about half of it.
    int best = -1;
    for (int t = 0; t < (int)c.blocks.size(); ++t) {
      const size_t cap = c.blocks[t].first;
      if (cap >= bytes && cap <= 2 * bytes + 65536 && (best < 0 || cap < c.blocks[best].first)) best = t;
    }
    if (best >= 0) {
      char* base = static_cast<char*>(c.blocks[best].second);
      c.bytes -= c.blocks[best].first;
      c.blocks.erase(c.blocks.begin() + best);
      return base + kOutHeader;
    }
  }
  char* base = static_cast<char*>(std::malloc(bytes + kOutHeader));
  if (base == nullptr) return nullptr;
  *reinterpret_cast<size_t*>(base) = bytes;
  return base + kOutHeader;
}

void out_free(void* p) {
  if (p == nullptr) return;
  char* base = static_cast<char*>(p) - kOutHeader;
  const size_t cap = *reinterpret_cast<size_t*>(base);
  OutCache& c = out_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (cap > kOutCacheBytes / 2) {
    std::free(base);
    return;
  }
  while (c.bytes + cap > kOutCacheBytes && !c.blocks.empty()) {  // evict the oldest
    c.bytes -= c.blocks.front().first;
    std::free(c.blocks.front().second);
    c.blocks.erase(c.blocks.begin());
  }
  c.blocks.emplace_back(cap, base);
  c.bytes += cap;
}

}  // namespace e3rg
