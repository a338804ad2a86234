// smoe/interop/dlpack.hpp without any framework: views of hand-built DLTensors (zero copy, the
// collapse of leading dimensions, strided rows, byte offsets), every refused device, dtype, shape,
// stride and pointer, and the ownership rules of DLManagedTensor in both directions.
// The round trip through libtorch's at::toDLPack / at::fromDLPack is in test_torch.cpp.
#include <smoe/interop/dlpack.hpp>

#include <cstdint>
#include <memory>
#include <vector>

#include "catch.hpp"

using namespace smoe;

namespace {

// A DLTensor over `data` with the given shape and strides (empty strides: null, compact).
struct HandMade {
  std::vector<std::int64_t> shape, strides;
  DLTensor t{};
  HandMade(void* data, std::vector<std::int64_t> sh, std::vector<std::int64_t> st = {},
           DLDataType dtype = {kDLFloat, 32, 1}, DLDevice device = {kDLCPU, 0})
      : shape(std::move(sh)), strides(std::move(st)) {
    t.data = data;
    t.device = device;
    t.ndim = static_cast<std::int32_t>(shape.size());
    t.dtype = dtype;
    t.shape = shape.data();
    t.strides = strides.empty() ? nullptr : strides.data();
    t.byte_offset = 0;
  }
};

std::vector<float> iota(std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = float(i);
  return v;
}

}  // namespace

TEST_CASE("from_dlpack views the producer's memory without a copy", "[dlpack]") {
  auto buf = iota(24);
  SECTION("compact 2-D, null strides") {
    HandMade h(buf.data(), {4, 6});
    const MatrixView<float> v = from_dlpack<float>(h.t, "x");
    CHECK(v.data == buf.data());
    CHECK((v.rows == 4 && v.cols == 6 && v.stride == 6));
    v(2, 3) = -1.0f;  // a write through the view is the producer's
    CHECK(buf[2 * 6 + 3] == -1.0f);
  }
  SECTION("rank 3 collapses its leading dimensions") {
    HandMade h(buf.data(), {2, 3, 4}, {12, 4, 1});
    const auto v = from_dlpack<const float>(h.t);
    CHECK((v.rows == 6 && v.cols == 4 && v.stride == 4));
    CHECK(v(5, 3) == 23.0f);
  }
  SECTION("strided rows (a column slice) and a byte offset") {
    HandMade h(buf.data(), {3, 5}, {8, 1});
    h.t.byte_offset = 2 * sizeof(float);
    const auto v = from_dlpack<float>(h.t);
    CHECK((v.rows == 3 && v.cols == 5 && v.stride == 8));
    CHECK(v(0, 0) == 2.0f);
    CHECK(v(2, 4) == float(2 + 2 * 8 + 4));
  }
  SECTION("rank 1 is one row, rank 0 one element, a size-1 dimension any stride") {
    HandMade r1(buf.data(), {7});
    const auto v1 = from_dlpack<float>(r1.t);
    CHECK((v1.rows == 1 && v1.cols == 7));
    HandMade r0(buf.data(), {});
    const auto v0 = from_dlpack<float>(r0.t);
    CHECK((v0.rows == 1 && v0.cols == 1 && v0(0, 0) == 0.0f));
    HandMade ones(buf.data(), {1, 3, 1, 4}, {999, 4, 7, 1});
    const auto v = from_dlpack<float>(ones.t);
    CHECK((v.rows == 3 && v.cols == 4 && v.stride == 4 && v(2, 1) == 9.0f));
  }
  SECTION("empty tensors may have null data") {
    HandMade h(nullptr, {0, 5});
    const auto v = from_dlpack<float>(h.t);
    CHECK((v.rows == 0 && v.cols == 5 && v.empty()));
  }
  SECTION("integer and double dtypes") {
    std::vector<std::int32_t> ids{1, 2, 3, 4};
    HandMade h(ids.data(), {2, 2}, {}, {kDLInt, 32, 1});
    CHECK(from_dlpack<std::int32_t>(h.t)(1, 0) == 3);
    std::vector<double> d{0.5, 1.5};
    HandMade hd(d.data(), {2}, {}, {kDLFloat, 64, 1});
    CHECK(from_dlpack<double>(hd.t)(0, 1) == 1.5);
  }
}

