// ParallelFor on a persistent pool of worker threads.
//
// The range is cut into chunks (several per thread, each at least min_block
// indices, boundaries fixed by n, threads and min_block only); the calling
// thread and the pool's workers claim chunks from an atomic counter until
// none is left. On a shared machine a thread may not run for milliseconds:
// with static halves the call would wait for it, with claimed chunks the
// threads that do run take over its share. The caller always works on its
// own job, so a call completes even when every worker is busy elsewhere
// (concurrent or nested calls), and it waits only for chunks that a worker
// actually started. Workers are created on first need and then reused, so
// small tensors do not pay a thread start per call.
#include "arrowquant/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace arrowquant {

int HardwareThreads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

int ResolveThreads(int requested) { return requested > 0 ? requested : HardwareThreads(); }

namespace {

struct Job {
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0;
  int64_t chunk = 1;
  int64_t chunks = 0;
  std::atomic<int64_t> next{0};
  int helpers_wanted = 0;  // workers besides the caller
  int helpers = 0;         // workers that joined (guarded by the pool mutex)
  int active = 0;          // workers inside RunChunks (guarded by the pool mutex)

  bool HasWork() const { return next.load(std::memory_order_relaxed) < chunks; }
};

void RunChunks(Job& job) {
  for (;;) {
    const int64_t c = job.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= job.chunks) return;
    const int64_t begin = c * job.chunk;
    (*job.fn)(begin, std::min(job.n, begin + job.chunk));
  }
}

class Pool {
 public:
  // Runs `job` on the caller and up to job.helpers_wanted workers.
  void Run(Job& job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(workers_) < job.helpers_wanted) {
        std::thread([this] { WorkerLoop(); }).detach();
        ++workers_;
      }
      jobs_.push_back(&job);
    }
    work_cv_.notify_all();
    RunChunks(job);
    std::unique_lock<std::mutex> lock(mu_);
    jobs_.erase(std::remove(jobs_.begin(), jobs_.end(), &job), jobs_.end());
    done_cv_.wait(lock, [&] { return job.active == 0; });
  }

 private:
  Job* FindJob() {
    for (Job* job : jobs_) {
      if (job->helpers < job->helpers_wanted && job->HasWork()) return job;
    }
    return nullptr;
  }

  void WorkerLoop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      Job* job = nullptr;
      work_cv_.wait(lock, [&] { return (job = FindJob()) != nullptr; });
      ++job->helpers;
      ++job->active;
      lock.unlock();
      RunChunks(*job);
      lock.lock();
      if (--job->active == 0) done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::vector<Job*> jobs_;
  size_t workers_ = 0;
};

// Never destroyed: detached workers may still wait on it at exit. A forked
// child has none of the parent's threads (and maybe a mutex locked by one),
// so it starts with a fresh pool.
Pool* g_pool = nullptr;
std::once_flag g_pool_once;

Pool& GetPool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool(); });
  });
  return *g_pool;
}

}  // namespace

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
  // About 8 chunks per thread: enough for the running threads to take over
  // a stalled one's share, few enough to keep the per-chunk cost small.
  constexpr int64_t kChunksPerThread = 8;
  Job job;
  job.fn = &fn;
  job.n = n;
  job.chunk =
      std::max(min_block, (n + workers * kChunksPerThread - 1) / (workers * kChunksPerThread));
  job.chunks = (n + job.chunk - 1) / job.chunk;
  job.helpers_wanted = workers - 1;
  GetPool().Run(job);
}

}  // namespace arrowquant
