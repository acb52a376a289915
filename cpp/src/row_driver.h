// The row loop every quantizer shares: rows in parallel tasks, the error of
// the lowest failing row (so a message never depends on thread timing), and
// error sums of fixed row blocks merged in row order (so a floating-point
// total is the same on any number of threads, hence on any machine: a run on
// a cluster reports what one machine does).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#include "arrowquant/parallel.h"
#include "arrowquant/quantize.h"
#include "arrowquant/status.h"

namespace arrowquant::internal {

// First error of a parallel loop: the one with the lowest row index.
class FirstError {
 public:
  void Record(int64_t row, Status st) {
    std::lock_guard<std::mutex> lock(mu_);
    if (row < row_) {
      row_ = row;
      status_ = std::move(st);
    }
  }
  bool any() {
    std::lock_guard<std::mutex> lock(mu_);
    return row_ != std::numeric_limits<int64_t>::max();
  }
  Status status() const { return status_; }

 private:
  std::mutex mu_;
  int64_t row_ = std::numeric_limits<int64_t>::max();
  Status status_;
};

// Rows per parallel task: enough work (~64K elements) to amortize a thread.
inline int64_t MinRowsPerTask(int64_t cols) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1));
}

// Calls row_fn(r, row_buffer, local_stats) for r in [0, rows): row_buffer is a
// float32 scratch row of `cols` values owned by the task, local_stats the
// sums of the row's block (null when stats is null). Rows go in blocks of
// min_rows_per_task, boundaries fixed by rows and that size only; each
// block's sums are merged in block order, never the sums of a thread's share.
// A task stops at its first error; the lowest failing row's status is
// returned.
template <typename RowFn>
Status ForEachRow(int64_t rows, int64_t cols, int threads, int64_t min_rows_per_task,
                  ErrorStats* stats, RowFn row_fn) {
  FirstError error;
  OrderedStats parts;
  const int64_t block = std::max<int64_t>(1, min_rows_per_task);
  const int64_t blocks = (rows + block - 1) / block;
  ParallelFor(blocks, threads, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t b = b0; b < b1; ++b) {
      ErrorStats local;
      const int64_t end = std::min(rows, (b + 1) * block);
      for (int64_t r = b * block; r < end; ++r) {
        Status st = row_fn(r, row.data(), stats ? &local : nullptr);
        if (!st.ok()) {
          error.Record(r, std::move(st));
          return;
        }
      }
      if (stats) parts.Add(b, local);
    }
  });
  if (error.any()) return error.status();
  if (stats) parts.MergeInto(stats);
  return Status::OK();
}

}  // namespace arrowquant::internal
