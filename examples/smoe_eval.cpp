// smoe_eval: runs one MoE layer described by a JSON spec on tensors from a safetensors file, so an
// independent implementation (another framework, a reference script) can check smoe's numbers.
//
//   smoe_eval SPEC.json IN.safetensors OUT.safetensors
//
// SPEC  {"d_model", "n_experts", "expert_size", "k", "router": "softmax_topk" | "sigmoid_topk",
//        "renormalize": false (softmax only), "activation": "relu" | "gelu" | "swiglu", "bias": false,
//        "coef": {"switch": 0, "z": 0, "entropy": 0, "importance": 0}, "dtype": "float32" | "float64"}
// IN    x [T, d], optional dy [T, d], router.weight [E, d], experts.w1 [E, d, G] ([E, d, 2G] for swiglu:
//       gate half first, then up half), experts.w2 [E, G, d]; with bias experts.b1 [E, G] ([E, 2G]) and
//       experts.b2 [E, d]. Every tensor has the SPEC dtype.
// OUT   y [T, d], aux_loss [] (Σ coef · loss), expert_counts [E] (I64, tokens per expert), and when dy is
//       given the gradients of sum(y ⊙ dy) + aux_loss: grad.x, grad.router.weight, grad.experts.w1, ...
// A bad spec, a missing, unexpected or mis-shaped tensor or a wrong dtype prints one line to stderr
// and exits with status 1.
#include <smoe/io/safetensors.hpp>
#include <smoe/smoe.hpp>

#include <cmath>
#include <cstdint>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace {

using smoe::fail;
using smoe::index_t;
using json = nlohmann::json;

enum class RouterKind { softmax_topk, sigmoid_topk };
enum class ActivationKind { relu, gelu, swiglu };
enum class ScalarKind { float32, float64 };

struct Spec {
  index_t d_model = 0, n_experts = 0, expert_size = 0, k = 0;
  RouterKind router = RouterKind::softmax_topk;
  bool renormalize = false;
  ActivationKind activation = ActivationKind::relu;
  bool bias = false;
  double coef_switch = 0, coef_z = 0, coef_entropy = 0, coef_importance = 0;
  ScalarKind dtype = ScalarKind::float32;
};

constexpr const char* usage =
    "usage: smoe_eval SPEC.json IN.safetensors OUT.safetensors\n"
    "  runs one MoE layer (forward, and backward when IN holds dy) and writes y, aux_loss,\n"
    "  expert_counts and the gradients grad.* to OUT; see the header of examples/smoe_eval.cpp\n";

// Parses the SPEC file; duplicate keys are an error because JSON parsers silently keep one of them.
json read_spec_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("SPEC: cannot open '", path, "'");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::set<std::string>> open;
  std::string duplicate;
  const json::parser_callback_t track = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) open.emplace_back();
    if (event == json::parse_event_t::object_end) open.pop_back();
    if (event == json::parse_event_t::key && !open.empty() && !open.back().insert(parsed.get<std::string>()).second &&
        duplicate.empty())
      duplicate = parsed.get<std::string>();
    return true;
  };
  json spec;
  try {
    spec = json::parse(text, track);
  } catch (const json::parse_error& e) {
    fail("SPEC '", path, "' is not valid JSON: ", e.what());
  }
  if (!duplicate.empty()) fail("SPEC: key \"", duplicate, "\" appears more than once");
  return spec;
}

void expect_known_keys(const json& object, const char* what, std::initializer_list<std::string_view> known) {
  for (const auto& [key, value] : object.items()) {
    bool found = false;
    for (auto k : known) found = found || k == key;
    if (!found) {
      std::string list;
      for (auto k : known) list += (list.empty() ? "" : ", ") + std::string(k);
      fail(what, ": unknown key \"", key, "\" (known keys: ", list, ")");
    }
  }
}

index_t positive_int(const json& spec, const char* key) {
  if (!spec.contains(key)) fail("SPEC: missing required key \"", key, "\"");
  const json& v = spec[key];
  if (!v.is_number_integer()) fail("SPEC: \"", key, "\" must be an integer, got ", v.dump());
  const auto n = v.get<std::int64_t>();
  if (n < 1) fail("SPEC: \"", key, "\" must be >= 1, got ", n);
  return n;
}