TEST_CASE("from_dlpack refuses what it cannot view, naming the argument", "[dlpack][errors]") {
  auto buf = iota(64);
  using Catch::Contains;
  SECTION("device") {
    HandMade h(buf.data(), {2, 2}, {}, {kDLFloat, 32, 1}, {kDLCUDA, 1});
    REQUIRE_THROWS_WITH(from_dlpack<float>(h.t, "x"),
                        Contains("from_dlpack: x device must be cpu (kDLCPU or kDLCUDAHost), got cuda:1"));
    HandMade host(buf.data(), {2, 2});
    REQUIRE_THROWS_WITH((from_dlpack<float, smoe::cuda>(host.t, "x")),
                        Contains("x device must be cuda (kDLCUDA or kDLCUDAManaged), got cpu:0"));
  }
  SECTION("dtype") {
    HandMade h(buf.data(), {2, 2}, {}, {kDLFloat, 64, 1});
    REQUIRE_THROWS_WITH(from_dlpack<float>(h.t, "x"), Contains("x dtype must be float32, got float64"));
    HandMade half(buf.data(), {2, 2}, {}, {kDLBfloat, 16, 1});
    REQUIRE_THROWS_WITH(from_dlpack<float>(half.t, "w"), Contains("w dtype must be float32, got bfloat16"));
    HandMade lanes(buf.data(), {2, 2}, {}, {kDLFloat, 32, 4});
    REQUIRE_THROWS_WITH(from_dlpack<float>(lanes.t, "x"), Contains("got float32x4"));
  }
  SECTION("shape") {
    HandMade h(buf.data(), {2, -3});
    REQUIRE_THROWS_WITH(from_dlpack<float>(h.t, "x"), Contains("x shape must be >= 0 in every dimension, got [2, -3]"));
  }
  SECTION("strides") {
    HandMade transposed(buf.data(), {4, 3}, {1, 4});
    REQUIRE_THROWS_WITH(from_dlpack<float>(transposed.t, "x"),
                        Contains("x last dimension must be contiguous (stride 1), got strides [1, 4] for shape [4, 3]"));
    HandMade gaps(buf.data(), {2, 3, 4}, {16, 4, 1});  // the outer dimension skips rows
    REQUIRE_THROWS_WITH(from_dlpack<float>(gaps.t, "x"),
                        Contains("x leading dimensions must collapse into one row stride (as a reshape to [6, 4] "
                                 "without a copy), got strides [16, 4, 1] for shape [2, 3, 4]"));
    HandMade overlap(buf.data(), {4, 3}, {2, 1});
    REQUIRE_THROWS_WITH(from_dlpack<float>(overlap.t, "x"), Contains("x rows overlap: row stride 2 < 3 columns"));
    HandMade negative(buf.data(), {4, 3}, {-3, 1});
    REQUIRE_THROWS_WITH(from_dlpack<float>(negative.t, "x"), Contains("x strides must be >= 0, got [-3, 1]"));
  }
  SECTION("pointer") {
    HandMade null(nullptr, {2, 2});
    REQUIRE_THROWS_WITH(from_dlpack<float>(null.t, "x"), Contains("x has null data for shape [2, 2]"));
    HandMade misaligned(buf.data(), {2, 2});
    misaligned.t.byte_offset = 2;
    REQUIRE_THROWS_WITH(from_dlpack<float>(misaligned.t, "x"),
                        Contains("x data (plus byte_offset 2) must be aligned to 4 bytes for float32"));
    REQUIRE_THROWS_WITH(from_dlpack<float>(static_cast<DLManagedTensor*>(nullptr), "x"),
                        Contains("x must be a DLManagedTensor, got null"));
  }
}

