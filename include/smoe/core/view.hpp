#pragma once
// MatrixView: a non-owning, row-major [rows, cols] window over user memory with an explicit row
// stride (in elements). It never copies or allocates; users pass their own buffers through it.
// `Space` is where the memory lives (cpu: host, cuda: device); host code takes MatrixView<T>, so a
// device view never reaches it by mistake.
#include <cassert>
#include <span>
#include <type_traits>

#include "smoe/core/config.hpp"
#include "smoe/core/error.hpp"

namespace smoe {

template <class T, class Space = cpu>
struct MatrixView {
  using space = Space;
  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t stride = 0;  // elements between the starts of consecutive rows (>= cols)

  constexpr MatrixView() = default;
  constexpr MatrixView(T* d, index_t r, index_t c) : MatrixView(d, r, c, c) {}
  constexpr MatrixView(T* d, index_t r, index_t c, index_t s) : data(d), rows(r), cols(c), stride(s) {
    if (r < 0 || c < 0 || s < c) fail("MatrixView: shape [", r, ", ", c, "] with stride ", s, " is invalid");
    if (d == nullptr && r * c != 0) fail("MatrixView: null data for a non-empty [", r, ", ", c, "] view");
  }
  // A view of T converts to a view of const T.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  constexpr MatrixView(const MatrixView<U, Space>& o) : data(o.data), rows(o.rows), cols(o.cols), stride(o.stride) {}

  SMOE_HOST_DEVICE T& operator()(index_t r, index_t c) const {
    assert(r >= 0 && r < rows && c >= 0 && c < cols);
    return data[r * stride + c];
  }
  SMOE_HOST_DEVICE T* row(index_t r) const {
    assert(r >= 0 && r < rows);
    return data + r * stride;
  }
  std::span<T> row_span(index_t r) const { return {row(r), static_cast<std::size_t>(cols)}; }
  // Rows [begin, end) as a view of the same memory.
  MatrixView rows_range(index_t begin, index_t end) const {
    assert(0 <= begin && begin <= end && end <= rows);
    return MatrixView(rows == 0 ? data : data + begin * stride, end - begin, cols, stride);
  }
  bool contiguous() const { return stride == cols || rows <= 1; }
  bool empty() const { return rows == 0 || cols == 0; }
};

template <class T, class Space = cpu>
using ConstMatrixView = MatrixView<const T, Space>;

// Shape checks at API boundaries: "<context>: <name> must be [r, c], got [R, C]".
template <class T, class Space>
void expect_shape(const char* context, const char* name, const MatrixView<T, Space>& v, index_t rows, index_t cols) {
  if (v.rows != rows || v.cols != cols)
    fail(context, ": ", name, " must be [", rows, ", ", cols, "], got [", v.rows, ", ", v.cols, "]");
}

}  // namespace smoe
