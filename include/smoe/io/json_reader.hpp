#pragma once
// parse_json: nlohmann::json from text that may be hostile (a SPEC, a config file), with bounds.
//
//   const nlohmann::json spec = smoe::io::parse_json(text, "SPEC 'run.json'", {.max_bytes = 1 << 20});
//
// Stricter than nlohmann::json::parse, and every failure is a smoe::error naming `source`:
//  - the text is at most `max_bytes` long (the tree costs up to ~80 bytes per byte of text, for
//    "[{},{},...]"), and values nest at most `max_depth` deep: the tree is built without recursion,
//    and nothing later (dump, destruction) recurses deeper than that;
//  - a key that appears twice in one object is refused (one map lookup per key: linear overall;
//    nlohmann would silently keep one of them);
//  - a NUL byte is refused (nlohmann's lexer takes it for the end of input and would ignore the rest);
//  - syntax errors and numbers beyond double range report the byte position.
// describe_json gives a value for an error message, never longer than about 100 bytes.
#include <cstddef>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "smoe/core/error.hpp"

namespace smoe::io {

struct JsonLimits {
  std::size_t max_bytes = std::size_t(1) << 24;
  std::size_t max_depth = 64;
};

// `text`, or its first `keep` bytes and its length.
inline std::string clip_text(std::string_view text, std::size_t keep = 64) {
  if (text.size() <= keep) return std::string(text);
  return std::string(text.substr(0, keep)) + "...(" + std::to_string(text.size()) + " bytes)";
}

// A short description of `v` for an error message: scalars as JSON (clipped), containers by size.
inline std::string describe_json(const nlohmann::json& v) {
  if (v.is_array()) return "an array of " + std::to_string(v.size()) + " elements";
  if (v.is_object()) return "an object of " + std::to_string(v.size()) + " keys";
  return clip_text(v.dump(), 80);
}

namespace detail {

// nlohmann SAX handler that builds the tree with an explicit stack, refusing duplicates and depth.
class BoundedJsonBuilder {
 public:
  using json = nlohmann::json;
  BoundedJsonBuilder(json& root, std::string_view source, std::size_t max_depth)
      : root_(root), source_(source), max_depth_(max_depth) {}

  bool null() { return value(nullptr); }
  bool boolean(bool v) { return value(v); }
  bool number_integer(json::number_integer_t v) { return value(v); }
  bool number_unsigned(json::number_unsigned_t v) { return value(v); }
  bool number_float(json::number_float_t v, const json::string_t&) { return value(v); }
  bool string(json::string_t& v) { return value(std::move(v)); }
  bool binary(json::binary_t& v) { return value(json::binary(std::move(v))); }
  bool start_object(std::size_t) { return open(json::object()); }
  bool start_array(std::size_t) { return open(json::array()); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }
  bool key(json::string_t& k) {
    json& object = *stack_.back();
    const auto [it, fresh] = object.emplace(k, nullptr);
    if (!fresh) fail(source_, ": key \"", clip_text(k), "\" appears more than once in one object");
    slot_ = &it.value();
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) {
    // nlohmann's message quotes the last token, which may be megabytes long.
    fail(source_, " is not valid JSON at byte ", position, ": ", clip_text(e.what(), 200));
  }

 private:
  bool value(json v) {
    (void)put(std::move(v));
    return true;
  }
  json* put(json v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    json& parent = *stack_.back();
    if (parent.is_array()) {
      parent.push_back(std::move(v));
      return &parent.back();
    }
    *slot_ = std::move(v);
    return slot_;
  }
  bool open(json v) {
    if (stack_.size() == max_depth_)
      fail(source_, ": values nest deeper than ", max_depth_, " levels (the limit for this input)");
    stack_.push_back(put(std::move(v)));
    return true;
  }
  bool close() {
    stack_.pop_back();
    return true;
  }

  json& root_;
  std::string_view source_;
  std::size_t max_depth_;
  std::vector<json*> stack_;  // open containers, innermost last
  json* slot_ = nullptr;      // the value of the last key
};

}  // namespace detail

inline nlohmann::json parse_json(std::string_view text, std::string_view source, JsonLimits limits = {}) {
  if (text.size() > limits.max_bytes)
    fail(source, " has ", text.size(), " bytes, more than the limit of ", limits.max_bytes);
  if (const void* nul = std::memchr(text.data(), 0, text.size()))
    fail(source, " is not valid JSON: byte ", static_cast<const char*>(nul) - text.data(), " is NUL");
  nlohmann::json root;
  detail::BoundedJsonBuilder builder(root, source, limits.max_depth);
  (void)nlohmann::json::sax_parse(text.begin(), text.end(), &builder);  // throws on every failure
  return root;
}

}  // namespace smoe::io
