#pragma once
// Helpers shared by the translation units of smoe_eval (examples/smoe_eval.cpp, the single-layer
// mode, and examples/smoe_eval_stack*.cpp, the multi-layer mode): SPEC parsing with one-line errors
// that name the key, and checked reads of IN tensors.
#include <smoe/core/error.hpp>
#include <smoe/core/parameter.hpp>
#include <smoe/core/tensor.hpp>
#include <smoe/io/json_reader.hpp>
#include <smoe/io/safetensors.hpp>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace smoe_eval {

using json = nlohmann::json;
using smoe::fail;
using smoe::index_t;

// The whole run of smoe_eval (examples/smoe_eval.cpp): throws smoe::error on bad input and then
// writes nothing. run_main is main's body: usage, one line on stderr and exit status 1 on errors.
void run(const std::string& spec_path, const std::string& in_path, const std::string& out_path);
int run_main(int argc, char** argv);

enum class ActivationKind { relu, gelu, swiglu };
// Where the layers run: the CPU backend, or the CUDA backend (on the GPU in an nvcc build, on the
// host in the emulated build: examples/smoe_eval_cuda.cpp).
enum class BackendKind { cpu, cuda };
inline constexpr std::pair<std::string_view, BackendKind> backend_names[] = {{"cpu", BackendKind::cpu},
                                                                             {"cuda", BackendKind::cuda}};
enum class ScalarKind { float32, float64 };

// The SPEC's limits: a SPEC is a few hundred bytes of flat keys.
inline constexpr smoe::io::JsonLimits spec_limits{.max_bytes = std::size_t(1) << 20, .max_depth = 8};

// Parses the SPEC file (io/json_reader.hpp): duplicate keys, deep nesting, NUL and numbers beyond
// double range are errors with the byte position, and the text is at most 1 MiB.
inline json read_spec_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("SPEC: cannot open '", path, "'");
  std::string text;
  char buffer[1 << 16];
  while (in.read(buffer, sizeof buffer) || in.gcount() > 0) {
    text.append(buffer, static_cast<std::size_t>(in.gcount()));
    if (text.size() > spec_limits.max_bytes) fail("SPEC '", path, "' is larger than ", spec_limits.max_bytes, " bytes");
  }
  return smoe::io::parse_json(text, "SPEC '" + path + "'", spec_limits);
}

// A SPEC value for an error message, bounded in length whatever the value.
inline std::string shown(const json& v) { return smoe::io::describe_json(v); }

inline void expect_known_keys(const json& object, const char* what, std::initializer_list<std::string_view> known) {
  for (const auto& [key, value] : object.items()) {
    bool found = false;
    for (auto k : known) found = found || k == key;
    if (!found) {
      std::string list;
      for (auto k : known) list += (list.empty() ? "" : ", ") + std::string(k);
      fail(what, ": unknown key \"", smoe::io::clip_text(key), "\" (known keys: ", list, ")");
    }
  }
}


inline std::int64_t integer(const json& spec, const char* key) {
  const json& v = spec[key];
  if (!v.is_number_integer()) fail("SPEC: \"", key, "\" must be an integer, got ", shown(v));
  return v.get<std::int64_t>();
}

inline index_t positive_int(const json& spec, const char* key) {
  if (!spec.contains(key)) fail("SPEC: missing required key \"", key, "\"");
  const auto n = integer(spec, key);
  if (n < 1) fail("SPEC: \"", key, "\" must be >= 1, got ", n);
  return n;
}

inline index_t optional_int(const json& spec, const char* key, index_t fallback, index_t minimum) {
  if (!spec.contains(key)) return fallback;
  const auto n = integer(spec, key);
  if (n < minimum) fail("SPEC: \"", key, "\" must be >= ", minimum, ", got ", n);
  return n;
}

inline double optional_number(const json& spec, const char* key, double fallback) {
  if (!spec.contains(key)) return fallback;
  const json& v = spec[key];
  if (!v.is_number() || !std::isfinite(v.get<double>()))
    fail("SPEC: \"", key, "\" must be a finite number, got ", shown(v));
  return v.get<double>();
}

