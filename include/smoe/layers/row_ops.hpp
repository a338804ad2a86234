#pragma once
// Row operations of the composites written once for both backends (TransformerBlock, MoEStack),
// and the stream a part runs on.
#include <algorithm>

#include "smoe/core/config.hpp"
#include "smoe/core/view.hpp"
#include "smoe/cpu/parallel.hpp"

namespace smoe {

// Row operations in memory space Space (a, b, out [N, d]; out may be a or b), ordered on `stream`
// (ignored on the CPU): add, out = a + b; copy, out = a. RowOps<cpu> is here; RowOps<cuda> in
// cuda/row_ops.cuh.
template <class Space>
struct RowOps;
template <>
struct RowOps<cpu> {
  template <class T, class Stream>
  static void add(ConstMatrixView<T> a, ConstMatrixView<T> b, MatrixView<T> out, Stream) {
    cpu_kernels::parallel_for_blocks(out.rows, 64, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        const T *pa = a.row(t), *pb = b.row(t);
        T* po = out.row(t);
        for (index_t c = 0; c < out.cols; ++c) po[c] = pa[c] + pb[c];
      }
    });
  }
  template <class T, class Stream>
  static void copy(ConstMatrixView<T> a, MatrixView<T> out, Stream) {
    for (index_t t = 0; t < a.rows; ++t) std::copy_n(a.row(t), a.cols, out.row(t));
  }
};

// Copies n host values into `out` (resized to [n]) in memory space Space, ordered on `stream`: a
// model's token ids and targets on their way to a device embedding and loss. Upload<cuda> is in
// cuda/row_ops.cuh.
template <class Space>
struct Upload;

namespace detail {

// The stream a device part runs on (its stream()), or 0 for a CPU part.
template <class C>
auto stream_of(const C& c) {
  if constexpr (requires { c.stream(); })
    return c.stream();
  else
    return 0;
}

}  // namespace detail

}  // namespace smoe
