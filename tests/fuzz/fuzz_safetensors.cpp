// libFuzzer harness: SafetensorsFile on arbitrary bytes. A refused file must be a smoe::error; an
// accepted one must answer every accessor in bounds, agree with an independent parse of its header
// (nlohmann's DOM), and survive being written back by SafetensorsWriter and read again unchanged.
#include <smoe/io/safetensors.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fuzz_check.hpp"

namespace {

using smoe::io::Dtype;
using smoe::io::SafetensorsFile;

// Every read the dtype allows; conversions may refuse (smoe::error), never misbehave.
void read_all(const SafetensorsFile& f, const std::string& name) {
  const auto& info = f.info(name);
  const auto raw = f.raw(name);
  FUZZ_CHECK(raw.size() == info.end - info.begin);
  FUZZ_CHECK(info.numel() * std::int64_t(smoe::io::dtype_size(info.dtype)) == std::int64_t(raw.size()));
  const auto attempt = [](auto&& read) {
    try {
      read();
    } catch (const smoe::error&) {
    }
  };
  switch (info.dtype) {
    case Dtype::f64: FUZZ_CHECK(f.read<double>(name).size() == info.numel()); break;
    case Dtype::f32: FUZZ_CHECK(f.read<float>(name).size() == info.numel()); break;
    case Dtype::i64: FUZZ_CHECK(f.read<std::int64_t>(name).size() == info.numel()); break;
    case Dtype::i32: FUZZ_CHECK(f.read<std::int32_t>(name).size() == info.numel()); break;
    case Dtype::i16: FUZZ_CHECK(f.read<std::int16_t>(name).size() == info.numel()); break;
    case Dtype::i8: FUZZ_CHECK(f.read<std::int8_t>(name).size() == info.numel()); break;
    case Dtype::u8: FUZZ_CHECK(f.read<std::uint8_t>(name).size() == info.numel()); break;
    case Dtype::boolean: FUZZ_CHECK(f.read<bool>(name).size() == info.numel()); break;
    case Dtype::f16:
    case Dtype::bf16: break;
  }
  attempt([&] { (void)f.read_as<double>(name); });
  attempt([&] { (void)f.read_as<float>(name); });
  attempt([&] { (void)f.read_as<std::int64_t>(name); });
  attempt([&] { (void)f.read_as<std::int8_t>(name); });
}

// The header parsed by nlohmann's DOM parser must say what SafetensorsFile says.
void cross_check(const SafetensorsFile& f, const std::uint8_t* data) {
  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= std::uint64_t(data[i]) << (8 * i);
  const auto header = nlohmann::json::parse(data + 8, data + 8 + n);
  std::size_t tensors = 0;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      FUZZ_CHECK(value.size() == f.metadata().size());
      for (const auto& [k, v] : value.items()) FUZZ_CHECK(f.metadata().at(k) == v.get<std::string>());
      continue;
    }
    ++tensors;
    const auto& info = f.info(name);
    FUZZ_CHECK(value.at("dtype").get<std::string>() == smoe::io::dtype_name(info.dtype));
    FUZZ_CHECK(value.at("shape").get<std::vector<std::int64_t>>() == info.shape);
    FUZZ_CHECK(value.at("data_offsets").at(0).get<std::uint64_t>() == info.begin);
    FUZZ_CHECK(value.at("data_offsets").at(1).get<std::uint64_t>() == info.end);
  }
  FUZZ_CHECK(tensors == f.size());
}

// Written back in data order, the file must read the same.
void round_trip(const SafetensorsFile& f) {
  smoe::io::SafetensorsWriter w;
  for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
  for (const auto& name : f.names()) w.add_raw(name, f.info(name).dtype, f.info(name).shape, f.raw(name));
  const auto g = SafetensorsFile::parse(w.bytes());
  FUZZ_CHECK(g.names() == f.names());
  FUZZ_CHECK(g.metadata() == f.metadata());
  for (const auto& name : f.names()) {
    FUZZ_CHECK(g.info(name).dtype == f.info(name).dtype);
    FUZZ_CHECK(g.info(name).shape == f.info(name).shape);
    const auto a = f.raw(name), b = g.raw(name);
    FUZZ_CHECK(a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::uint8_t> bytes(data, data + size);
  std::optional<SafetensorsFile> f;
  try {
    f.emplace(SafetensorsFile::parse(std::move(bytes), "fuzz"));
  } catch (const smoe::error&) {
    return 0;  // refused cleanly
  }
  for (const auto& name : f->names()) read_all(*f, name);
  try {
    (void)f->info("\x01 not a tensor");
    FUZZ_CHECK(false);
  } catch (const smoe::error&) {
  }
  cross_check(*f, data);
  round_trip(*f);
  return 0;
}
