#include "arrowquant/parallel.h"

#include <algorithm>
#include <thread>
#include <vector>

namespace arrowquant {

int HardwareThreads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

int ResolveThreads(int requested) { return requested > 0 ? requested : HardwareThreads(); }

void ParallelFor(int64_t n, int threads, int64_t min_block,
                 const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  min_block = std::max<int64_t>(min_block, 1);
  const int64_t max_tasks = (n + min_block - 1) / min_block;
  const int workers = static_cast<int>(std::min<int64_t>(ResolveThreads(threads), max_tasks));
  if (workers <= 1) {
    fn(0, n);
    return;
  }
  // Contiguous, balanced ranges: thread i takes [i*n/w, (i+1)*n/w).
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int i = 1; i < workers; ++i) {
    const int64_t begin = n * i / workers;
    const int64_t end = n * (i + 1) / workers;
    pool.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  fn(0, n / workers);
  for (std::thread& t : pool) t.join();
}

}  // namespace arrowquant
