// The CPU launchers' worker threads: a persistent pool per process (thread_pool.cpp).
#pragma once

#include <functional>

namespace e3rg {

// One parallel region: calls fn(0) on the caller and fn(1 .. n-1) on persistent helper threads;
// fn takes its work from a shared atomic counter until none is left. Returns once every call of fn
// that started has returned. A helper that is scheduled late, after the work is gone, may not call
// fn at all, so fn must not rely on every slot running. One region runs at a time (concurrent
// callers wait).
void run_parallel(int n, const std::function<void(int)>& fn);

}  // namespace e3rg
