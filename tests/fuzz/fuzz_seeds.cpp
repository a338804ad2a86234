// Writes the seed corpora of the fuzz harnesses from files the library itself writes:
//
//   fuzz_seeds DIR    ->  DIR/safetensors/*, DIR/checkpoint/*, DIR/smoe_eval/*
//
// safetensors: SafetensorsWriter files of every dtype, 0-d and empty tensors, metadata;
// checkpoint: save_checkpoint of the harness's model (with and without optimizer state);
// smoe_eval: SPEC, NUL, IN for several routers (the harness's input format).
#include <smoe/io/checkpoint.hpp>
#include <smoe/io/safetensors.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "fuzz_model.hpp"

namespace {

using smoe::index_t;
using smoe::Tensor;
using smoe::io::SafetensorsWriter;
using Bytes = std::vector<std::uint8_t>;

void write(const std::filesystem::path& p, const Bytes& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

template <class T>
Tensor<T> filled(std::vector<index_t> shape, double scale = 0.25) {
  Tensor<T> t(std::move(shape));
  for (index_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(((i * 7) % 11 - 5) * scale);
  return t;
}

// smoe_eval's input: SPEC text, NUL, IN bytes.
Bytes eval_input(const std::string& spec, const SafetensorsWriter& in) {
  Bytes out(spec.begin(), spec.end());
  out.push_back(0);
  const Bytes file = in.bytes();
  out.insert(out.end(), file.begin(), file.end());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::filesystem::path dir = argv[1];
  for (const char* sub : {"safetensors", "checkpoint", "smoe_eval"}) std::filesystem::create_directories(dir / sub);

  {
    SafetensorsWriter w;
    w.set_metadata("format", "pt");
    w.add("f64", filled<double>({2, 2}));
    w.add("f32", filled<float>({3}));
    w.add("i64", filled<std::int64_t>({2}, 1e6));
    w.add("i32", filled<std::int32_t>({2}, 3));
    w.add("i16", filled<std::int16_t>({1}, 1));
    w.add("i8", filled<std::int8_t>({2}, 1));
    w.add("u8", filled<std::uint8_t>({2}, 0));
    Tensor<bool> flags({2});
    flags[0] = true, flags[1] = false;
    w.add("bool", flags);
    w.add("scalar", Tensor<float>(std::vector<index_t>{}));
    w.add("empty", Tensor<float>({0, 3}));
    const Bytes half = {0x00, 0x3c, 0x01, 0x7e}, bf = {0x80, 0x3f, 0xc0, 0x7f};
    w.add_raw("f16", smoe::io::Dtype::f16, {2}, half);
    w.add_raw("bf16", smoe::io::Dtype::bf16, {2}, bf);
    write(dir / "safetensors" / "all_dtypes", w.bytes());
    write(dir / "safetensors" / "empty", SafetensorsWriter().bytes());
  }
  {
    smoe_fuzz::Model m;
    smoe::AdamW<float> opt;
    smoe_fuzz::prepare(m, opt);
    smoe::io::save_checkpoint(dir / "checkpoint" / "with_optimizer", m, opt, {{"step", 7}, {"position", 11}});
    smoe::io::save_checkpoint(dir / "checkpoint" / "weights_only", m, {{"step", 1}});
    std::filesystem::copy_file(dir / "checkpoint" / "with_optimizer", dir / "safetensors" / "checkpoint",
                               std::filesystem::copy_options::overwrite_existing);
  }
  {
    // d = 4, E = 3, G = 2, K = 2, T = 5 (float64); names as docs/smoe_eval.md lists them.
    const std::string base = R"("d_model": 4, "n_experts": 3, "expert_size": 2, "dtype": "float64")";
    SafetensorsWriter in;
    in.add("x", filled<double>({5, 4}));
    in.add("dy", filled<double>({5, 4}, 0.5));
    in.add("router.weight", filled<double>({3, 4}));
    in.add("experts.w1", filled<double>({3, 4, 2}));
    in.add("experts.w2", filled<double>({3, 2, 4}));
    write(dir / "smoe_eval" / "softmax_topk",
          eval_input(R"({"router": "softmax_topk", "k": 2, "activation": "relu", "mode": "train", )" + base +
                         R"(, "coef": {"switch": 0.01, "z": 0.001}})",
                     in));
    write(dir / "smoe_eval" / "sigmoid_gelu",
          eval_input(R"({"router": "sigmoid_topk", "k": 2, "activation": "gelu", "capacity_factor": 1.0, )" + base + "}",
                     in));
    write(dir / "smoe_eval" / "expert_choice",
          eval_input(R"({"router": "expert_choice", "activation": "relu", )" + base + "}", in));
    write(dir / "smoe_eval" / "sbase", eval_input(R"({"router": "sbase", "k": 1, "activation": "relu", )" + base + "}", in));
    write(dir / "smoe_eval" / "stack",
          eval_input(R"({"layers": 1, "router": "softmax_topk", "k": 2, "activation": "relu", )" + base + "}", in));
    SafetensorsWriter hashed = in;
    Tensor<std::int64_t> ids({5});
    for (index_t t = 0; t < 5; ++t) ids[t] = t * 3;
    hashed.add("ids", ids);
    write(dir / "smoe_eval" / "hash",
          eval_input(R"({"router": "hash", "activation": "relu", "seed": 3, )" + base + "}", hashed));
    SafetensorsWriter swiglu;
    swiglu.add("x", filled<double>({5, 4}));
    swiglu.add("router.weight", filled<double>({3, 4}));
    swiglu.add("experts.w1", filled<double>({3, 4, 4}));
    swiglu.add("experts.w2", filled<double>({3, 2, 4}));
    write(dir / "smoe_eval" / "swiglu",
          eval_input(R"({"router": "softmax_topk", "k": 2, "activation": "swiglu", )" + base + "}", swiglu));
  }
  return 0;
}
