#pragma once
// KVCache: the rotated keys and the values of every attention layer of a model, for B sequences
// decoded together, so that a decode step runs the model on its new tokens only (prefill once,
// then one step per token: Model::forward_cached).
//
// Memory is allocated once, for `capacity` positions per sequence:
//   layers · B · capacity · 2 · kv_heads · head_dim · sizeof(T) bytes,
// and never grows; a step that would pass the capacity is refused. A decode step's cost grows with
// the positions already cached (its attention reads them), nothing else.
#include <cstddef>

#include "smoe/core/error.hpp"
#include "smoe/core/tensor.hpp"

namespace smoe {

struct KVCacheConfig {
  index_t layers = 0;     // attention layers (Model::layers())
  index_t sequences = 1;  // B, decoded together
  index_t kv_heads = 0;   // G
  index_t head_dim = 0;   // dh
  index_t capacity = 0;   // positions per sequence: prompt + generated tokens

  void validate(const char* context) const {
    if (layers < 0) fail(context, ": layers must be >= 0, got ", layers);
    if (sequences < 1) fail(context, ": sequences must be >= 1, got ", sequences);
    if (kv_heads < 1) fail(context, ": kv_heads must be >= 1, got ", kv_heads);
    if (head_dim < 1) fail(context, ": head_dim must be >= 1, got ", head_dim);
    if (capacity < 1) fail(context, ": capacity must be >= 1, got ", capacity);
  }
};

// One layer's part of a KVCache, as an attention layer's forward_cached sees it: the rows of
// sequence b at position p start at keys + (b · capacity + p) · width (width = kv_heads · head_dim).
template <class T>
struct LayerKVCache {
  T* keys = nullptr;
  T* values = nullptr;
  index_t sequences = 0, capacity = 0, width = 0;
  index_t length = 0;  // positions cached before this step

  T* key_row(index_t b, index_t p) const { return keys + (b * capacity + p) * width; }
  T* value_row(index_t b, index_t p) const { return values + (b * capacity + p) * width; }
};

template <class T>
class KVCache {
 public:
  static constexpr const char* name = "KVCache";

  explicit KVCache(KVCacheConfig c)
      : config_((c.validate(name), c)),
        keys_({c.layers, c.sequences * c.capacity, c.kv_heads * c.head_dim}),
        values_({c.layers, c.sequences * c.capacity, c.kv_heads * c.head_dim}) {}

  const KVCacheConfig& config() const { return config_; }
  index_t sequences() const { return config_.sequences; }
  index_t capacity() const { return config_.capacity; }
  // Positions cached per sequence (the next token's position).
  index_t length() const { return length_; }
  std::size_t bytes() const { return (keys_.size() + values_.size()) * sizeof(T); }

  // Layer l's view for a step that appends `count` positions per sequence.
  LayerKVCache<T> layer(index_t l, index_t count) {
    if (l < 0 || l >= config_.layers) fail(name, ": layer must be in [0, ", config_.layers, "), got ", l);
    check_room(count);
    const index_t width = config_.kv_heads * config_.head_dim, stride = config_.sequences * config_.capacity * width;
    return {keys_.data() + l * stride, values_.data() + l * stride, config_.sequences, config_.capacity, width, length_};
  }
  void check_room(index_t count) const {
    if (count < 0 || length_ + count > config_.capacity)
      fail(name, ": a step of ", count, " positions after ", length_, " cached ones would pass the capacity of ",
           config_.capacity, " positions per sequence");
  }
  // After every layer has appended `count` positions (Model::forward_cached calls it).
  void advance(index_t count) {
    check_room(count);
    length_ += count;
  }
  // Forgets every position (the memory stays).
  void clear() { length_ = 0; }

 private:
  KVCacheConfig config_;
  Tensor<T> keys_, values_;  // [layers, B · capacity, G · dh]
  index_t length_ = 0;
};

}  // namespace smoe
