#pragma once
// Tensor<T, cuda>: an owning device tensor with a row-major shape, allocated in stream order on
// its stream. Like the host Tensor, resizing keeps the allocation when it is large enough, so a
// layer's per-step buffers do not reallocate in steady state. Moving between memory spaces is
// explicit: to_device / to_host / copy (to_host synchronizes the stream, nothing else does).
#include <initializer_list>
#include <span>
#include <utility>
#include <vector>

#include "smoe/core/tensor.hpp"
#include "smoe/cuda/execution.cuh"
#include "smoe/cuda/numeric.cuh"

namespace smoe {

template <class T>
class Tensor<T, cuda> {
 public:
  using space = cuda;

  Tensor() = default;
  explicit Tensor(std::vector<index_t> shape, cuda_stream stream = {}) : stream_(stream) { resize(std::move(shape)); }
  Tensor(std::initializer_list<index_t> shape) : Tensor(std::vector<index_t>(shape)) {}
  Tensor(const Tensor& o) : Tensor(o.shape_, o.stream_) { copy_from(o); }
  Tensor& operator=(const Tensor& o) {
    if (this != &o) {
      resize(o.shape_);
      copy_from(o);
    }
    return *this;
  }
  Tensor(Tensor&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), shape_(std::move(o.shape_)), size_(std::exchange(o.size_, 0)),
        capacity_(std::exchange(o.capacity_, 0)), stream_(o.stream_) {
    o.shape_ = {0};
  }
  Tensor& operator=(Tensor&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      shape_ = std::exchange(o.shape_, {0});
      size_ = std::exchange(o.size_, 0);
      capacity_ = std::exchange(o.capacity_, 0);
      stream_ = o.stream_;
    }
    return *this;
  }
  ~Tensor() { release(); }

  // New shape; contents are unspecified unless the size is unchanged. Never shrinks the buffer.
  void resize(std::vector<index_t> shape) {
    index_t n = 1;
    for (index_t d : shape) {
      if (d < 0) fail("Tensor<cuda>: negative dimension ", d);
      n *= d;
    }
    if (n > capacity_) {
      release();
      data_ = static_cast<T*>(cuda_kernels::allocate_bytes(static_cast<std::size_t>(n) * sizeof(T), stream_));
      capacity_ = n;
    }
    shape_ = std::move(shape);
    size_ = n;
  }
  void resize(std::initializer_list<index_t> shape) { resize(std::vector<index_t>(shape)); }
  void fill(T v) { cuda_kernels::fill(data_, size_, v, stream_); }
  void zero() { fill(from_acc<T>(0)); }

  // The stream this tensor allocates, fills and frees on.
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) { stream_ = s; }

  T* data() { return data_; }
  const T* data() const { return data_; }
  index_t size() const { return size_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  const std::vector<index_t>& shape() const { return shape_; }
  index_t dim(int i) const { return shape_.at(static_cast<std::size_t>(i)); }

  // As the host Tensor: [prod(leading dims), last dim]; slice(i) of a rank-3 tensor.
  MatrixView<T, cuda> matrix() { return {data_, leading(), last()}; }
  ConstMatrixView<T, cuda> matrix() const { return {data_, leading(), last()}; }
  MatrixView<T, cuda> slice(index_t i) { return slice_impl<T>(data_, i); }
  ConstMatrixView<T, cuda> slice(index_t i) const { return slice_impl<const T>(data_, i); }

 private:
  void release() noexcept {
    cuda_kernels::free_bytes(data_, stream_);
    data_ = nullptr;
    capacity_ = 0;
  }
  void copy_from(const Tensor& o) { cuda_kernels::copy_bytes(data_, o.data_, sizeof(T) * size_, stream_); }
  index_t last() const { return shape_.empty() ? 1 : shape_.back(); }
  index_t leading() const {
    if (rank() < 2) return size_ == 0 ? 0 : 1;
    index_t rows = 1;
    for (std::size_t i = 0; i + 1 < shape_.size(); ++i) rows *= shape_[i];
    return rows;
  }
  template <class U>
  MatrixView<U, cuda> slice_impl(U* base, index_t i) const {
    if (rank() != 3) fail("Tensor<cuda>::slice: needs a rank-3 tensor, got rank ", rank());
    if (i < 0 || i >= shape_[0]) fail("Tensor<cuda>::slice: index must be in [0, ", shape_[0], "), got ", i);
    return {base + i * shape_[1] * shape_[2], shape_[1], shape_[2]};
  }

  T* data_ = nullptr;
  std::vector<index_t> shape_{0};
  index_t size_ = 0;
  index_t capacity_ = 0;
  cuda_stream stream_{};
};

template <class T>
using DeviceTensor = Tensor<T, cuda>;

// Host → device, converting each element to D (e.g. float weights into a bf16 layer).
template <class D = void, class S>
auto to_device(const Tensor<S>& host, cuda_stream stream = {}) {
  using T = std::conditional_t<std::is_void_v<D>, S, D>;
  Tensor<T, cuda> out(host.shape(), stream);
  copy(host, out);
  return out;
}

// host → device into an existing tensor (resized to the host shape), converting to T.
template <class S, class T>
void copy(const Tensor<S>& host, Tensor<T, cuda>& device) {
  device.resize(host.shape());
  if constexpr (std::is_same_v<S, T>) {
    cuda_kernels::copy_bytes(device.data(), host.data(), sizeof(T) * host.size(), device.stream());
  } else {
    std::vector<T> converted(static_cast<std::size_t>(host.size()));
    for (index_t i = 0; i < host.size(); ++i) converted[i] = from_acc<T>(static_cast<acc_t<T>>(to_acc(host[i])));
    cuda_kernels::copy_bytes(device.data(), converted.data(), sizeof(T) * host.size(), device.stream());
    synchronize(device.stream());  // `converted` must outlive the copy
  }
}

// Device → host, converting each element to D; synchronizes the tensor's stream.
template <class D = void, class T>
auto to_host(const Tensor<T, cuda>& device) {
  using H = std::conditional_t<std::is_void_v<D>, T, D>;
  Tensor<T> raw(device.shape());
  cuda_kernels::copy_bytes(raw.data(), device.data(), sizeof(T) * device.size(), device.stream());
  synchronize(device.stream());
  if constexpr (std::is_same_v<H, T>) {
    return raw;
  } else {
    Tensor<H> out(device.shape());
    for (index_t i = 0; i < raw.size(); ++i) out[i] = static_cast<H>(to_acc(raw[i]));
    return out;
  }
}

}  // namespace smoe
