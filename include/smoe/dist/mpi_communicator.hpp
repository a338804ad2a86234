#pragma once
// MpiCommunicator: the Communicator concept (dist/communicator.hpp) over MPI, for host buffers.
//
// It wraps a communicator the user passes in and duplicates it, so smoe's collectives never match
// messages of the user's own. The library never calls MPI_Init or MPI_Finalize: the program
// initializes MPI with at least MPI_THREAD_FUNNELED (only the thread that calls smoe makes MPI
// calls; OpenMP threads inside the kernels never do) and destroys every MpiCommunicator before
// MPI_Finalize. The duplicate's error handler returns errors; a failing call then aborts the whole
// job with the reason (MPI_Abort), so a dead or broken peer takes the job down with a message
// rather than leaving the other ranks waiting.
//
// Rows travel as a contiguous datatype of `width` elements, so the int counts of MPI-3.1 count
// rows, not elements.
// smoe uses the C API only; the C++ bindings (deprecated in MPI-2.2, removed in MPI-3) warn
// under -Wextra, so they are skipped unless the program included <mpi.h> with them before.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <limits>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "smoe/core/config.hpp"
#include "smoe/core/error.hpp"
#include "smoe/dist/communicator.hpp"

namespace smoe {

class MpiCommunicator {
 public:
  static constexpr const char* name = "MpiCommunicator";

  explicit MpiCommunicator(MPI_Comm user) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized)
      fail(name, ": MPI must be initialized by the program (MPI_Init_thread) and not finalized; smoe never calls "
                 "MPI_Init or MPI_Finalize");
    if (user == MPI_COMM_NULL) fail(name, ": communicator must not be MPI_COMM_NULL");
    int provided = MPI_THREAD_SINGLE;
    MPI_Query_thread(&provided);
    if (provided < MPI_THREAD_FUNNELED)
      fail(name, ": MPI thread level must be >= MPI_THREAD_FUNNELED (", int(MPI_THREAD_FUNNELED),
           "), got ", provided, "; initialize with MPI_Init_thread(..., MPI_THREAD_FUNNELED, ...)");
    if (MPI_Comm_dup(user, &comm_) != MPI_SUCCESS) fail(name, ": MPI_Comm_dup failed");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  MpiCommunicator(MpiCommunicator&& o) noexcept
      : comm_(std::exchange(o.comm_, MPI_COMM_NULL)), rank_(o.rank_), size_(o.size_) {}
  MpiCommunicator& operator=(MpiCommunicator&& o) noexcept {
    if (this != &o) {
      release();
      comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
      rank_ = o.rank_;
      size_ = o.size_;
    }
    return *this;
  }
  ~MpiCommunicator() { release(); }

  int rank() const { return rank_; }
  int size() const { return size_; }
  MPI_Comm comm() const { return comm_; }

  void all_to_all(std::span<const std::int32_t> send, std::span<std::int32_t> recv) {
    const char* ctx = "MpiCommunicator::all_to_all";
    if (send.size() % std::size_t(size_) != 0)
      fail(ctx, ": send size must be a multiple of size() = ", size_, ", got ", send.size());
    expect_equal(ctx, "recv size (= send size)", send.size(), recv.size());
    const int n = static_cast<int>(send.size() / std::size_t(size_));
    std::int32_t dummy = 0;  // MPI wants a valid address also for 0 elements
    check(MPI_Alltoall(send.empty() ? &dummy : send.data(), n, MPI_INT32_T, recv.empty() ? &dummy : recv.data(), n,
                       MPI_INT32_T, comm_),
          "MPI_Alltoall");
  }

  template <class T>
  void all_to_all_rows(const T* send, std::span<const std::int32_t> send_rows, T* recv,
                       std::span<const std::int32_t> recv_rows, index_t width) {
    const char* ctx = "MpiCommunicator::all_to_all_rows";
    expect_equal(ctx, "send_rows size (= size())", std::size_t(size_), send_rows.size());
    expect_equal(ctx, "recv_rows size (= size())", std::size_t(size_), recv_rows.size());
    if (width < 1 || width > std::numeric_limits<int>::max()) fail(ctx, ": width must be in [1, 2^31), got ", width);
    const std::vector<int> sd = displacements(ctx, send_rows), rd = displacements(ctx, recv_rows);
    const std::vector<int> sc(send_rows.begin(), send_rows.end()), rc(recv_rows.begin(), recv_rows.end());
    MPI_Datatype row;
    check(MPI_Type_contiguous(static_cast<int>(width), element_type<T>(), &row), "MPI_Type_contiguous");
    check(MPI_Type_commit(&row), "MPI_Type_commit");
    T dummy{};
    const int rc_call = MPI_Alltoallv(send ? send : &dummy, sc.data(), sd.data(), row, recv ? recv : &dummy, rc.data(),
                                      rd.data(), row, comm_);
    MPI_Type_free(&row);
    check(rc_call, "MPI_Alltoallv");
  }

  template <class T>
  void all_reduce_sum(std::span<T> values) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "all_reduce_sum: float or double");
    if (values.size() > std::size_t(std::numeric_limits<int>::max()))
      fail("MpiCommunicator::all_reduce_sum: at most 2^31 - 1 values, got ", values.size());
    T dummy{};
    check(MPI_Allreduce(MPI_IN_PLACE, values.empty() ? &dummy : values.data(), static_cast<int>(values.size()),
                        element_type<T>(), MPI_SUM, comm_),
          "MPI_Allreduce");
  }

  bool all_agree(bool ok) {
    int v = ok ? 1 : 0;
    check(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_LAND, comm_), "MPI_Allreduce (agreement)");
    return v != 0;
  }

 private:
  template <class T>
  static MPI_Datatype element_type() {
    if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
    else if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
    else static_assert(std::is_same_v<T, double>, "MpiCommunicator: rows of float or double");
  }

  static std::vector<int> displacements(const char* ctx, std::span<const std::int32_t> rows) {
    std::vector<int> d(rows.size());
    std::int64_t at = 0;
    for (std::size_t p = 0; p < rows.size(); ++p) {
      if (rows[p] < 0) fail(ctx, ": row counts must be >= 0, got ", rows[p], " for rank ", p);
      d[p] = static_cast<int>(at);
      at += rows[p];
    }
    if (at > std::numeric_limits<int>::max()) fail(ctx, ": at most 2^31 - 1 rows per call, got ", at);
    return d;
  }

  // An MPI error leaves the collective state of the group unknown: abort the job with the reason.
  void check(int rc, const char* call) const {
    if (rc == MPI_SUCCESS) return;
    char reason[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(rc, reason, &length);
    std::fprintf(stderr, "smoe: %s failed on rank %d of %d: %.*s; aborting the job\n", call, rank_, size_, length,
                 reason);
    std::fflush(stderr);
    MPI_Abort(comm_, rc);
  }

  void release() noexcept {
    if (comm_ == MPI_COMM_NULL) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

static_assert(Communicator<MpiCommunicator>);

}  // namespace smoe
