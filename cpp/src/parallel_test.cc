#include "arrowquant/parallel.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace arrowquant {
namespace {

// Every index exactly once, in ranges of at least min_block (but the last).
void CheckCover(int64_t n, int threads, int64_t min_block) {
  std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
  std::mutex mu;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  ParallelFor(n, threads, min_block, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) seen[static_cast<size_t>(i)]++;
    std::lock_guard<std::mutex> lock(mu);
    ranges.emplace_back(b, e);
  });
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[static_cast<size_t>(i)].load(), 1) << i;
  for (const auto& [b, e] : ranges) {
    ASSERT_LT(b, e);
    if (e != n) {
      EXPECT_GE(e - b, min_block);
    }
  }
}

TEST(ParallelFor, CoversEveryIndexOnce) {
  for (int64_t n : {1, 2, 7, 100, 1000, 4097}) {
    for (int threads : {0, 1, 2, 3, 8}) {
      for (int64_t min_block : {1, 3, 64, 5000}) CheckCover(n, threads, min_block);
    }
  }
  ParallelFor(0, 4, 1, [](int64_t, int64_t) { FAIL() << "called for an empty range"; });
}

TEST(ParallelFor, ChunkBoundariesDoNotDependOnTiming) {
  auto ranges_of = [](int threads) {
    std::mutex mu;
    std::vector<std::pair<int64_t, int64_t>> r;
    ParallelFor(1000, threads, 7, [&](int64_t b, int64_t e) {
      std::lock_guard<std::mutex> lock(mu);
      r.emplace_back(b, e);
    });
    std::sort(r.begin(), r.end());
    return r;
  };
  const auto first = ranges_of(3);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(ranges_of(3), first);
}

TEST(ParallelFor, ConcurrentAndNestedCalls) {
  std::atomic<int64_t> total{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&] {
      for (int rep = 0; rep < 50; ++rep) {
        ParallelFor(64, 3, 1, [&](int64_t b, int64_t e) {
          // A nested call runs (at least) on its caller: no deadlock.
          ParallelFor(e - b, 2, 1, [&](int64_t nb, int64_t ne) { total += ne - nb; });
        });
      }
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(total.load(), 4 * 50 * 64);
}

}  // namespace
}  // namespace arrowquant
