// XLA FFI handler for flax_ce.cpu_matmul: y[m, n] = x[m, k] @ w[k, n] in fp32 through a CBLAS sgemm
// (Intel MKL's cblas_sgemm_64, handed over at load time, so nothing links against MKL here).
//
// The rows are cut into one chunk per thread of XLA's intra-op pool; the calling thread and the tasks it
// schedules take chunks from a shared counter and each runs a single-threaded sgemm on its chunk. The
// caller only ever waits for chunks another thread has already started, so two such calls running at once
// on a pool whose threads are all busy cannot wait on each other's queued tasks.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm_64: MKL's sgemm with 64-bit sizes, whatever MKL_INTERFACE_LAYER says.
using Sgemm = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                       int64_t, float, float*, int64_t);
using SetLocalThreads = int (*)(int);

Sgemm sgemm = nullptr;
SetLocalThreads set_local_threads = nullptr;

// The kernel is 2-d (an alias also keeps the comma out of the handler macro's arguments).
using Kernel = ffi::Buffer<ffi::F32, 2>;

constexpr int kRowMajor = 101;
constexpr int kNoTrans = 111;
// Below this many multiply-adds one chunk is cheaper than scheduling tasks.
constexpr int64_t kMinSplit = int64_t{1} << 21;

struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable finished;
  int64_t chunks = 1, chunk_rows = 0, m = 0, n = 0, k = 0;
  const float* x = nullptr;
  const float* w = nullptr;
  float* y = nullptr;
};

void RunChunks(Job& job) {
  for (int64_t c = job.next.fetch_add(1); c < job.chunks; c = job.next.fetch_add(1)) {
    const int64_t first = c * job.chunk_rows;
    const int64_t rows = std::min(job.chunk_rows, job.m - first);
    // MKL's own threads stay off: one sgemm per pool thread. The thread-local setting is put back, since
    // the calling thread may be the user's.
    const int previous = set_local_threads != nullptr ? set_local_threads(1) : 0;
    sgemm(kRowMajor, kNoTrans, kNoTrans, rows, job.n, job.k, 1.0f, job.x + first * job.k, job.k, job.w,
          job.n, 0.0f, job.y + first * job.n, job.n);
    if (set_local_threads != nullptr) set_local_threads(previous);
    if (job.done.fetch_add(1) + 1 == job.chunks) {
      std::lock_guard<std::mutex> lock(job.mu);
      job.finished.notify_all();
    }
  }
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, Kernel w,
                  ffi::ResultBuffer<ffi::F32> y) {
  if (sgemm == nullptr) return ffi::Error::Internal("flax_ce_cpu_matmul: no sgemm was set");
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  const int64_t k = w_dims[0], n = w_dims[1];
  if (x_dims.size() < 1 || x_dims.back() != k) {
    return ffi::Error::InvalidArgument("flax_ce_cpu_matmul: x's last dimension is not w's first");
  }
  if (static_cast<int64_t>(y->element_count()) * k != static_cast<int64_t>(x.element_count()) * n) {
    return ffi::Error::InvalidArgument("flax_ce_cpu_matmul: result shape does not match x @ w");
  }
  const int64_t m = k > 0 ? static_cast<int64_t>(x.element_count()) / k : 0;
  float* out = y->typed_data();
  if (k == 0) {  // an empty sum
    std::fill(out, out + static_cast<int64_t>(y->element_count()), 0.0f);
    return ffi::Error::Success();
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  auto job = std::make_shared<Job>();
  job->m = m, job->n = n, job->k = k;
  job->x = x.typed_data(), job->w = w.typed_data(), job->y = out;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = m * n * k < kMinSplit ? 1 : std::min(threads, (m + 7) / 8);
  job->chunk_rows = ((m + chunks - 1) / chunks + 7) / 8 * 8;  // rows in multiples of 8
  job->chunks = (m + job->chunk_rows - 1) / job->chunk_rows;
  // The tasks hold the job, so one that starts after this call returned finds no chunk left and exits.
  for (int64_t i = 1; i < job->chunks; ++i) pool.Schedule([job] { RunChunks(*job); });
  RunChunks(*job);
  std::unique_lock<std::mutex> lock(job->mu);
  job->finished.wait(lock, [&] { return job->done.load() == job->chunks; });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void flax_ce_set_sgemm(void* sgemm_fn, void* set_local_threads_fn) {
  sgemm = reinterpret_cast<Sgemm>(sgemm_fn);
  set_local_threads = reinterpret_cast<SetLocalThreads>(set_local_threads_fn);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxCeCpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<Kernel>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