namespace {
// A producer's DLManagedTensor that counts its deleter's calls.
struct CountingProducer {
  HandMade h;
  DLManagedTensor managed{};
  int deleted = 0;
  CountingProducer(void* data, std::vector<std::int64_t> shape, DLDataType dtype)
      : h(data, std::move(shape), {}, dtype) {
    managed.dl_tensor = h.t;
    managed.manager_ctx = this;
    managed.deleter = [](DLManagedTensor* self) { ++static_cast<CountingProducer*>(self->manager_ctx)->deleted; };
  }
};
}  // namespace

TEST_CASE("DLManagedTensor ownership: released once by DLPackView, untouched on an error", "[dlpack]") {
  auto buf = iota(6);
  SECTION("the view releases the producer's tensor exactly once, after moves") {
    CountingProducer p(buf.data(), {2, 3}, {kDLFloat, 32, 1});
    {
      DLPackView<float> a = from_dlpack<float>(&p.managed, "x");
      CHECK(a.view().data == buf.data());
      DLPackView<float> b = std::move(a);
      CHECK(b.view()(1, 2) == 5.0f);
      CHECK(p.deleted == 0);
    }
    CHECK(p.deleted == 1);
  }
  SECTION("a refused tensor stays the caller's") {
    CountingProducer p(buf.data(), {2, 3}, {kDLFloat, 64, 1});
    REQUIRE_THROWS_WITH(from_dlpack<float>(&p.managed, "x"), Catch::Contains("x dtype must be float32, got float64"));
    CHECK(p.deleted == 0);
  }
}

TEST_CASE("to_dlpack exports smoe memory and keeps it alive until the consumer's deleter", "[dlpack]") {
  SECTION("an owned tensor: shape, compact strides, dtype; the data pointer survives the move") {
    Tensor<double> t({2, 3, 4});
    for (index_t i = 0; i < t.size(); ++i) t[i] = double(i) / 4;
    const double* data = t.data();
    DLManagedTensor* m = to_dlpack(std::move(t));
    const DLTensor& dl = m->dl_tensor;
    CHECK(dl.data == data);
    CHECK((dl.ndim == 3 && dl.shape[0] == 2 && dl.shape[1] == 3 && dl.shape[2] == 4));
    CHECK((dl.strides[0] == 12 && dl.strides[1] == 4 && dl.strides[2] == 1));
    CHECK((dl.dtype.code == kDLFloat && dl.dtype.bits == 64 && dl.dtype.lanes == 1));
    CHECK(dl.device.device_type == kDLCPU);
    DLPackView<double> back = from_dlpack<double>(m, "round trip");  // now owns m; frees the tensor at scope end
    CHECK((back.view().data == data && back.view().rows == 6 && back.view()(5, 3) == 23.0 / 4));
  }
  SECTION("a view of memory a shared_ptr owns: held until the deleter runs") {
    auto owner = std::make_shared<Tensor<float>>(Tensor<float>({3, 8}));
    owner->fill(2.0f);
    const std::weak_ptr<Tensor<float>> watch = owner;
    const MatrixView<float> columns(owner->data() + 1, 3, 5, 8);
    DLManagedTensor* m = to_dlpack(columns, owner);
    owner.reset();
    CHECK(!watch.expired());  // the export keeps the tensor alive
    CHECK((m->dl_tensor.strides[0] == 8 && m->dl_tensor.strides[1] == 1 && m->dl_tensor.shape[1] == 5));
    CHECK(static_cast<float*>(m->dl_tensor.data)[0] == 2.0f);
    m->deleter(m);
    CHECK(watch.expired());
    REQUIRE_THROWS_WITH(to_dlpack(columns, nullptr),
                        Catch::Contains("to_dlpack: keep_alive must own the viewed memory, got an empty shared_ptr"));
  }
}
