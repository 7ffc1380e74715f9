// CPU launcher of the CUDA message kernel's logic, for the tests (the `cpu` backend of the op is
// message_passing_cpu.cpp): threads over receivers (dynamic chunks), each receiver handled by
// e3mp::receiver (message_passing.h), i.e. the same per-receiver / per-channel operations as the
// CUDA kernel. Deterministic: a receiver's result does not depend on the thread that computes it.

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "message_passing.h"
#include "message_passing_api.h"

namespace e3mp {

namespace {

template <class T>
int64_t run(const Params<T>& p, int num_threads) {
  const int64_t N = p.n_atoms;
  if (N <= 0) return 0;
  int nt = num_threads > 0 ? num_threads : (int)std::max(1u, std::thread::hardware_concurrency());
  const int64_t chunk = 16;
  nt = (int)std::min<int64_t>(nt, (N + chunk - 1) / chunk);
  nt = std::max(nt, 1);
  std::atomic<int64_t> next{0}, bad{0};
  auto work = [&]() {
    std::vector<Acc<T>> acc((size_t)std::max<int64_t>(p.hidden, 1));
    std::vector<T> f((size_t)std::max<int64_t>(EdgeTile<T>::value * p.num_rbf, 1));
    int64_t nbad = 0;
    for (;;) {
      const int64_t s = next.fetch_add(chunk);
      if (s >= N) break;
      const int64_t e = std::min(N, s + chunk);
      for (int64_t i = s; i < e; ++i) nbad += receiver(p, i, acc.data(), f.data()) ? 0 : 1;
    }
    bad += nbad;
  };
  if (nt == 1) {
    work();
  } else {
    std::vector<std::thread> threads;
    threads.reserve((size_t)nt - 1);
    for (int t = 1; t < nt; ++t) threads.emplace_back(work);
    work();
    for (auto& th : threads) th.join();
  }
  return bad.load();
}

}  // namespace

int64_t message_passing_cuda_emulated(const Params<float>& p, int num_threads) { return run(p, num_threads); }
int64_t message_passing_cuda_emulated(const Params<double>& p, int num_threads) { return run(p, num_threads); }

}  // namespace e3mp
