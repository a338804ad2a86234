#pragma once
// Checkpoints of an expert-parallel layer, one file per rank, experts under their global ids, so
// a checkpoint written with P ranks loads with any P' ranks whose E is divisible by P' (1 too).
//
//   <dir>/shard-<r>-of-<P>.safetensors
//     "<name>.<e>"   for every sharded parameter <name> (leading dimension E/P) and every global
//                    expert e this rank owns: that expert's slice, shape = the rest of the shape
//     "<name>"       every replicated parameter, written by every rank (any one shard is then
//                    enough to read them; they are small next to the experts)
//     __metadata__   "format": "smoe.expert_parallel_checkpoint", "ranks": P, "experts": E
//
// Saving: each rank writes its own file atomically (io::detail::write_file_atomically); no
// collective. Loading: each rank reads the files that hold its experts (found from the "ranks" of
// shard 0, located by listing <dir>), stages every tensor and checks names, dtypes and shapes, then
// all ranks agree (one all_agree) before any parameter changes: either every rank loads or every
// rank throws smoe::error. Parameters only; optimizer state and buffers are not in this format yet.
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/dist/communicator.hpp"
#include "smoe/io/checkpoint.hpp"
#include "smoe/io/safetensors.hpp"

namespace smoe::io {

inline constexpr std::string_view expert_parallel_checkpoint_format = "smoe.expert_parallel_checkpoint";

inline std::filesystem::path shard_path(const std::filesystem::path& dir, int rank, int ranks) {
  return dir / ("shard-" + std::to_string(rank) + "-of-" + std::to_string(ranks) + ".safetensors");
}

// Layer: ExpertParallel (n_experts(), local_experts(), first_expert(), sharded(name)).
template <class Layer, Communicator Comm>
void save_sharded_checkpoint(const std::filesystem::path& dir, Layer& layer, Comm& comm) {
  using T = typename Layer::scalar_type;
  std::filesystem::create_directories(dir);
  SafetensorsWriter w;
  w.set_metadata("format", std::string(expert_parallel_checkpoint_format));
  w.set_metadata("ranks", std::to_string(comm.size()));
  w.set_metadata("experts", std::to_string(layer.n_experts()));
  const index_t El = layer.local_experts(), first = layer.first_expert();
  layer.for_each_parameter([&](std::string_view name, Parameter<T>& p) {
    if (!Layer::sharded(name)) return w.add(std::string(name), p.value);
    std::vector<index_t> shape(p.value.shape().begin() + 1, p.value.shape().end());
    Tensor<T> one(shape);
    const index_t per = p.value.size() / El;
    for (index_t j = 0; j < El; ++j) {
      std::copy(p.value.data() + j * per, p.value.data() + (j + 1) * per, one.data());
      w.add(std::string(name) + "." + std::to_string(first + j), one);
    }
  });
  detail::write_file_atomically(shard_path(dir, comm.rank(), comm.size()), w.bytes());
}

template <class Layer, Communicator Comm>
void load_sharded_checkpoint(const std::filesystem::path& dir, Layer& layer, Comm& comm) {
  using T = typename Layer::scalar_type;
  const char* ctx = "load_sharded_checkpoint";
  std::map<std::string, Tensor<T>> staged;
  std::string message;
  try {
    // The writer's rank count: from the name of its shard 0.
    int ranks = 0;
    if (std::filesystem::is_directory(dir))
      for (const auto& entry : std::filesystem::directory_iterator(dir)) {
        const std::string f = entry.path().filename().string();
        if (f.starts_with("shard-0-of-") && f.ends_with(".safetensors"))
          ranks = std::stoi(f.substr(11, f.size() - 11 - 12));
      }
    if (ranks < 1) fail(ctx, ": ", dir.string(), " must hold shard-0-of-<P>.safetensors, found none");
    std::map<int, SafetensorsFile> files;
    auto file = [&](int r) -> const SafetensorsFile& {
      if (!files.contains(r)) files.emplace(r, SafetensorsFile::load(shard_path(dir, r, ranks)));
      return files.at(r);
    };
    const auto& meta = file(0).metadata();
    const auto format = meta.find("format");
    if (format == meta.end() || format->second != expert_parallel_checkpoint_format)
      fail(ctx, ": ", shard_path(dir, 0, ranks).string(), " format must be ", expert_parallel_checkpoint_format);
    const index_t E = layer.n_experts();
    expect_equal(ctx, "experts of the checkpoint (= the layer's E)", std::to_string(E), meta.at("experts"));
    const index_t El = layer.local_experts(), first = layer.first_expert(), old_local = E / ranks;
    const auto expect = [&](const SafetensorsFile& f, const std::string& key, const std::vector<index_t>& shape) {
      Tensor<T> t = f.template read<T>(key);
      if (t.shape() != shape)
        fail(ctx, ": tensor '", key, "' shape must be ", detail::format_shape(shape), ", got ",
             detail::format_shape(t.shape()));
      return t;
    };
    layer.for_each_parameter([&](std::string_view name, Parameter<T>& p) {
      const std::string n(name);
      if (!Layer::sharded(name)) {
        staged[n] = expect(file(0), n, p.value.shape());
        return;
      }
      const std::vector<index_t> shape(p.value.shape().begin() + 1, p.value.shape().end());
      for (index_t j = 0; j < El; ++j) {
        const index_t e = first + j;
        const std::string key = n + "." + std::to_string(e);
        staged[key] = expect(file(int(e / old_local)), key, shape);
      }
    });
  } catch (const std::exception& e) {
    message = e.what();
  }
  if (!comm.all_agree(message.empty()))
    fail(message.empty() ? std::string(ctx) + ": another rank could not read its shards (see its message)" : message);
  const index_t El = layer.local_experts(), first = layer.first_expert();
  layer.for_each_parameter([&](std::string_view name, Parameter<T>& p) {
    const std::string n(name);
    if (!Layer::sharded(name)) {
      std::copy(staged[n].data(), staged[n].data() + p.value.size(), p.value.data());
      return;
    }
    const index_t per = p.value.size() / El;
    for (index_t j = 0; j < El; ++j) {
      const Tensor<T>& t = staged[n + "." + std::to_string(first + j)];
      std::copy(t.data(), t.data() + per, p.value.data() + j * per);
    }
  });
}

}  // namespace smoe::io
