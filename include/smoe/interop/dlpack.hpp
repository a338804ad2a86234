#pragma once
// DLPack interop (https://dmlc.github.io/dlpack/, v0.6, Debian's libdlpack-dev): zero-copy views of
// other frameworks' tensors, and smoe tensors exported to them.
//
//   from_dlpack<T>(const DLTensor&, name)   → MatrixView<T, Space>: the tensor's memory, no copy
//   from_dlpack<T>(DLManagedTensor*, name)  → DLPackView<T, Space>: the view plus the producer's
//                                              tensor, released (deleter called) when it is destroyed
//   to_dlpack(Tensor<T>&&)                  → DLManagedTensor* owning the tensor (freed by the deleter)
//   to_dlpack(MatrixView<T>, keep_alive)    → DLManagedTensor* viewing memory that `keep_alive`
//                                              (any shared_ptr) holds until the consumer calls the deleter
//
// smoe's views are row-major matrices [rows, cols] with a row stride, so a DLPack tensor of rank
// n >= 2 is viewed as [prod(shape[0..n-2]), shape[n-1]]: its last dimension must be contiguous
// (stride 1) and its leading dimensions must collapse into one row stride (as torch's .view would
// allow). Rank 1 is one row (none when empty), as Tensor::matrix() reads it; rank 0 is [1, 1].
// Checked before anything else happens, each with an smoe::error naming the argument: device (kDLCPU
// or kDLCUDAHost for host views, kDLCUDA or kDLCUDAManaged for smoe::cuda views), dtype (float32,
// float64, int32, int64 for T = float, double, std::int32_t, std::int64_t; one lane), negative or
// overlapping strides, a null pointer for a non-empty tensor, and the alignment of T.
//
// torch 1.13 bundles its own copy of this header (ATen/dlpack.h); both are DLPack v0.6 with the
// same include guard (DLPACK_DLPACK_H_), so a translation unit may include both in either order.
#include <dlpack/dlpack.h>

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "smoe/core/tensor.hpp"
#include "smoe/core/view.hpp"

namespace smoe {

// The DLPack dtype of a scalar type smoe stores.
template <class T>
constexpr DLDataType dlpack_dtype() {
  using U = std::remove_const_t<T>;
  if constexpr (std::is_same_v<U, float>) return {kDLFloat, 32, 1};
  else if constexpr (std::is_same_v<U, double>) return {kDLFloat, 64, 1};
  else if constexpr (std::is_same_v<U, std::int32_t>) return {kDLInt, 32, 1};
  else if constexpr (std::is_same_v<U, std::int64_t>) return {kDLInt, 64, 1};
  else static_assert(sizeof(U) == 0, "dlpack_dtype<T>: T must be float, double, std::int32_t or std::int64_t");
}

// "float32", "int64", "bfloat16", ... (with "xN" for N lanes), for error messages.
inline std::string dlpack_dtype_name(DLDataType t) {
  const char* kind = t.code == kDLFloat ? "float"
                     : t.code == kDLInt ? "int"
                     : t.code == kDLUInt ? "uint"
                     : t.code == kDLBfloat ? "bfloat"
                     : t.code == kDLComplex ? "complex"
                     : nullptr;
  // Appended piece by piece: GCC 12 warns falsely (-Wrestrict) on `"x" + std::string`.
  std::string s;
  if (kind) {
    s.append(kind).append(std::to_string(t.bits));
  } else {
    s.append("dtype code ").append(std::to_string(t.code)).append(" with ").append(std::to_string(t.bits)).append(" bits");
  }
  if (t.lanes != 1) s.append("x").append(std::to_string(t.lanes));
  return s;
}

inline std::string dlpack_device_name(DLDevice d) {
  const char* kind = d.device_type == kDLCPU ? "cpu"
                     : d.device_type == kDLCUDA ? "cuda"
                     : d.device_type == kDLCUDAHost ? "cuda_host"
                     : d.device_type == kDLCUDAManaged ? "cuda_managed"
                     : d.device_type == kDLROCM ? "rocm"
                     : d.device_type == kDLMetal ? "metal"
                     : d.device_type == kDLVulkan ? "vulkan"
                     : d.device_type == kDLOpenCL ? "opencl"
                     : nullptr;
  std::string s;
  if (kind) s.append(kind);
  else s.append("device type ").append(std::to_string(int(d.device_type)));
  return s.append(":").append(std::to_string(d.device_id));
}

namespace detail {

// Where a view of `Space` may point: host views read host-accessible memory (pinned host memory
// included), device views device memory (managed memory included).
template <class Space>
bool dlpack_device_fits(DLDevice d) {
  if constexpr (std::is_same_v<Space, cpu>) return d.device_type == kDLCPU || d.device_type == kDLCUDAHost;
  else return d.device_type == kDLCUDA || d.device_type == kDLCUDAManaged;
}

template <class Space>
const char* dlpack_expected_devices() {
  if constexpr (std::is_same_v<Space, cpu>) return "cpu (kDLCPU or kDLCUDAHost)";
  else return "cuda (kDLCUDA or kDLCUDAManaged)";
}

inline std::string dlpack_shape_string(const DLTensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s.append(i ? ", " : "").append(std::to_string(t.shape[i]));
  return s.append("]");
}

inline std::string dlpack_strides_string(const DLTensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s.append(i ? ", " : "").append(std::to_string(t.strides[i]));
  return s.append("]");
}

// One exported smoe tensor: the DLManagedTensor, its shape and strides, and what keeps the memory alive.
struct DLPackExport {
  DLManagedTensor managed{};
  std::vector<std::int64_t> shape, strides;
  std::shared_ptr<void> owner;