inline bool optional_bool(const json& spec, const char* key) {
  if (!spec.contains(key)) return false;
  const json& v = spec[key];
  if (!v.is_boolean()) fail("SPEC: \"", key, "\" must be true or false, got ", shown(v));
  return v.get<bool>();
}

template <class Enum, std::size_t N>
Enum choice(const json& spec, const char* key, const std::pair<std::string_view, Enum> (&choices)[N],
            const char* default_name = nullptr) {
  std::string name;
  if (spec.contains(key)) {
    if (!spec[key].is_string()) fail("SPEC: \"", key, "\" must be a string, got ", shown(spec[key]));
    name = spec[key].get<std::string>();
  } else if (default_name != nullptr) {
    name = default_name;
  } else {
    fail("SPEC: missing required key \"", key, "\"");
  }
  std::string list;
  for (const auto& [n, e] : choices) {
    if (n == name) return e;
    list += (list.empty() ? "\"" : ", \"") + std::string(n) + "\"";
  }
  fail("SPEC: \"", key, "\" must be one of ", list, ", got \"", smoe::io::clip_text(name), "\"");
}

// Bytes of IN's data buffer: every parameter the SPEC sizes describe is read from IN, so no product
// of SPEC sizes that is a parameter's element count may exceed it. Checked before any layer is
// built, so a hostile size is an error naming the keys, never an allocation.
inline std::uint64_t data_bytes(const smoe::io::SafetensorsFile& in) {
  std::uint64_t n = 0;
  for (const auto& name : in.names()) n += in.info(name).end - in.info(name).begin;
  return n;
}

struct SizeFactor {
  const char* key;
  index_t value;
};

// `factors` multiply to the element count of the parameter `tensor`, which IN must hold.
inline void expect_backed(const smoe::io::SafetensorsFile& in, std::size_t scalar_bytes, const char* tensor,
                          std::initializer_list<SizeFactor> factors) {
  const std::uint64_t limit = data_bytes(in) / scalar_bytes;
  std::uint64_t n = 1;
  bool over = false;
  std::string keys;
  for (const auto& [key, value] : factors) {
    if (!keys.empty()) keys += " × ";
    keys += key;
    keys += " (";
    keys += std::to_string(value);
    keys += ")";
    const auto u = static_cast<std::uint64_t>(value);
    if (u == 0) return;  // an empty tensor costs nothing
    if (n > limit / u) over = true;
    if (!over) n *= u;
  }
  if (over)
    fail("SPEC: ", keys, " = the elements of ", tensor, ", more than IN's data buffer holds (", data_bytes(in),
         " bytes); the sizes must match the tensors in IN");
}

