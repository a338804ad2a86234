#pragma once
// Training checkpoints: one safetensors file with everything a run needs to resume bit-identically.
//
//   <name>               every parameter value and every buffer (for_each_buffer, see
//                        core/buffer.hpp) under the model's own names, e.g. "moe.router.weight",
//                        in the scalar type of the model (F32 or F64); gradients are not saved
//   optim.m.<name>       AdamW first moment of parameter <name>, its shape and type
//   optim.v.<name>       AdamW second moment
//   optim.step           AdamW step count t, an I64 scalar (shape [])
//   __metadata__         "format": "smoe.checkpoint", "format_version": "1",
//                        "counter.<key>": decimal uint64 (the caller's named training counters:
//                        training step, data position, router step counters, ...),
//                        "optimizer": "AdamW" and "optim.lr", "optim.beta1", "optim.beta2",
//                        "optim.eps", "optim.weight_decay" (informational: the hyperparameters
//                        come from the caller's AdamWConfig and schedule, never from the file)
// Counters live in the metadata because they are uint64 (an I64 tensor would halve the range);
// metadata values are strings, so they are written in decimal and parsed strictly.
//
// Saving writes the whole file to "<path>.tmp", flushes it (fsync on POSIX), then renames it over
// <path>: a crash leaves either the previous checkpoint or the new one under the final name, never
// a partial file. Two processes must not save to the same path at once.
//
// Loading is transactional. The file is read into memory and validated entirely first: a
// well-formed, untruncated safetensors header (SafetensorsFile), every expected tensor present
// with exactly the expected dtype and shape, every requested counter present and a valid uint64,
// and no unexpected tensor or counter unless LoadOptions::allow_extra. Any problem throws
// smoe::error naming the file and the tensor or counter (with expected vs actual dtype and shape)
// and leaves the model, the optimizer and the counters untouched. Only then does the commit copy
// the data into the parameters and buffers, swap in the optimizer state and set the counters; the
// commit cannot fail. Gradients are left as they are.
//
//   io::Counters counters{{"step", step}, {"data_position", pos}, {"router_step", moe.router().step()}};
//   io::save_checkpoint("run.safetensors", model, optimizer, counters);
//   ...
//   io::load_checkpoint("run.safetensors", model, optimizer, counters);  // keys say what to read
//   moe.router().set_step(counters.at("router_step"));
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#define SMOE_CHECKPOINT_HAS_FSYNC 1
#endif

#include "smoe/core/buffer.hpp"
#include "smoe/core/error.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/io/safetensors.hpp"
#include "smoe/train/adamw.hpp"