  static void deleter(DLManagedTensor* self) { delete static_cast<DLPackExport*>(self->manager_ctx); }
};

template <class T>
DLManagedTensor* export_dlpack(T* data, std::vector<std::int64_t> shape, std::vector<std::int64_t> strides,
                               std::shared_ptr<void> owner) {
  auto e = std::make_unique<DLPackExport>();
  e->shape = std::move(shape);
  e->strides = std::move(strides);
  e->owner = std::move(owner);
  DLTensor& t = e->managed.dl_tensor;
  t.data = const_cast<std::remove_const_t<T>*>(data);  // DLPack has no const; the consumer promises
  t.device = {kDLCPU, 0};
  t.ndim = static_cast<std::int32_t>(e->shape.size());
  t.dtype = dlpack_dtype<T>();
  t.shape = e->shape.data();
  t.strides = e->strides.data();
  t.byte_offset = 0;
  e->managed.manager_ctx = e.get();
  e->managed.deleter = &DLPackExport::deleter;
  return &e.release()->managed;
}

}  // namespace detail

// A view of a DLPack tensor's memory (no copy), [rows, cols] as described at the top of this file.
// `name` is the argument's name in error messages.
template <class T, class Space = cpu>
MatrixView<T, Space> from_dlpack(const DLTensor& t, const char* name = "tensor") {
  constexpr const char* context = "from_dlpack";
  if (!detail::dlpack_device_fits<Space>(t.device))
    fail(context, ": ", name, " device must be ", detail::dlpack_expected_devices<Space>(), ", got ",
         dlpack_device_name(t.device));
  const DLDataType want = dlpack_dtype<T>();
  if (t.dtype.code != want.code || t.dtype.bits != want.bits || t.dtype.lanes != want.lanes)
    fail(context, ": ", name, " dtype must be ", dlpack_dtype_name(want), ", got ", dlpack_dtype_name(t.dtype));
  if (t.ndim < 0) fail(context, ": ", name, " ndim must be >= 0, got ", t.ndim);
  if (t.ndim > 0 && t.shape == nullptr) fail(context, ": ", name, " has ndim ", t.ndim, " but a null shape");
  index_t size = 1;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] < 0) fail(context, ": ", name, " shape must be >= 0 in every dimension, got ", detail::dlpack_shape_string(t));
    size *= t.shape[i];
  }
  const index_t cols = t.ndim == 0 ? 1 : t.shape[t.ndim - 1];
  const index_t rows = t.ndim <= 1 ? (size == 0 ? 0 : 1) : (cols == 0 ? size : size / cols);
  // Strides in elements; null means compact row-major. A dimension of size 1 may have any stride.
  index_t row_stride = cols;
  if (t.strides != nullptr && t.ndim > 0 && size > 0) {
    for (int i = 0; i < t.ndim; ++i)
      if (t.strides[i] < 0 && t.shape[i] > 1)
        fail(context, ": ", name, " strides must be >= 0, got ", detail::dlpack_strides_string(t));
    if (cols > 1 && t.strides[t.ndim - 1] != 1)
      fail(context, ": ", name, " last dimension must be contiguous (stride 1), got strides ",
           detail::dlpack_strides_string(t), " for shape ", detail::dlpack_shape_string(t));
    // The leading dimensions collapse to rows with one stride: walk inwards, the innermost leading
    // dimension of size > 1 gives the row stride and each outer one must be compact over it.
    index_t expected = -1;  // the stride dimension i must have (−1: the first one > 1 sets it)
    index_t inner = 1;      // rows covered by the dimensions inside i
    for (int i = t.ndim - 2; i >= 0; --i) {
      if (t.shape[i] == 1) continue;
      if (expected < 0) {
        row_stride = t.strides[i];
        expected = row_stride;
      }
      if (t.strides[i] != expected * inner)
        fail(context, ": ", name, " leading dimensions must collapse into one row stride (as a reshape to [",
             rows, ", ", cols, "] without a copy), got strides ", detail::dlpack_strides_string(t), " for shape ",
             detail::dlpack_shape_string(t));
      inner *= t.shape[i];
    }
    if (rows > 1 && row_stride < cols)
      fail(context, ": ", name, " rows overlap: row stride ", row_stride, " < ", cols, " columns (strides ",
           detail::dlpack_strides_string(t), ")");
  }
  if (rows <= 1) row_stride = cols;
  if (size > 0 && t.data == nullptr) fail(context, ": ", name, " has null data for shape ", detail::dlpack_shape_string(t));
  auto* base = static_cast<unsigned char*>(t.data) + t.byte_offset;
  if (reinterpret_cast<std::uintptr_t>(base) % alignof(T) != 0)
    fail(context, ": ", name, " data (plus byte_offset ", t.byte_offset, ") must be aligned to ", alignof(T),
         " bytes for ", dlpack_dtype_name(want));
  return MatrixView<T, Space>(size == 0 ? nullptr : reinterpret_cast<T*>(base), rows, cols, row_stride);
}

