#pragma once
// The Communicator concept: what expert parallelism (layers/expert_parallel.hpp) needs from a
// distributed engine, and nothing more. Every call is collective: every rank of the group makes
// the same calls in the same order, also with empty buffers (0 tokens, 0 received rows), so no
// rank ever waits in a collective its peers skipped.
//
//   rank(), size()                       this process's index in [0, size) and the group size
//   all_to_all(send [P·n], recv [P·n])    int32 blocks of n per peer: block p of send goes to rank p,
//                                          block p of recv came from rank p (the count exchange)
//   all_to_all_rows(send, send_rows [P], recv, recv_rows [P], width)
//                                          variable-size exchange of rows of `width` elements of T
//                                          (float or double); rows for peer p follow those for p−1;
//                                          recv_rows must come from an exchange of the send counts
//   all_reduce_sum(span<T>)                elementwise sum over ranks, in place, same result on every rank
//   all_agree(ok)                          logical AND of `ok` over ranks: lets every rank learn that
//                                          one of them rejected its input, and throw, instead of
//                                          leaving the others waiting in the next collective
//
// Implementations: MpiCommunicator (dist/mpi_communicator.hpp, host buffers) and
// NcclCommunicator (dist/nccl_communicator.cuh, device buffers, stream-ordered).
#include <concepts>
#include <cstdint>
#include <span>

#include "smoe/core/config.hpp"

namespace smoe {

template <class C>
concept Communicator = requires(C& c, const C& cc, std::span<const std::int32_t> send_counts,
                                std::span<std::int32_t> recv_counts, const double* send_rows, double* recv_rows,
                                const float* send_rows_f, float* recv_rows_f, std::span<double> values,
                                std::span<float> values_f, bool ok, index_t width) {
  { cc.rank() } -> std::convertible_to<int>;
  { cc.size() } -> std::convertible_to<int>;
  c.all_to_all(send_counts, recv_counts);
  c.all_to_all_rows(send_rows, send_counts, recv_rows, send_counts, width);
  c.all_to_all_rows(send_rows_f, send_counts, recv_rows_f, send_counts, width);
  c.all_reduce_sum(values);
  c.all_reduce_sum(values_f);
  { c.all_agree(ok) } -> std::convertible_to<bool>;
};

}  // namespace smoe
