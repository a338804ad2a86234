#pragma once
// Moving a component's parameters between memory spaces by name: a CPU layer initialized (or
// loaded from a checkpoint) on the host is copied into its CUDA twin, converting dtypes (e.g. fp32
// host weights into a bf16 device layer), and device gradients are read back the same way. Names
// and shapes must match one to one.
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/device_tensor.cuh"

namespace smoe {

// f(name, host_parameter, device_parameter) for every pair of parameters with the same name;
// throws smoe::error when the two components' names or shapes differ.
template <class Host, class Device, class F>
void for_each_parameter_pair(Host& host, Device& device, F&& f) {
  const char* ctx = "for_each_parameter_pair";
  index_t host_count = 0, device_count = 0;
  host.for_each_parameter([&](std::string_view, auto&) { ++host_count; });
  device.for_each_parameter([&](std::string_view name, auto& dp) {
    ++device_count;
    bool matched = false;
    host.for_each_parameter([&](std::string_view host_name, auto& hp) {
      if (host_name != name) return;
      matched = true;
      if (hp.value.shape() != dp.value.shape()) fail(ctx, ": parameter ", name, " has different shapes on the two sides");
      f(name, hp, dp);
    });
    if (!matched) fail(ctx, ": the host component has no parameter ", name);
  });
  expect_equal(ctx, "parameter count of the host component (= the device component's)", device_count, host_count);
}

// device.<name>.value = host.<name>.value for every parameter (gradients untouched).
template <class Host, class Device>
void copy_parameters_to_device(Host& host, Device& device) {
  for_each_parameter_pair(host, device, [](std::string_view, auto& hp, auto& dp) { copy(hp.value, dp.value); });
}

}  // namespace smoe
