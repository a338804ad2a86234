// libFuzzer harness: smoe_eval's whole run (examples/smoe_eval.cpp) on an arbitrary SPEC and IN.
// Input: the SPEC text, a NUL byte, then the IN file's bytes (no NUL: all of it is the SPEC, IN
// empty). Every failure must be a smoe::error (what smoe_eval prints with exit status 1) after
// which OUT does not exist; anything else escaping is a finding.
// Size cap: runs whose cost the SPEC sets without IN backing it ("sinkhorn_iters" > 64, of
// iterations) are skipped; every size is otherwise bounded by IN, which libFuzzer's -max_len bounds.
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include <unistd.h>

#include "fuzz_check.hpp"
#include "smoe_eval_common.hpp"

namespace {

std::filesystem::path scratch(const char* name) {
  return std::filesystem::temp_directory_path() / ("smoe_fuzz_eval_" + std::to_string(::getpid()) + "_" + name);
}

void write(const std::filesystem::path& p, const std::uint8_t* data, std::size_t size) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}

bool too_costly(std::string_view spec) {
  try {
    const auto j = smoe::io::parse_json(spec, "SPEC", smoe_eval::spec_limits);
    if (j.is_object() && j.contains("sinkhorn_iters") && j["sinkhorn_iters"].is_number() &&
        j["sinkhorn_iters"].get<double>() > 64)
      return true;
  } catch (const smoe::error&) {
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto* nul = static_cast<const std::uint8_t*>(std::memchr(data, 0, size));
  const std::size_t spec_size = nul ? std::size_t(nul - data) : size;
  if (too_costly(std::string_view(reinterpret_cast<const char*>(data), spec_size))) return 0;
  static const auto spec = scratch("spec.json"), in = scratch("in.safetensors"), out = scratch("out.safetensors");
  write(spec, data, spec_size);
  write(in, nul ? nul + 1 : data + size, nul ? size - spec_size - 1 : 0);
  std::filesystem::remove(out);
  try {
    smoe_eval::run(spec.string(), in.string(), out.string());
  } catch (const smoe::error&) {
    FUZZ_CHECK(!std::filesystem::exists(out));  // nothing written on an error
  }
  return 0;
}
