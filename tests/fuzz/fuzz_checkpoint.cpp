// libFuzzer harness: load_checkpoint on arbitrary file bytes into a small model with a buffer, an
// AdamW optimizer and counters. All or nothing: a load that throws (only smoe::error) leaves every
// bit of the model, the optimizer and the counters as they were; a load that succeeds leaves a
// state that saves and loads back bit-identically.
#include <smoe/io/checkpoint.hpp>
#include <smoe/train/adamw.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include "fuzz_check.hpp"
#include "fuzz_model.hpp"

namespace {

using smoe_fuzz::Model;
using smoe_fuzz::prepare;

using Bytes = std::vector<std::uint8_t>;

template <class T>
void append(Bytes& out, const smoe::Tensor<T>& t) {
  const auto* p = reinterpret_cast<const std::uint8_t*>(t.data());
  out.insert(out.end(), p, p + t.size() * smoe::index_t(sizeof(T)));
  for (smoe::index_t d : t.shape()) out.push_back(static_cast<std::uint8_t>(d));
}

// Every bit of the state a load may change.
Bytes snapshot(Model& m, const smoe::AdamW<float>& opt, const smoe::io::Counters& counters) {
  Bytes s;
  m.for_each_parameter([&](std::string_view, smoe::Parameter<float>& p) { append(s, p.value); });
  append(s, m.running);
  for (const auto& [name, st] : opt.state()) {
    s.insert(s.end(), name.begin(), name.end());
    append(s, st.m);
    append(s, st.v);
  }
  for (int k = 0; k < 8; ++k) s.push_back(static_cast<std::uint8_t>(opt.steps() >> (8 * k)));
  for (const auto& [key, value] : counters)
    for (int k = 0; k < 8; ++k) s.push_back(static_cast<std::uint8_t>(value >> (8 * k)));
  return s;
}

const std::filesystem::path& path() {
  static const std::filesystem::path p =
      std::filesystem::temp_directory_path() / ("smoe_fuzz_checkpoint_" + std::to_string(::getpid()) + ".safetensors");
  return p;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  {
    std::ofstream out(path(), std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  Model m;
  smoe::AdamW<float> opt;
  prepare(m, opt);
  smoe::io::Counters counters{{"step", 7}, {"position", 11}};
  const Bytes before = snapshot(m, opt, counters);
  // Half the inputs load with allow_extra, chosen by the last byte, so both paths are explored.
  const smoe::io::LoadOptions options{.allow_extra = size > 0 && (data[size - 1] & 1) != 0};
  try {
    smoe::io::load_checkpoint(path(), m, opt, counters, options);
  } catch (const smoe::error&) {
    FUZZ_CHECK(snapshot(m, opt, counters) == before);  // a failed load changes nothing
    return 0;
  }
  const Bytes loaded = snapshot(m, opt, counters);
  smoe::io::save_checkpoint(path(), m, opt, counters);
  Model m2;
  smoe::AdamW<float> opt2;
  prepare(m2, opt2);
  smoe::io::Counters counters2{{"step", 0}, {"position", 0}};
  smoe::io::load_checkpoint(path(), m2, opt2, counters2);
  FUZZ_CHECK(snapshot(m2, opt2, counters2) == loaded);
  return 0;
}