inline std::string format_shape(const std::vector<index_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

template <class T>
void check_finite(const smoe::io::SafetensorsFile& in, const std::string& name, const smoe::Tensor<T>& t) {
  for (index_t i = 0; i < t.size(); ++i)
    if (!std::isfinite(t[i]))
      fail(in.source(), ": tensor '", name, "' flat element ", i, " is not finite (", t[i], ")");
}

// Reads `name` as T; its dtype must be T's and, where `shape` is given, its shape must equal it.
template <class T>
smoe::Tensor<T> load(const smoe::io::SafetensorsFile& in, const std::string& name, const std::vector<index_t>& shape,
                     const char* dtype_note = " (the SPEC dtype)") {
  constexpr auto want = smoe::io::dtype_of<T>::value;
  if (!in.contains(name)) fail(in.source(), ": missing tensor '", name, "' (", want, " ", format_shape(shape), ")");
  const auto& info = in.info(name);
  if (info.dtype != want)
    fail(in.source(), ": tensor '", name, "' dtype must be ", want, dtype_note, ", got ", info.dtype);
  if (info.shape != shape)
    fail(in.source(), ": tensor '", name, "' shape must be ", format_shape(shape), ", got ", format_shape(info.shape));
  auto t = in.read<T>(name);
  if constexpr (std::is_floating_point_v<T>) check_finite(in, name, t);
  return t;
}

// The input x [T, d], any T >= 0.
template <class T>
smoe::Tensor<T> load_x(const smoe::io::SafetensorsFile& in, index_t d) {
  if (!in.contains("x")) fail(in.source(), ": missing tensor 'x' ([T, ", d, "])");
  const auto& shape = in.info("x").shape;
  if (shape.size() != 2 || shape[1] != d)
    fail(in.source(), ": tensor 'x' shape must be [T, ", d, "] (any T >= 0), got ", format_shape(shape));
  return load<T>(in, "x", shape);
}

// Loads every parameter of `component` (its for_each_parameter names) from IN, then fails on any
// tensor of IN that is neither a parameter nor one of `data` (the other tensors the SPEC reads).
template <class T, class Component>
void load_parameters(const smoe::io::SafetensorsFile& in, Component& component, std::set<std::string> data) {
  component.for_each_parameter([&](std::string_view name, auto& p) {
    if constexpr (std::is_same_v<std::remove_cvref_t<decltype(p.value)>, smoe::Tensor<T>>)
      p.value = load<T>(in, std::string(name), p.value.shape());
    else
      copy(load<T>(in, std::string(name), p.value.shape()), p.value);  // a device parameter: smoe::copy
    data.insert(std::string(name));
  });
  for (const auto& name : in.names())
    if (!data.contains(name)) {
      std::string list;
      for (const auto& n : data) list += (list.empty() ? "" : ", ") + n;
      fail(in.source(), ": unexpected tensor '", name, "' (this SPEC reads ", list, ")");
    }
}

// The SPEC keys both modes share: "activation", "dtype" (default float32), "mode" (default eval).
inline ActivationKind parse_activation(const json& j) {
  constexpr std::pair<std::string_view, ActivationKind> activations[] = {
      {"relu", ActivationKind::relu}, {"gelu", ActivationKind::gelu}, {"swiglu", ActivationKind::swiglu}};
  return choice<ActivationKind>(j, "activation", activations);
}
inline ScalarKind parse_dtype(const json& j) {
  constexpr std::pair<std::string_view, ScalarKind> dtypes[] = {{"float32", ScalarKind::float32},
                                                                {"float64", ScalarKind::float64}};
  return choice<ScalarKind>(j, "dtype", dtypes, "float32");
}
inline smoe::Mode parse_mode(const json& j) {
  constexpr std::pair<std::string_view, smoe::Mode> modes[] = {{"eval", smoe::Mode::eval},
                                                               {"train", smoe::Mode::train}};
  return choice<smoe::Mode>(j, "mode", modes, "eval");
}

// The "coef" object: the coefficients of the switch, z, entropy and importance losses (each 0 when
// absent). Without router logits (`has_logits` false) only "importance" may be non-zero; `router`
// names the router in that message.
struct Coefficients {
  double switch_balance = 0, z = 0, entropy = 0, importance = 0;
};

inline Coefficients parse_coefficients(const json& j, bool has_logits, const std::string& router) {
  Coefficients out;
  if (!j.contains("coef")) return out;
  const json& c = j["coef"];
  if (!c.is_object()) fail("SPEC: \"coef\" must be an object, got ", shown(c));
  expect_known_keys(c, "SPEC \"coef\"", {"switch", "z", "entropy", "importance"});
  const auto coefficient = [&](const char* key) {
    if (!c.contains(key)) return 0.0;
    const json& v = c[key];
    if (!v.is_number() || !std::isfinite(v.get<double>()))
      fail("SPEC: \"coef\".\"", key, "\" must be a finite number, got ", shown(v));
    const double value = v.get<double>();
    if (value != 0.0 && !has_logits && std::string_view(key) != "importance")
      fail("SPEC: \"coef\".\"", key, "\" needs router logits, which ", router,
           " does not have (only \"importance\" applies)");
    return value;
  };
  out.switch_balance = coefficient("switch");
  out.z = coefficient("z");
  out.entropy = coefficient("entropy");
  out.importance = coefficient("importance");
  return out;
}

}  // namespace smoe_eval
