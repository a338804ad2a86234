// generate: token-by-token generation from a Hugging Face checkpoint (mixtral, qwen2_moe, qwen3_moe,
// olmoe) with a KV cache: the prompt runs once (prefill), then one decode step per new token.
//
//   generate MODEL_DIR --ids 1,2,3 [--max-new N] [--temperature T --top-p P --seed S] [--ignore-eos]
//
// Prints the new token ids, comma-separated, on the first line (greedy unless --temperature > 0;
// generation ends early after config.json's eos_token_id unless --ignore-eos), then the prefill and
// decode throughput. Errors: one line on stderr, exit status 1 (2 for a bad command line).
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <smoe/hf/model.hpp>
#include <smoe/layers/generation.hpp>

namespace {

constexpr const char* usage =
    "usage: generate MODEL_DIR --ids 1,2,3 [--max-new N] [--temperature T --top-p P --seed S] [--ignore-eos]\n"
    "  MODEL_DIR      a Hugging Face checkpoint: config.json + safetensors (mixtral, qwen2_moe, qwen3_moe, olmoe)\n"
    "  --ids          the prompt's token ids\n"
    "  --max-new N    tokens to generate (default 16)\n"
    "  --temperature  0: greedy (default); > 0: sampling, with --top-p (default 1) and --seed (default 0)\n"
    "  --ignore-eos   do not stop after config.json's eos_token_id\n";

struct UsageError {
  std::string message;
};

template <class V>
V parse_number(std::string_view flag, std::string_view text) {
  V v{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size())
    throw UsageError{std::string(flag) + " needs a number, got '" + std::string(text) + "'"};
  return v;
}

std::vector<std::int64_t> parse_ids(std::string_view text) {
  std::vector<std::int64_t> ids;
  while (true) {
    const std::size_t comma = text.find(',');
    ids.push_back(parse_number<std::int64_t>("--ids", text.substr(0, comma)));
    if (comma == std::string_view::npos) break;
    text.remove_prefix(comma + 1);
  }
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir;
  std::vector<std::int64_t> prompt;
  smoe::GenerationConfig config;
  bool ignore_eos = false;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string_view a = argv[i];
      auto value = [&]() -> std::string_view {
        if (i + 1 >= argc) throw UsageError{std::string(a) + " needs a value"};
        return argv[++i];
      };
      if (a == "--ids") prompt = parse_ids(value());
      else if (a == "--max-new") config.max_new = parse_number<smoe::index_t>(a, value());
      else if (a == "--temperature") config.sampling.temperature = parse_number<double>(a, value());
      else if (a == "--top-p") config.sampling.top_p = parse_number<double>(a, value());
      else if (a == "--seed") config.sampling.seed = parse_number<std::uint64_t>(a, value());
      else if (a == "--ignore-eos") ignore_eos = true;
      else if (a == "-h" || a == "--help") { std::cout << usage; return 0; }
      else if (a.starts_with("-") || !model_dir.empty()) throw UsageError{"unexpected argument '" + std::string(a) + "'"};
      else model_dir = a;
    }
    if (model_dir.empty()) throw UsageError{"MODEL_DIR is missing"};
    if (prompt.empty()) throw UsageError{"--ids is missing"};
    if (config.max_new < 1) throw UsageError{"--max-new must be >= 1, got " + std::to_string(config.max_new)};
  } catch (const UsageError& e) {
    std::cerr << "generate: " << e.message << "\n" << usage;
    return 2;
  }
  try {
    config.sampling.validate("generate");
    const smoe::hf::Config hf = smoe::hf::load_config(model_dir);
    smoe::hf::check_causal_lm_supported(hf);
    for (std::size_t i = 0; i < prompt.size(); ++i)
      if (prompt[i] < 0 || prompt[i] >= hf.vocab)
        smoe::fail("--ids: token ids must be in [0, vocab_size = ", hf.vocab, "), got ", prompt[i], " at ", i);
    smoe::hf::check_sequence_length(hf, smoe::index_t(prompt.size()) + config.max_new - 1);
    if (!ignore_eos) config.stop_ids = hf.eos_token_ids;
    const auto lm = smoe::hf::load_causal_lm(model_dir);
    const smoe::Generation g = smoe::generate(*lm, std::span<const std::int64_t>(prompt), config);
    for (std::size_t i = 0; i < g.ids.size(); ++i) std::printf("%s%lld", i ? "," : "", static_cast<long long>(g.ids[i]));
    std::printf("\nprefill: %lld tokens in %.6f s, %.1f tokens/s\ndecode: %lld tokens in %.6f s, %.1f tokens/s\n",
                static_cast<long long>(g.prompt_tokens), g.prefill_seconds, g.prefill_tokens_per_second(),
                static_cast<long long>(g.decode_steps), g.decode_seconds, g.decode_tokens_per_second());
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "generate: " << e.what() << "\n";
    return 1;
  }
}
