#pragma once
// Tensor<T>: an owning, 64-byte aligned host tensor with a row-major shape. Resizing keeps the
// allocation when it is large enough, so per-step caches do not reallocate in steady state.
// Tensor<T, cuda>, the device tensor, is defined by the CUDA backend (smoe/cuda/device_tensor.cuh).
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <new>
#include <span>
#include <type_traits>
#include <vector>

#include "smoe/core/view.hpp"

namespace smoe {

template <class T, class Space = cpu>
class Tensor {
  static_assert(std::is_same_v<Space, cpu>, "Tensor<T, cuda> needs <smoe/cuda/device_tensor.cuh>");

 public:
  using space = cpu;
  static constexpr std::size_t alignment = 64;

  Tensor() = default;
  explicit Tensor(std::vector<index_t> shape) { resize(std::move(shape)); }
  Tensor(std::initializer_list<index_t> shape) : Tensor(std::vector<index_t>(shape)) {}
  Tensor(const Tensor& o) : Tensor(o.shape_) { std::copy_n(o.data(), o.size(), data()); }
  Tensor& operator=(const Tensor& o) {
    if (this != &o) {
      resize(o.shape_);
      std::copy_n(o.data(), o.size(), data());
    }
    return *this;
  }
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;

  // New shape; contents are unspecified unless the size is unchanged. Never shrinks the buffer.
  void resize(std::vector<index_t> shape) {
    // The element and byte counts must fit index_t: a wrapped product would allocate too little.
    constexpr index_t max_elements = index_t(~std::make_unsigned_t<index_t>(0) >> 1) / index_t(sizeof(T));
    index_t n = 1;
    bool empty = false, overflow = false;
    for (index_t d : shape) {
      if (d < 0) fail("Tensor: negative dimension ", d);
      empty = empty || d == 0;
      if (!empty && !overflow && n > max_elements / d) overflow = true;
      if (!overflow) n *= d;
    }
    if (empty) {
      n = 0;
    } else if (overflow) {
      std::string dims;
      for (index_t d : shape) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
      fail("Tensor: shape [", dims, "] has more than ", max_elements, " elements of ", sizeof(T),
           " bytes (the byte count must fit index_t)");
    }
    if (n > capacity_) {
      buffer_.reset(static_cast<T*>(::operator new[](static_cast<std::size_t>(n) * sizeof(T), std::align_val_t{alignment})));
      capacity_ = n;
    }
    shape_ = std::move(shape);
    size_ = n;
  }
  void resize(std::initializer_list<index_t> shape) { resize(std::vector<index_t>(shape)); }
  void fill(T v) { std::fill_n(data(), size_, v); }
  void zero() { fill(T(0)); }

  T* data() { return buffer_.get(); }
  const T* data() const { return buffer_.get(); }
  index_t size() const { return size_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  const std::vector<index_t>& shape() const { return shape_; }
  index_t dim(int i) const { return shape_.at(static_cast<std::size_t>(i)); }
  T& operator[](index_t i) { return data()[i]; }
  const T& operator[](index_t i) const { return data()[i]; }
  std::span<T> span() { return {data(), static_cast<std::size_t>(size_)}; }
  std::span<const T> span() const { return {data(), static_cast<std::size_t>(size_)}; }

  // The tensor as a matrix [prod(leading dims), last dim] ([T, 0] stays T rows of nothing); a
  // rank-1 tensor is one row (none when empty).
  MatrixView<T> matrix() { return {data(), leading(), last()}; }
  ConstMatrixView<T> matrix() const { return {data(), leading(), last()}; }
  // Matrix i of a rank-3 tensor [n, rows, cols] (an expert's weight in [E, d, G]).
  MatrixView<T> slice(index_t i) { return slice_impl<T>(data(), i); }
  ConstMatrixView<T> slice(index_t i) const { return slice_impl<const T>(data(), i); }

 private:
  struct AlignedDelete {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t{alignment}); }
  };
  index_t last() const { return shape_.empty() ? 1 : shape_.back(); }
  index_t leading() const {
    if (rank() < 2) return size_ == 0 ? 0 : 1;
    index_t rows = 1;
    for (std::size_t i = 0; i + 1 < shape_.size(); ++i) rows *= shape_[i];
    return rows;
  }
  template <class U>
  MatrixView<U> slice_impl(U* base, index_t i) const {
    if (rank() != 3) fail("Tensor::slice: needs a rank-3 tensor, got rank ", rank());
    if (i < 0 || i >= shape_[0]) fail("Tensor::slice: index must be in [0, ", shape_[0], "), got ", i);
    return {base + i * shape_[1] * shape_[2], shape_[1], shape_[2]};
  }

  std::unique_ptr<T[], AlignedDelete> buffer_;
  std::vector<index_t> shape_{0};  // a default tensor is empty: rank 1, size 0
  index_t size_ = 0;
  index_t capacity_ = 0;
};

}  // namespace smoe