namespace smoe::io {

// Named integer training counters stored with a checkpoint.
using Counters = std::map<std::string, std::uint64_t, std::less<>>;

struct LoadOptions {
  // Ignore tensors and counters in the file that nothing asked for (e.g. load the weights of a
  // training checkpoint without its optimizer state). Missing or mismatched ones still throw.
  bool allow_extra = false;
};

inline constexpr std::string_view checkpoint_format = "smoe.checkpoint";
inline constexpr std::string_view checkpoint_format_version = "1";

namespace detail {

struct NoOptimizer {};

// What a load stages for the optimizer before it commits.
template <class Opt>
struct StagedState {
  using type = typename Opt::StateMap;
};
template <>
struct StagedState<NoOptimizer> {
  using type = int;
};

// One tensor of the model: its name, stored type and shape, and where the loaded bytes go.
struct Slot {
  std::string name;
  const char* kind;  // "parameter" or "buffer"
  Dtype dtype;
  std::vector<index_t> shape;
  void* data;
  std::span<const std::uint8_t> source{};  // the validated bytes in the file, set while loading
};

template <class U>
Slot slot_of(std::string_view name, const char* kind, Tensor<U>& t) {
  static_assert(std::is_floating_point_v<U> && NativeScalar<U>,
                "checkpoints store float and double parameters and buffers");
  return {std::string(name), kind, dtype_of<U>::value, t.shape(), static_cast<void*>(t.data())};
}

inline bool is_reserved(std::string_view name) { return name.starts_with("optim."); }

// The model's parameters, then its buffers, in visiting order; names checked to be unique.
template <HasParameters M>
std::vector<Slot> model_slots(M& model) {
  std::vector<Slot> slots;
  model.for_each_parameter(
      [&](std::string_view name, auto& p) { slots.push_back(slot_of(name, "parameter", p.value)); });
  for_each_buffer_of(model, [&](std::string_view name, auto& t) { slots.push_back(slot_of(name, "buffer", t)); });
  std::map<std::string_view, const char*> seen;
  for (const Slot& s : slots) {
    if (s.name.empty()) fail("the model has a ", s.kind, " with an empty name");
    if (is_reserved(s.name))
      fail("the model's ", s.kind, " '", s.name, "' uses the prefix 'optim.', reserved for optimizer state");
    const auto [it, fresh] = seen.emplace(s.name, s.kind);
    if (!fresh) fail("the model has two tensors named '", s.name, "' (a ", it->second, " and a ", s.kind, ")");
  }
  return slots;
}

inline std::string describe(Dtype dtype, const std::vector<index_t>& shape) {
  return std::string(dtype_name(dtype)) + " " + io::detail::format_shape(shape);
}

inline std::string exact(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

// A counter's value written by save_checkpoint: decimal digits only, at most 2^64 − 1.
inline std::uint64_t parse_counter(std::string_view key, const std::string& text) {
  std::uint64_t v = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, v);
  const bool digits = !text.empty() && std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
  if (!digits || ec != std::errc() || ptr != end)
    fail("counter '", key, "' must be a decimal integer in [0, 2^64), got '", text, "'");
  return v;
}

// Bytes validated to be `count` little-endian U values into dst; cannot fail.
template <class U>
void decode(std::span<const std::uint8_t> src, U* dst) noexcept {
  const std::size_t n = src.size() / sizeof(U);
  for (std::size_t k = 0; k < n; ++k) dst[k] = io::detail::load_le<U>(src.data() + k * sizeof(U));
}

inline void commit(const Slot& s) noexcept {
  if (s.dtype == Dtype::f32)
    decode(s.source, static_cast<float*>(s.data));
  else
    decode(s.source, static_cast<double*>(s.data));
}

// `name` is in the file with exactly this dtype and shape; `what` describes it for the message.
inline std::span<const std::uint8_t> expect_tensor(const SafetensorsFile& file, const std::string& name,
                                                   const std::string& what, Dtype dtype,
                                                   const std::vector<index_t>& shape, const char* hint = "") {
  if (!file.contains(name)) fail("missing tensor '", name, "' (", what, ", expected ", describe(dtype, shape), ")", hint);
  const TensorInfo& info = file.info(name);
  if (info.dtype != dtype)
    fail("tensor '", name, "' (", what, ") dtype must be ", dtype, ", got ", info.dtype, " (shape ",
         io::detail::format_shape(info.shape), ")");
  if (info.shape != shape)
    fail("tensor '", name, "' (", what, ") shape must be ", io::detail::format_shape(shape), ", got ",
         io::detail::format_shape(info.shape));
  return file.raw(name);
}

// Writes `bytes` to path + ".tmp", flushes it to disk, then renames it to path.
inline void write_file_atomically(const std::filesystem::path& path, const std::vector<std::uint8_t>& bytes) {
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  std::FILE* f = std::fopen(tmp.string().c_str(), "wb");
  if (f == nullptr) fail("cannot open '", tmp.string(), "' for writing: ", std::strerror(errno));
  bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size() && std::fflush(f) == 0;
#ifdef SMOE_CHECKPOINT_HAS_FSYNC
  ok = ok && ::fsync(::fileno(f)) == 0;
#endif
  const int saved_errno = errno;
  ok = std::fclose(f) == 0 && ok;
  std::error_code ec;
  if (!ok) {
    std::filesystem::remove(tmp, ec);
    fail("error while writing ", bytes.size(), " bytes to '", tmp.string(), "': ", std::strerror(saved_errno));
  }
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    fail("cannot rename '", tmp.string(), "' to '", path.string(), "': ", ec.message());
  }
}

template <HasParameters M, class Opt>
void save(const std::filesystem::path& path, M& model, const Opt* optimizer, const Counters& counters) {
  const std::vector<Slot> slots = model_slots(model);
  SafetensorsWriter w;
  w.set_metadata("format", std::string(checkpoint_format));
  w.set_metadata("format_version", std::string(checkpoint_format_version));
  model.for_each_parameter([&](std::string_view name, auto& p) { w.add(std::string(name), p.value); });
  for_each_buffer_of(model, [&](std::string_view name, auto& t) { w.add(std::string(name), t); });
  if constexpr (!std::is_same_v<Opt, NoOptimizer>) {
    using T = typename Opt::scalar_type;
    const auto& state = optimizer->state();
    std::set<std::string_view> parameters;
    for (const Slot& s : slots)
      if (s.kind == std::string_view("parameter")) parameters.insert(s.name);
    for (const auto& [name, st] : state)
      if (!parameters.contains(name))
        fail("the optimizer holds state for parameter '", name, "', which the model does not have");
    Tensor<T> zeros;
    for (const char* moment : {"m", "v"}) {
      model.for_each_parameter([&](std::string_view name, auto& p) {
        const auto it = state.find(name);
        const std::string key = std::string("optim.") + moment + "." + std::string(name);
        if (it == state.end()) {
          if (!state.empty()) fail("the optimizer has no state for parameter '", name, "'");
          zeros.resize(p.value.shape());  // no step taken yet: the moments are zero
          zeros.zero();
          w.add(key, zeros);
          return;
        }
        const Tensor<T>& t = moment[0] == 'm' ? it->second.m : it->second.v;
        if (t.shape() != p.value.shape())
          fail("the optimizer state of parameter '", name, "' has shape ", io::detail::format_shape(t.shape()),
               ", the parameter ", io::detail::format_shape(p.value.shape()));
        w.add(key, t);
      });
    }
    if (optimizer->steps() > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
      fail("the optimizer step count ", optimizer->steps(), " does not fit optim.step (I64)");
    Tensor<std::int64_t> step(std::vector<index_t>{});
    step[0] = static_cast<std::int64_t>(optimizer->steps());
    w.add("optim.step", step);
    const AdamWConfig& c = optimizer->config();
    w.set_metadata("optimizer", Opt::name);
    w.set_metadata("optim.lr", exact(c.lr));
    w.set_metadata("optim.beta1", exact(c.beta1));
    w.set_metadata("optim.beta2", exact(c.beta2));
    w.set_metadata("optim.eps", exact(c.eps));
    w.set_metadata("optim.weight_decay", exact(c.weight_decay));
  }
  for (const auto& [key, value] : counters) {
    if (key.empty()) fail("counter names must not be empty");
    w.set_metadata("counter." + key, std::to_string(value));
  }
  write_file_atomically(path, w.bytes());
}

template <HasParameters M, class Opt>
void load(const std::filesystem::path& path, M& model, Opt* optimizer, Counters* counters, LoadOptions options) {
  const SafetensorsFile file = SafetensorsFile::load(path);
  const auto& meta = file.metadata();
  if (const auto it = meta.find("format"); it != meta.end() && it->second != checkpoint_format)
    fail("__metadata__ 'format' must be '", checkpoint_format, "', got '", it->second, "'");
  if (const auto it = meta.find("format_version"); it != meta.end() && it->second != checkpoint_format_version)
    fail("__metadata__ 'format_version' must be '", checkpoint_format_version, "' (the version this library reads), got '",
         it->second, "'");

  // Validate everything and stage what must be allocated; nothing of the caller's changes here.
  std::vector<Slot> slots = model_slots(model);
  std::set<std::string, std::less<>> expected;
  for (Slot& s : slots) {
    s.source = expect_tensor(file, s.name, std::string("the model's ") + s.kind, s.dtype, s.shape);
    expected.insert(s.name);
  }
  [[maybe_unused]] std::uint64_t staged_step = 0;
  [[maybe_unused]] typename StagedState<Opt>::type staged_state{};
  if constexpr (!std::is_same_v<Opt, NoOptimizer>) {
    using T = typename Opt::scalar_type;
    if (const auto it = meta.find("optimizer"); it != meta.end() && it->second != Opt::name)
      fail("the file holds ", it->second, " state, but the optimizer to restore is ", Opt::name);
    const char* hint = "; load without the optimizer to read the weights only";
    for (const Slot& s : slots) {
      if (s.kind != std::string_view("parameter")) continue;
      typename Opt::State st;
      for (const char* moment : {"m", "v"}) {
        const std::string key = std::string("optim.") + moment + "." + s.name;
        const std::string what = std::string(Opt::name) + (moment[0] == 'm' ? " first" : " second") +
                                 " moment of parameter '" + s.name + "'";
        (void)expect_tensor(file, key, what, dtype_of<T>::value, s.shape, hint);
        (moment[0] == 'm' ? st.m : st.v) = file.read<T>(key);
        expected.insert(key);
      }
      staged_state.emplace(s.name, std::move(st));
    }
    (void)expect_tensor(file, "optim.step", std::string(Opt::name) + " step count", Dtype::i64, {}, hint);
    const std::int64_t step = file.read<std::int64_t>("optim.step")[0];
    if (step < 0) fail("tensor 'optim.step' must be >= 0, got ", step);
    staged_step = static_cast<std::uint64_t>(step);
    expected.insert("optim.step");
  }
  if (!options.allow_extra)
    for (const std::string& name : file.names())
      if (!expected.contains(name)) {
        const TensorInfo& i = file.info(name);
        fail("unexpected tensor '", name, "' (", describe(i.dtype, i.shape), "): ",
             is_reserved(name) ? "the file holds optimizer state, but no optimizer was given to restore it"
                               : "the model has no parameter or buffer of that name",
             " (LoadOptions::allow_extra ignores it)");
      }

  std::vector<std::uint64_t> staged_counters;
  if (counters != nullptr)
    for (const auto& [key, value] : *counters) {
      const auto it = meta.find("counter." + key);
      if (it == meta.end()) fail("missing counter '", key, "' (no __metadata__ entry 'counter.", key, "')");
      staged_counters.push_back(parse_counter(key, it->second));
    }
  if (!options.allow_extra)
    for (const auto& [key, value] : meta)
      if (key.starts_with("counter.")) {
        const std::string_view name = std::string_view(key).substr(8);
        if (counters == nullptr || !counters->contains(name))
          fail("unexpected counter '", name, "' = ", value, " (not requested; LoadOptions::allow_extra ignores it)");
      }

  // Commit: copies and moves only.
  for (const Slot& s : slots) commit(s);
  if constexpr (!std::is_same_v<Opt, NoOptimizer>) optimizer->restore(staged_step, std::move(staged_state));
  if (counters != nullptr) {
    std::size_t i = 0;
    for (auto& [key, value] : *counters) value = staged_counters[i++];
  }
}

template <class F>
void with_context(const char* operation, const std::filesystem::path& path, F&& f) {
  try {
    f();
  } catch (const error& e) {
    fail(operation, "('", path.string(), "'): ", e.what());
  }
}

}  // namespace detail

// Saves the parameters and buffers of `model`, the optimizer state and the counters to `path`.
template <HasParameters M, class T>
void save_checkpoint(const std::filesystem::path& path, M& model, const AdamW<T>& optimizer,
                     const Counters& counters = {}) {
  detail::with_context("save_checkpoint", path, [&] { detail::save(path, model, &optimizer, counters); });
}

// Saves the parameters and buffers of `model` and the counters (no optimizer state).
template <HasParameters M>
void save_checkpoint(const std::filesystem::path& path, M& model, const Counters& counters = {}) {
  detail::with_context("save_checkpoint", path,
                       [&] { detail::save(path, model, static_cast<const detail::NoOptimizer*>(nullptr), counters); });
}

// Restores `model`, `optimizer` and the counters named by the keys of `counters` (their values
// are overwritten with the file's). Transactional: on any error nothing changes.
template <HasParameters M, class T>
void load_checkpoint(const std::filesystem::path& path, M& model, AdamW<T>& optimizer, Counters& counters,
                     LoadOptions options = {}) {
  detail::with_context("load_checkpoint", path, [&] { detail::load(path, model, &optimizer, &counters, options); });
}

template <HasParameters M, class T>
void load_checkpoint(const std::filesystem::path& path, M& model, AdamW<T>& optimizer, LoadOptions options = {}) {
  detail::with_context("load_checkpoint", path,
                       [&] { detail::load(path, model, &optimizer, static_cast<Counters*>(nullptr), options); });
}

// Restores `model` (and the requested counters) only; a training checkpoint's optimizer state is
// then unexpected unless options.allow_extra.
template <HasParameters M>
void load_checkpoint(const std::filesystem::path& path, M& model, Counters& counters, LoadOptions options = {}) {
  detail::with_context("load_checkpoint", path, [&] {
    detail::load(path, model, static_cast<detail::NoOptimizer*>(nullptr), &counters, options);
  });
}

template <HasParameters M>
void load_checkpoint(const std::filesystem::path& path, M& model, LoadOptions options = {}) {
  detail::with_context("load_checkpoint", path, [&] {
    detail::load(path, model, static_cast<detail::NoOptimizer*>(nullptr), static_cast<Counters*>(nullptr), options);
  });
}

}  // namespace smoe::io
