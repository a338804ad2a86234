#pragma once
// hf::Checkpoint: the tensors of a Hugging Face model directory, one `model.safetensors` or shards
// listed by `model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}).
//
//   hf::Checkpoint ckpt(dir);
//   Tensor<float> w = ckpt.read("model.layers.0.mlp.gate.weight", {E, H});
//
// Files may hold F32, BF16, F16 or F64 tensors, mixed; read() converts to float32 once (BF16 and F16
// exactly). Errors (smoe::error): an index naming a shard that does not exist (at construction, so
// nothing is read from a half-present checkpoint), a truncated or malformed shard (when it is first
// opened, by io::SafetensorsFile), a missing tensor (named), a shape other than the expected one
// (expected vs actual), a tensor that the index places in a shard which does not hold it.
// Shards are opened lazily and kept, so loading one layer touches only the shards that hold it.
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "smoe/core/error.hpp"
#include "smoe/core/tensor.hpp"
#include "smoe/io/json_reader.hpp"
#include "smoe/io/safetensors.hpp"

namespace smoe::hf {

class Checkpoint {
 public:
  explicit Checkpoint(const std::filesystem::path& dir) : dir_(dir) {
    const auto index = dir / "model.safetensors.index.json";
    const auto single = dir / "model.safetensors";
    std::error_code ec;
    if (std::filesystem::exists(index, ec)) {
      load_index(index);
    } else if (std::filesystem::exists(single, ec)) {
      shards_.emplace("model.safetensors", nullptr);
      for (const std::string& name : open("model.safetensors").names()) weight_map_.emplace(name, "model.safetensors");
    } else {
      fail("hf::Checkpoint: '", dir.string(), "' holds neither model.safetensors nor model.safetensors.index.json");
    }
  }

  const std::filesystem::path& directory() const { return dir_; }
  bool contains(std::string_view name) const { return weight_map_.find(name) != weight_map_.end(); }
  std::size_t size() const { return weight_map_.size(); }

  // The stored shape of `name` (opens its shard).
  const std::vector<index_t>& shape(std::string_view name) { return file_of(name).info(name).shape; }

  // `name` as float32, which must have shape `expected`.
  Tensor<float> read(std::string_view name, const std::vector<index_t>& expected) {
    const io::SafetensorsFile& f = file_of(name);
    const io::TensorInfo& info = f.info(name);
    if (info.shape != expected)
      fail("hf::Checkpoint: tensor '", name, "' must have shape ", format(expected), ", got ", format(info.shape));
    if (!io::is_floating(info.dtype))
      fail("hf::Checkpoint: tensor '", name, "' must hold a floating dtype (F32, BF16, F16), got ", info.dtype);
    return f.read_as<float>(name);
  }

 private:
  static std::string format(const std::vector<index_t>& shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }

  void load_index(const std::filesystem::path& index) {
    std::ifstream in(index, std::ios::binary);
    if (!in) fail("hf::Checkpoint: cannot open '", index.string(), "'");
    std::ostringstream text;
    text << in.rdbuf();
    const std::string source = "'" + index.string() + "'";
    const nlohmann::json j = io::parse_json(text.str(), source);
    if (!j.is_object() || !j.contains("weight_map") || !j.at("weight_map").is_object())
      fail("hf::Checkpoint: ", source, " must be an object with a 'weight_map' object");
    for (const auto& [name, file] : j.at("weight_map").items()) {
      if (!file.is_string())
        fail("hf::Checkpoint: ", source, ": weight_map['", name, "'] must be a file name, got ", io::describe_json(file));
      const std::string shard = file.get<std::string>();
      // A shard is a plain file name inside the directory: no path that leaves it.
      if (shard.empty() || shard.find('/') != std::string::npos || shard.find('\\') != std::string::npos ||
          shard == "." || shard == "..")
        fail("hf::Checkpoint: ", source, ": weight_map['", name, "'] must name a file in the model directory, got '",
             io::clip_text(shard), "'");
      if (!shards_.count(shard)) {
        std::error_code ec;
        if (!std::filesystem::is_regular_file(dir_ / shard, ec))
          fail("hf::Checkpoint: ", source, " names shard '", shard, "' (for tensor '", name, "'), which does not exist in '",
               dir_.string(), "'");
        shards_.emplace(shard, nullptr);
      }
      weight_map_.emplace(name, shard);
    }
  }

  const io::SafetensorsFile& open(const std::string& shard) {
    auto& slot = shards_.at(shard);
    if (!slot) slot = std::make_unique<io::SafetensorsFile>(io::SafetensorsFile::load(dir_ / shard));
    return *slot;
  }

  const io::SafetensorsFile& file_of(std::string_view name) {
    const auto it = weight_map_.find(name);
    if (it == weight_map_.end())
      fail("hf::Checkpoint: missing tensor '", name, "' in '", dir_.string(), "' (", weight_map_.size(), " tensors)");
    const io::SafetensorsFile& f = open(it->second);
    if (!f.contains(name))
      fail("hf::Checkpoint: the index places tensor '", name, "' in shard '", it->second, "', which does not hold it");
    return f;
  }

  std::filesystem::path dir_;
  std::map<std::string, std::string, std::less<>> weight_map_;                     // tensor → shard
  std::map<std::string, std::unique_ptr<io::SafetensorsFile>, std::less<>> shards_;  // opened lazily
};

}  // namespace smoe::hf
