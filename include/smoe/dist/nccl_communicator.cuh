#pragma once
// NcclCommunicator: the Communicator concept (dist/communicator.hpp) over NCCL, for device buffers
// of the CUDA backend. Compiles where <nccl.h> and the CUDA toolkit are (nvcc or the host compiler
// with the toolkit's include path); it runs only where a GPU is.
//
// Every operation is enqueued on the communicator's stream (stream-ordered). The variable-size
// exchanges are grouped ncclSend/ncclRecv pairs, one per peer, as PyTorch and FastMoE do (NCCL
// before 2.28 has no all-to-all). Counts and the agreement live on the host in the concept, so
// those two calls copy through a small device buffer and synchronize the stream: the one host
// synchronization of an expert-parallel step, which needs the counts to size its buffers.
// all_reduce_sum and all_to_all_rows take device pointers (the span's memory is on the device).
//
// The user creates the ncclComm_t (ncclCommInitRank, with the unique id spread by MPI or their own
// launcher) and keeps ownership; errors throw smoe::error with NCCL's reason.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "smoe/core/config.hpp"
#include "smoe/core/error.hpp"
#include "smoe/dist/communicator.hpp"

namespace smoe {

class NcclCommunicator {
 public:
  static constexpr const char* name = "NcclCommunicator";

  NcclCommunicator(ncclComm_t comm, cudaStream_t stream) : comm_(comm), stream_(stream) {
    check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    check(ncclCommCount(comm_, &size_), "ncclCommCount");
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;
  ~NcclCommunicator() {
    if (scratch_) cudaFree(scratch_);
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  cudaStream_t stream() const { return stream_; }

  // Host spans: staged through device memory, the stream synchronized before returning.
  void all_to_all(std::span<const std::int32_t> send, std::span<std::int32_t> recv) {
    const char* ctx = "NcclCommunicator::all_to_all";
    if (send.size() % std::size_t(size_) != 0)
      fail(ctx, ": send size must be a multiple of size() = ", size_, ", got ", send.size());
    expect_equal(ctx, "recv size (= send size)", send.size(), recv.size());
    const std::size_t n = send.size() / std::size_t(size_);
    std::int32_t* dev = static_cast<std::int32_t*>(scratch(2 * send.size() * sizeof(std::int32_t)));
    cuda(cudaMemcpyAsync(dev, send.data(), send.size_bytes(), cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    check(ncclGroupStart(), "ncclGroupStart");
    for (int p = 0; p < size_; ++p) {
      check(ncclSend(dev + p * n, n, ncclInt32, p, comm_, stream_), "ncclSend");
      check(ncclRecv(dev + send.size() + p * n, n, ncclInt32, p, comm_, stream_), "ncclRecv");
    }
    check(ncclGroupEnd(), "ncclGroupEnd");
    cuda(cudaMemcpyAsync(recv.data(), dev + send.size(), recv.size_bytes(), cudaMemcpyDeviceToHost, stream_),
         "cudaMemcpyAsync");
    cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  // Device rows; counts on the host (rows per peer).
  template <class T>
  void all_to_all_rows(const T* send, std::span<const std::int32_t> send_rows, T* recv,
                       std::span<const std::int32_t> recv_rows, index_t width) {
    const char* ctx = "NcclCommunicator::all_to_all_rows";
    expect_equal(ctx, "send_rows size (= size())", std::size_t(size_), send_rows.size());
    expect_equal(ctx, "recv_rows size (= size())", std::size_t(size_), recv_rows.size());
    std::size_t s = 0, r = 0;
    check(ncclGroupStart(), "ncclGroupStart");
    for (int p = 0; p < size_; ++p) {
      const std::size_t sn = std::size_t(send_rows[p]) * std::size_t(width);
      const std::size_t rn = std::size_t(recv_rows[p]) * std::size_t(width);
      // Zero-size pairs are posted too: both sides of every pair always match.
      check(ncclSend(send + s, sn, type<T>(), p, comm_, stream_), "ncclSend");
      check(ncclRecv(recv + r, rn, type<T>(), p, comm_, stream_), "ncclRecv");
      s += sn;
      r += rn;
    }
    check(ncclGroupEnd(), "ncclGroupEnd");
  }

  // Device values, in place, stream-ordered.
  template <class T>
  void all_reduce_sum(std::span<T> values) {
    check(ncclAllReduce(values.data(), values.data(), values.size(), type<T>(), ncclSum, comm_, stream_),
          "ncclAllReduce");
  }

  // Host flag: staged and synchronized like the counts.
  bool all_agree(bool ok) {
    std::int32_t* dev = static_cast<std::int32_t*>(scratch(sizeof(std::int32_t)));
    const std::int32_t v = ok ? 1 : 0;
    std::int32_t out = 0;
    cuda(cudaMemcpyAsync(dev, &v, sizeof v, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    check(ncclAllReduce(dev, dev, 1, ncclInt32, ncclMin, comm_, stream_), "ncclAllReduce (agreement)");
    cuda(cudaMemcpyAsync(&out, dev, sizeof out, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
    cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return out != 0;
  }

 private:
  template <class T>
  static ncclDataType_t type() {
    if constexpr (std::is_same_v<T, double>) return ncclFloat64;
    else if constexpr (std::is_same_v<T, float>) return ncclFloat32;
    else static_assert(std::is_same_v<T, double>, "NcclCommunicator: rows of float or double");
  }

  void* scratch(std::size_t bytes) {
    if (bytes > scratch_bytes_) {
      if (scratch_) cuda(cudaFree(scratch_), "cudaFree");
      scratch_ = nullptr;
      cuda(cudaMalloc(&scratch_, bytes), "cudaMalloc");
      scratch_bytes_ = bytes;
    }
    return scratch_;
  }

  void check(ncclResult_t rc, const char* call) const {
    if (rc != ncclSuccess) fail(name, ": ", call, " failed on rank ", rank_, ": ", ncclGetErrorString(rc));
  }
  void cuda(cudaError_t rc, const char* call) const {
    if (rc != cudaSuccess) fail(name, ": ", call, " failed on rank ", rank_, ": ", cudaGetErrorString(rc));
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  int rank_ = 0, size_ = 1;
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
};

static_assert(Communicator<NcclCommunicator>);

}  // namespace smoe
