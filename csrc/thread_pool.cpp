// Persistent worker pool of the CPU launchers (thread_pool.h).

#include "thread_pool.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace e3rg {

namespace {

// Persistent helper threads. run(n, fn) calls fn(0) on the caller and fn(1 .. n-1) on helpers;
// fn takes work from a shared atomic counter until none is left. run() returns once every call
// of fn that started has returned; a helper that is scheduled late, after the work is gone, does
// not start (so a loaded machine does not make the caller wait for an idle helper's wake-up).
// Waits spin briefly before blocking: a helper for kHelperSpin after its job (consecutive calls,
// e.g. a batch built in chunks, find it awake), the caller up to kCallerSpin for the helpers'
// last units. Waking a blocked thread costs tens to hundreds of microseconds on a virtual
// machine (the idle vCPU is descheduled), as much as a whole small call.
class WorkerPool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> serial(call_mu_);  // one parallel region at a time
    {
      std::lock_guard<std::mutex> lock(mu_);
      while ((int)threads_.size() < n - 1) threads_.emplace_back([this] { loop(); });
      job_ = &fn;
      want_ = n;
      next_slot_ = 1;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    fn(0);
    spin_until([this] { return busy_.load() == 0; }, kCallerSpin);
    std::unique_lock<std::mutex> lock(mu_);
    job_ = nullptr;
    done_cv_.wait(lock, [this] { return busy_.load() == 0; });
  }

 private:
  static constexpr auto kHelperSpin = std::chrono::microseconds(200);
  static constexpr auto kCallerSpin = std::chrono::microseconds(2000);

  template <class Pred>
  static void spin_until(Pred done, std::chrono::microseconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    for (int k = 0; !done(); ++k) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if ((k & 63) == 63 && std::chrono::steady_clock::now() > until) return;
    }
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (gen_.load() == seen) {
        lock.unlock();
        spin_until([&] { return gen_.load() != seen; }, kHelperSpin);
        lock.lock();
      }
      cv_.wait(lock, [&] { return job_ != nullptr && gen_.load() != seen && next_slot_ < want_; });
      seen = gen_.load();
      const int slot = next_slot_++;
      const std::function<void(int)>* f = job_;
      busy_.fetch_add(1);
      lock.unlock();
      (*f)(slot);
      lock.lock();
      if (busy_.fetch_sub(1) == 1) done_cv_.notify_all();
    }
  }
  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> busy_{0};
  int want_ = 0, next_slot_ = 1;
};

// One pool per process (re-created in a forked child, whose helpers do not exist). Never
// destroyed: its threads wait on a condition variable until the process exits.
WorkerPool& worker_pool() {
  static std::mutex mu;
  static WorkerPool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (pool == nullptr || owner != getpid()) {
    pool = new WorkerPool();
    owner = getpid();
  }
  return *pool;
}

}  // namespace

void run_parallel(int n, const std::function<void(int)>& fn) { worker_pool().run(n, fn); }

}  // namespace e3rg
