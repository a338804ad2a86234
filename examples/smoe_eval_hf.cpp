// smoe_eval hf: one Hugging Face checkpoint's sparse MoE block, or its whole causal LM, on tensors
// from a safetensors file, so the PyTorch reference (tests/oracle/hf_oracle.py) can check smoe's
// loader and components.
//
//   smoe_eval hf MODEL_DIR IN.safetensors OUT.safetensors [--layer L]
//
// MODEL_DIR  config.json + model.safetensors or model.safetensors.index.json and its shards
//            (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss; F32/BF16/F16 weights).
// With --layer L:
//   IN       x F32 [T, hidden_size].
//   OUT      y F32 [T, hidden_size] = layer L's sparse MoE block (routed + shared experts) of x,
//            routing.experts I32 [T, k] (best first), routing.gates F32 [T, k] (the weights applied).
// Without --layer (mixtral, qwen2_moe, qwen3_moe, olmoe; deepseek_v3 and gpt_oss are refused):
//   IN       input_ids I64 [B, S] (each id in [0, vocab_size)).
//   OUT      logits F32 [B, S, vocab_size] of the causal LM, positions 0 … S−1, no padding.
// Any bad input prints one line to stderr, exits with status 1 and writes no OUT.
#include <algorithm>
#include <charconv>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <span>
#include <string>
#include <string_view>
#include <system_error>

#include <smoe/hf/model.hpp>
#include <smoe/hf/moe_block.hpp>
#include <smoe/io/safetensors.hpp>

namespace smoe_eval {

namespace {

constexpr const char* hf_usage =
    "usage: smoe_eval hf MODEL_DIR IN.safetensors OUT.safetensors [--layer L]\n"
    "  with --layer L: runs layer L's sparse MoE block of a Hugging Face checkpoint on IN's x [T, hidden]\n"
    "  and writes y, routing.experts and routing.gates to OUT; without: the causal LM's logits\n"
    "  [B, S, vocab] of IN's input_ids int64 [B, S] (docs/hf.md)\n";

smoe::index_t parse_layer(std::string_view text) {
  long long v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty())
    smoe::fail("--layer must be a non-negative integer, got '", text, "'");
  if (v < 0) smoe::fail("--layer must be >= 0, got ", v);
  return smoe::index_t(v);
}

void run_hf_block(const std::filesystem::path& model_dir, const std::string& in_path, const std::string& out_path,
                  smoe::index_t layer) {
  const smoe::hf::Config config = smoe::hf::load_config(model_dir);
  smoe::hf::Checkpoint ckpt(model_dir);
  smoe::hf::SparseMoeBlock block = smoe::hf::load_moe_block(ckpt, config, layer);
  const auto in = smoe::io::SafetensorsFile::load(in_path);
  const smoe::io::TensorInfo& info = in.info("x");
  if (info.dtype != smoe::io::Dtype::f32) smoe::fail("IN: x must be F32, got ", info.dtype);
  if (info.shape.size() != 2) smoe::fail("IN: x must have rank 2 [T, hidden_size], got rank ", info.shape.size());
  if (info.shape[1] != config.hidden)
    smoe::fail("IN: x must have hidden_size = ", config.hidden, " columns, got ", info.shape[1]);
  const smoe::Tensor<float> x = in.read<float>("x");
  const smoe::index_t tokens = info.shape[0];
  smoe::Tensor<float> y({tokens, config.hidden});
  block.forward(std::as_const(x).matrix(), y.matrix(), smoe::Mode::eval);
  smoe::io::SafetensorsWriter out;
  out.add("y", y);
  out.add("routing.experts", block.routing().experts);
  out.add("routing.gates", block.routing().gates);
  out.save(out_path);
}

void run_hf_model(const std::filesystem::path& model_dir, const std::string& in_path, const std::string& out_path) {
  const smoe::hf::Config config = smoe::hf::load_config(model_dir);
  smoe::hf::check_causal_lm_supported(config);
  // IN first: a bad input fails before the (larger) checkpoint is read.
  const auto in = smoe::io::SafetensorsFile::load(in_path);
  const smoe::io::TensorInfo& info = in.info("input_ids");
  if (info.dtype != smoe::io::Dtype::i64) smoe::fail("IN: input_ids must be I64, got ", info.dtype);
  if (info.shape.size() != 2) smoe::fail("IN: input_ids must have rank 2 [B, S], got rank ", info.shape.size());
  const smoe::index_t batch = info.shape[0], length = info.shape[1];
  if (batch < 1 || length < 1) smoe::fail("IN: input_ids must have B >= 1 and S >= 1, got [", batch, ", ", length, "]");
  smoe::hf::check_sequence_length(config, length);
  const smoe::Tensor<std::int64_t> ids = in.read<std::int64_t>("input_ids");
  for (smoe::index_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= config.vocab)
      smoe::fail("IN: input_ids must be in [0, vocab_size = ", config.vocab, "), got ", ids[i], " at [", i / length,
                 ", ", i % length, "]");
  smoe::hf::Checkpoint ckpt(model_dir);
  const auto lm = smoe::hf::load_causal_lm(ckpt, config);
  lm->forward_logits(std::span<const std::int64_t>(ids.data(), std::size_t(ids.size())), batch, smoe::Mode::eval);
  smoe::Tensor<float> logits({batch, length, config.vocab});
  const auto l = lm->logits();
  for (smoe::index_t t = 0; t < batch * length; ++t) std::copy_n(l.row(t), config.vocab, logits.data() + t * config.vocab);
  smoe::io::SafetensorsWriter out;
  out.add("logits", logits);
  out.save(out_path);
}

}  // namespace

// `smoe_eval hf ...` (argv[1] == "hf").
int run_hf(int argc, char** argv) {
  if (argc == 3 && (std::string_view(argv[2]) == "--help" || std::string_view(argv[2]) == "-h")) {
    std::cout << hf_usage;
    return 0;
  }
  try {
    if (argc != 5 && argc != 7) {
      std::cerr << "smoe_eval hf: expected MODEL_DIR IN OUT [--layer L], got " << argc - 2 << " arguments\n" << hf_usage;
      return 1;
    }
    if (argc == 5) {
      run_hf_model(argv[2], argv[3], argv[4]);
      return 0;
    }
    if (std::string_view(argv[5]) != "--layer") smoe::fail("unknown option '", argv[5], "' (expected --layer L)");
    run_hf_block(argv[2], argv[3], argv[4], parse_layer(argv[6]));
  } catch (const smoe::error& e) {
    std::cerr << "smoe_eval hf: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "smoe_eval hf: unexpected failure: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace smoe_eval
