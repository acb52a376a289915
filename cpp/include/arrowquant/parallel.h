// A small fixed thread pool and parallel_for over index ranges.
#pragma once

#include <cstdint>
#include <functional>

namespace arrowquant {

// Number of hardware threads (at least 1).
int HardwareThreads();

// Resolves a user thread count: 0 or negative means all cores.
int ResolveThreads(int requested);

// Calls fn(begin, end) on disjoint sub-ranges covering [0, n), using up to
// `threads` threads, blocks of at least `min_block` indices. Runs inline when
// one thread suffices. fn must not throw.
void ParallelFor(int64_t n, int threads, int64_t min_block,
                 const std::function<void(int64_t, int64_t)>& fn);

}  // namespace arrowquant