// A DLManagedTensor viewed as a matrix: the view, and the producer's tensor, whose deleter runs
// when this object is destroyed (move-only).
template <class T, class Space = cpu>
class DLPackView {
 public:
  DLPackView() = default;
  DLPackView(DLManagedTensor* managed, MatrixView<T, Space> view) : managed_(managed), view_(view) {}
  DLPackView(DLPackView&& o) noexcept : managed_(std::exchange(o.managed_, nullptr)), view_(o.view_) {}
  DLPackView& operator=(DLPackView&& o) noexcept {
    if (this != &o) {
      release();
      managed_ = std::exchange(o.managed_, nullptr);
      view_ = o.view_;
    }
    return *this;
  }
  DLPackView(const DLPackView&) = delete;
  DLPackView& operator=(const DLPackView&) = delete;
  ~DLPackView() { release(); }

  MatrixView<T, Space> view() const { return view_; }
  const DLTensor& dl_tensor() const { return managed_->dl_tensor; }

 private:
  void release() {
    if (managed_ && managed_->deleter) managed_->deleter(managed_);
    managed_ = nullptr;
  }
  DLManagedTensor* managed_ = nullptr;
  MatrixView<T, Space> view_{};
};

// Takes ownership of `managed` once its checks pass; on an error nothing is taken (the caller still
// owns it and must call its deleter), as with every smoe check, nothing changes before it.
template <class T, class Space = cpu>
DLPackView<T, Space> from_dlpack(DLManagedTensor* managed, const char* name = "tensor") {
  if (managed == nullptr) fail("from_dlpack: ", name, " must be a DLManagedTensor, got null");
  const MatrixView<T, Space> view = from_dlpack<T, Space>(managed->dl_tensor, name);
  return DLPackView<T, Space>(managed, view);
}

// Exports a host tensor, moved into the DLManagedTensor (its shape, compact strides); the deleter
// frees it. Consumers such as at::fromDLPack call the deleter when they are done.
template <class T>
DLManagedTensor* to_dlpack(Tensor<T>&& tensor) {
  auto owned = std::make_shared<Tensor<T>>(std::move(tensor));
  std::vector<std::int64_t> shape(owned->shape().begin(), owned->shape().end()), strides(shape.size());
  std::int64_t s = 1;
  for (std::size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= shape[i];
  }
  T* data = owned->data();
  return detail::export_dlpack(data, std::move(shape), std::move(strides), std::move(owned));
}

// Exports a host view [rows, cols] (strides [stride, 1]) of memory that `keep_alive` owns: the
// DLManagedTensor holds that shared_ptr until its deleter runs, so the memory outlives the consumer's
// use (a layer's parameter: pass the shared_ptr that owns the layer).
template <class T>
DLManagedTensor* to_dlpack(MatrixView<T> view, std::shared_ptr<void> keep_alive) {
  if (!keep_alive) fail("to_dlpack: keep_alive must own the viewed memory, got an empty shared_ptr");
  return detail::export_dlpack(view.data, {view.rows, view.cols}, {view.stride, 1}, std::move(keep_alive));
}

}  // namespace smoe