bool optional_bool(const json& spec, const char* key) {
  if (!spec.contains(key)) return false;
  const json& v = spec[key];
  if (!v.is_boolean()) fail("SPEC: \"", key, "\" must be true or false, got ", v.dump());
  return v.get<bool>();
}

template <class Enum>
Enum choice(const json& spec, const char* key, std::initializer_list<std::pair<std::string_view, Enum>> choices,
            const char* default_name = nullptr) {
  std::string name;
  if (spec.contains(key)) {
    if (!spec[key].is_string()) fail("SPEC: \"", key, "\" must be a string, got ", spec[key].dump());
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
  fail("SPEC: \"", key, "\" must be one of ", list, ", got \"", name, "\"");
}

Spec parse_spec(const json& j) {
  if (!j.is_object()) fail("SPEC: must be a JSON object, got ", j.type_name());
  expect_known_keys(
      j, "SPEC",
      {"d_model", "n_experts", "expert_size", "k", "router", "renormalize", "activation", "bias", "coef", "dtype"});
  Spec s;
  s.d_model = positive_int(j, "d_model");
  s.n_experts = positive_int(j, "n_experts");
  s.expert_size = positive_int(j, "expert_size");
  s.k = positive_int(j, "k");
  s.router = choice<RouterKind>(
      j, "router", {{"softmax_topk", RouterKind::softmax_topk}, {"sigmoid_topk", RouterKind::sigmoid_topk}});
  s.renormalize = optional_bool(j, "renormalize");
  if (s.renormalize && s.router != RouterKind::softmax_topk)
    fail("SPEC: \"renormalize\": true needs router \"softmax_topk\", got router \"sigmoid_topk\"");
  s.activation = choice<ActivationKind>(
      j, "activation",
      {{"relu", ActivationKind::relu}, {"gelu", ActivationKind::gelu}, {"swiglu", ActivationKind::swiglu}});
  s.bias = optional_bool(j, "bias");
  s.dtype =
      choice<ScalarKind>(j, "dtype", {{"float32", ScalarKind::float32}, {"float64", ScalarKind::float64}}, "float32");
  if (j.contains("coef")) {
    const json& c = j["coef"];
    if (!c.is_object()) fail("SPEC: \"coef\" must be an object, got ", c.dump());
    expect_known_keys(c, "SPEC \"coef\"", {"switch", "z", "entropy", "importance"});
    const auto coefficient = [&](const char* key) {
      if (!c.contains(key)) return 0.0;
      const json& v = c[key];
      if (!v.is_number() || !std::isfinite(v.get<double>()))
        fail("SPEC: \"coef\".\"", key, "\" must be a finite number, got ", v.dump());
      return v.get<double>();
    };
    s.coef_switch = coefficient("switch");
    s.coef_z = coefficient("z");
    s.coef_entropy = coefficient("entropy");
    s.coef_importance = coefficient("importance");
  }
  return s;
}

// Runtime SPEC choices to template arguments: each helper calls `f` with the chosen type or object.
template <class T>
struct Tag {
  using type = T;
};

template <class F>
void with_scalar(ScalarKind kind, F&& f) {
  if (kind == ScalarKind::float64)
    f(Tag<double>{});
  else
    f(Tag<float>{});
}

template <class T, class F>
void with_router(const Spec& s, F&& f) {
  const smoe::TopKRouterConfig c{.d_model = s.d_model, .experts = s.n_experts, .k = s.k};
  if (s.router == RouterKind::softmax_topk)
    f(smoe::SoftmaxTopK<T>(c, smoe::SoftmaxGate{.renormalize = s.renormalize}));
  else
    f(smoe::SigmoidTopK<T>(c));
}

template <class T, class F>
void with_experts(const Spec& s, F&& f) {
  const smoe::FeedForwardConfig c{
      .d_model = s.d_model, .experts = s.n_experts, .hidden = s.expert_size, .bias = s.bias};
  switch (s.activation) {
    case ActivationKind::relu: f(smoe::ReluExperts<T>(c)); break;
    case ActivationKind::gelu: f(smoe::GeluExperts<T>(c)); break;
    case ActivationKind::swiglu: f(smoe::SwiGluExperts<T>(c)); break;
  }
}

std::string format_shape(const std::vector<index_t>& shape) {
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
smoe::Tensor<T> load(const smoe::io::SafetensorsFile& in, const std::string& name, const std::vector<index_t>& shape) {
  constexpr auto want = smoe::io::dtype_of<T>::value;
  if (!in.contains(name)) fail(in.source(), ": missing tensor '", name, "' (", want, " ", format_shape(shape), ")");
  const auto& info = in.info(name);
  if (info.dtype != want)
    fail(in.source(), ": tensor '", name, "' dtype must be ", want, " (the SPEC dtype), got ", info.dtype);
  if (info.shape != shape)
    fail(in.source(), ": tensor '", name, "' shape must be ", format_shape(shape), ", got ", format_shape(info.shape));
  auto t = in.read<T>(name);
  check_finite(in, name, t);
  return t;
}

template <class Layer>
smoe::io::SafetensorsWriter evaluate(Layer& layer, const smoe::io::SafetensorsFile& in) {
  using T = typename Layer::scalar_type;
  const index_t d = layer.d_model(), E = layer.n_experts();
  std::set<std::string> expected = {"x", "dy"};
  layer.for_each_parameter([&](std::string_view name, smoe::Parameter<T>& p) {
    p.value = load<T>(in, std::string(name), p.value.shape());
    expected.insert(std::string(name));
  });
  for (const auto& name : in.names())
    if (!expected.contains(name)) {
      std::string list;
      for (const auto& n : expected) list += (list.empty() ? "" : ", ") + n;
      fail(in.source(), ": unexpected tensor '", name, "' (this SPEC reads ", list, ")");
    }

  if (!in.contains("x")) fail(in.source(), ": missing tensor 'x' ([T, ", d, "])");
  const auto& x_shape = in.info("x").shape;
  if (x_shape.size() != 2 || x_shape[1] != d)
    fail(in.source(), ": tensor 'x' shape must be [T, ", d, "] (any T >= 0), got ", format_shape(x_shape));
  const auto x = load<T>(in, "x", x_shape);
  const index_t tokens = x_shape[0];

  smoe::Tensor<T> y({tokens, d});
  layer.validate_inputs = true;
  const auto result = layer.forward(x.matrix(), y.matrix(), smoe::Mode::eval);

  smoe::io::SafetensorsWriter out;
  out.set_metadata("producer", "smoe_eval");
  out.add("y", y);
  smoe::Tensor<T> aux(std::vector<index_t>{});
  aux[0] = result.aux_loss;
  out.add("aux_loss", aux);
  smoe::Tensor<std::int64_t> counts({E});
  for (index_t e = 0; e < E; ++e) counts[e] = result.stats.tokens_per_expert[static_cast<std::size_t>(e)];
  out.add("expert_counts", counts);

  if (in.contains("dy")) {
    const auto dy = load<T>(in, "dy", x_shape);
    smoe::Tensor<T> dx({tokens, d});
    smoe::zero_grad(layer);
    layer.backward(dy.matrix(), dx.matrix());
    out.add("grad.x", dx);
    layer.for_each_parameter(
        [&](std::string_view name, smoe::Parameter<T>& p) { out.add("grad." + std::string(name), p.grad); });
  }
  return out;
}

void run(const std::string& spec_path, const std::string& in_path, const std::string& out_path) {
  const Spec spec = parse_spec(read_spec_file(spec_path));
  const auto in = smoe::io::SafetensorsFile::load(in_path);
  with_scalar(spec.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_router<T>(spec, [&](auto router) {
      with_experts<T>(spec, [&](auto experts) {
        smoe::MoE layer(std::move(router), std::move(experts), smoe::WeightedSum<T>{},
                        smoe::SwitchBalanceLoss<T>(spec.coef_switch), smoe::RouterZLoss<T>(spec.coef_z),
                        smoe::EntropyLoss<T>(spec.coef_entropy), smoe::ImportanceLoss<T>(spec.coef_importance));
        evaluate(layer, in).save(out_path);
      });
    });
  });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && (std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h")) {
    std::cout << usage;
    return 0;
  }
  if (argc != 4) {
    std::cerr << "smoe_eval: expected 3 arguments, got " << argc - 1 << "\n" << usage;
    return 1;
  }
  try {
    run(argv[1], argv[2], argv[3]);
  } catch (const smoe::error& e) {
    std::cerr << "smoe_eval: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "smoe_eval: unexpected failure: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
