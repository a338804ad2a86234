#pragma once
// Eigen maps over smoe views: the CPU backend's GEMMs run on user memory without copies.
#include <Eigen/Core>

#include "smoe/core/view.hpp"

namespace smoe::cpu_kernels {

template <class T>
using RowMatrix = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
using EigenMap = Eigen::Map<std::conditional_t<std::is_const_v<T>, const RowMatrix<T>, RowMatrix<T>>, Eigen::Unaligned,
                            Eigen::OuterStride<>>;

template <class T>
EigenMap<T> eigen(MatrixView<T> v) {
  return EigenMap<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.stride));
}

}  // namespace smoe::cpu_kernels
