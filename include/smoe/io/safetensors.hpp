#pragma once
// Safetensors files (huggingface/safetensors): an 8-byte little-endian u64 header length N, N bytes
// of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then
// the data buffer, which the tensors must tile exactly (no gaps, no overlaps, no trailing bytes).
//
// SafetensorsFile validates the whole header when it loads, so every later read stays in bounds; a
// malformed file throws smoe::error naming the tensor, the field and the expected and actual values
// (JSON syntax errors: the byte position). It is as strict as the writer: no empty or duplicate
// names, no duplicate keys, no NUL inside the header, BOOL bytes only 0 or 1.
// Limits (docs/reliability.md): a header of at most 100 MB (the reference implementation's cap),
// tensors of rank <= 64. The header is parsed as a stream against its schema (no JSON tree), so
// parsing is linear, never recursive, and costs memory proportional to the names and shapes kept.
// read<T> returns the stored data only when the dtype is exactly T's; read_as<T> converts on request.
// SafetensorsWriter lays tensors out in insertion order and pads the header with spaces to 8 bytes.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <ostream>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "smoe/core/error.hpp"
#include "smoe/core/tensor.hpp"

namespace smoe::io {

enum class Dtype { f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean };

inline constexpr Dtype all_dtypes[] = {Dtype::f64, Dtype::f32, Dtype::f16, Dtype::bf16, Dtype::i64,
                                       Dtype::i32, Dtype::i16, Dtype::i8,  Dtype::u8,   Dtype::boolean};

// The largest header SafetensorsFile reads (the reference implementation's cap) and the largest rank.
inline constexpr std::uint64_t max_header_bytes = 100'000'000;
inline constexpr std::size_t max_rank = 64;

// The dtype's spelling in the header ("F32", "BF16", ...).
constexpr std::string_view dtype_name(Dtype d) {
  switch (d) {
    case Dtype::f64: return "F64";
    case Dtype::f32: return "F32";
    case Dtype::f16: return "F16";
    case Dtype::bf16: return "BF16";
    case Dtype::i64: return "I64";
    case Dtype::i32: return "I32";
    case Dtype::i16: return "I16";
    case Dtype::i8: return "I8";
    case Dtype::u8: return "U8";
    case Dtype::boolean: return "BOOL";
  }
  return "?";
}

constexpr std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::f64:
    case Dtype::i64: return 8;
    case Dtype::f32:
    case Dtype::i32: return 4;
    case Dtype::f16:
    case Dtype::bf16:
    case Dtype::i16: return 2;
    case Dtype::i8:
    case Dtype::u8:
    case Dtype::boolean: return 1;
  }
  return 0;
}

constexpr bool is_floating(Dtype d) {
  return d == Dtype::f64 || d == Dtype::f32 || d == Dtype::f16 || d == Dtype::bf16;
}

inline std::optional<Dtype> parse_dtype(std::string_view name) {
  for (Dtype d : all_dtypes)
    if (dtype_name(d) == name) return d;
  return std::nullopt;
}

inline std::ostream& operator<<(std::ostream& o, Dtype d) { return o << dtype_name(d); }

// The stored dtype of each C++ scalar that is read and written without conversion.
template <class T>
struct dtype_of;
template <>
struct dtype_of<double> : std::integral_constant<Dtype, Dtype::f64> {};
template <>
struct dtype_of<float> : std::integral_constant<Dtype, Dtype::f32> {};
template <>
struct dtype_of<std::int64_t> : std::integral_constant<Dtype, Dtype::i64> {};
template <>
struct dtype_of<std::int32_t> : std::integral_constant<Dtype, Dtype::i32> {};
template <>
struct dtype_of<std::int16_t> : std::integral_constant<Dtype, Dtype::i16> {};
template <>
struct dtype_of<std::int8_t> : std::integral_constant<Dtype, Dtype::i8> {};
template <>
struct dtype_of<std::uint8_t> : std::integral_constant<Dtype, Dtype::u8> {};
template <>
struct dtype_of<bool> : std::integral_constant<Dtype, Dtype::boolean> {};

template <class T>
concept NativeScalar = requires {
  dtype_of<T>::value;
};

// Targets of read_as: floating types and the integer types above (a BOOL tensor reads with read<bool>).
template <class T>
concept ConvertibleScalar = std::is_floating_point_v<T> ||(NativeScalar<T> && !std::is_same_v<T, bool>);

// Where a tensor lives: dtype, shape and its byte range [begin, end) within the data buffer.
struct TensorInfo {
  Dtype dtype = Dtype::f32;
  std::vector<index_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;

  index_t numel() const {
    index_t n = 1;
    for (index_t d : shape) n *= d;
    return n;
  }
};

namespace detail {

static_assert(sizeof(bool) == 1, "BOOL tensors map to a one-byte bool");

// Safetensors is little-endian; a big-endian host reverses each element's bytes.
template <class T>
T load_le(const std::uint8_t* p) {
  unsigned char b[sizeof(T)];
  if constexpr (std::endian::native == std::endian::little)
    std::memcpy(b, p, sizeof(T));
  else
    std::reverse_copy(p, p + sizeof(T), b);
  T v;
  std::memcpy(&v, b, sizeof(T));
  return v;
}

template <class T>
void store_le(T v, std::uint8_t* p) {
  unsigned char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  if constexpr (std::endian::native == std::endian::little)
    std::memcpy(p, b, sizeof(T));
  else
    std::reverse_copy(b, b + sizeof(T), p);
}

// IEEE binary16 to float, exact for every value: subnormals, infinities, and NaN with its sign and
// payload (bits, not arithmetic, so a signalling NaN is not quieted).
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000) << 16;
  const int exponent = (h >> 10) & 0x1f;
  const std::uint32_t mantissa = h & 0x3ff;
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  float magnitude;
  if (exponent == 0)
    magnitude = std::ldexp(float(mantissa), -24);
  else
    magnitude = std::ldexp(float(mantissa | 0x400), exponent - 25);
  return sign != 0 ? -magnitude : magnitude;
}

// bfloat16 is the upper half of a float32.
inline float bfloat16_to_float(std::uint16_t h) { return std::bit_cast<float>(std::uint32_t(h) << 16); }

// Floating S to floating T. Widening is exact; NaN keeps its sign and payload bits (as many as T
// holds: the top ones) through bit operations, since hardware conversion quiets signalling NaNs.
// Narrowing rounds to nearest; nullopt when a finite value is beyond T's range (no silent inf).
template <class T, class S>
std::optional<T> convert_floating(S v) {
  if (std::isnan(v)) {
    if constexpr (std::is_same_v<S, T>) {
      return v;
    } else if constexpr ((std::is_same_v<S, float> || std::is_same_v<S, double>) &&
                         (std::is_same_v<T, float> || std::is_same_v<T, double>)) {
      using SU = std::conditional_t<sizeof(S) == 4, std::uint32_t, std::uint64_t>;
      using TU = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
      constexpr int s_bits = std::numeric_limits<S>::digits - 1, t_bits = std::numeric_limits<T>::digits - 1;
      const SU bits = std::bit_cast<SU>(v);
      const SU payload = bits & ((SU(1) << s_bits) - 1);
      TU out = TU(bits >> (8 * sizeof(S) - 1)) << (8 * sizeof(T) - 1);  // sign
      out |= ~TU(0) >> 1 & ~((TU(1) << t_bits) - 1);                       // exponent all ones
      if constexpr (t_bits >= s_bits)
        out |= TU(payload) << (t_bits - s_bits);
      else
        out |= TU(payload >> (s_bits - t_bits));
      if ((out & ((TU(1) << t_bits) - 1)) == 0) out |= TU(1) << (t_bits - 1);  // a payload only in dropped bits
      return std::bit_cast<T>(out);
    } else {
      return std::copysign(std::numeric_limits<T>::quiet_NaN(), T(std::signbit(v) ? -1 : 1));
    }
  }
  const T out = static_cast<T>(v);
  if (std::isinf(out) && !std::isinf(v)) return std::nullopt;
  return out;
}

// Whether integer v converts to floating T without rounding.
template <class T, class S>
bool exactly_representable(S v) {
  if constexpr (std::numeric_limits<S>::digits <= std::numeric_limits<T>::digits) {
    return true;
  } else {
    const T f = static_cast<T>(v);
    // f may have rounded up to 2^digits, which is above every S (and UB to convert back).
    if (f >= std::ldexp(T(1), std::numeric_limits<S>::digits)) return false;
    return static_cast<S>(f) == v;
  }
}

// At most 64 bytes of `s` for an error message: names and tokens come from files and may be
// megabytes long.
inline std::string clip(std::string_view s, std::size_t keep = 64) {
  if (s.size() <= keep) return std::string(s);
  return std::string(s.substr(0, keep)) + "...(" + std::to_string(s.size()) + " bytes)";
}

inline std::string format_shape(const std::vector<index_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline std::string format_range(std::uint64_t begin, std::uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// Bytes of `shape` with `element_size`-byte elements, or nullopt when any partial product exceeds
// index_t (so Tensor's own size computation cannot overflow either).
inline std::optional<std::uint64_t> checked_bytes(const std::vector<index_t>& shape, std::size_t element_size) {
  constexpr auto limit = static_cast<std::uint64_t>(std::numeric_limits<index_t>::max());
  std::uint64_t n = element_size;
  for (index_t d : shape) {
    const auto u = static_cast<std::uint64_t>(d);
    if (u != 0 && n > limit / u) return std::nullopt;
    n *= u;
  }
  return n;
}

}  // namespace detail

class SafetensorsFile {
 public:
  // Reads and validates the file at `path`.
  static SafetensorsFile load(const std::filesystem::path& path) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec))
      fail("SafetensorsFile: '", path.string(), "' is a directory, not a file");
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) fail("SafetensorsFile: cannot open '", path.string(), "' for reading");
    const std::streamoff size = in.tellg();
    if (size < 0) fail("SafetensorsFile: cannot determine the size of '", path.string(), "'");
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
    in.seekg(0);
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!in) fail("SafetensorsFile: error while reading ", size, " bytes of '", path.string(), "'");
    return parse(std::move(bytes), path.string());
  }

  // Validates an in-memory file; `source` names it in error messages.
  static SafetensorsFile parse(std::vector<std::uint8_t> bytes, std::string source = "<memory>") {
    SafetensorsFile f;
    f.bytes_ = std::move(bytes);
    f.source_ = std::move(source);
    f.parse_header();
    return f;
  }

  const std::string& source() const { return source_; }
  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }
  std::size_t size() const { return entries_.size(); }
  // Tensor names in data-buffer order.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(entries_.size());
    for (const auto& e : entries_) out.push_back(e.first);
    return out;
  }
  const std::map<std::string, std::string, std::less<>>& metadata() const { return metadata_; }

  const TensorInfo& info(std::string_view name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) {
      std::string held;
      for (std::size_t i = 0; i < entries_.size() && i < 16; ++i) held += (i ? ", " : "") + detail::clip(entries_[i].first);
      if (entries_.size() > 16) held += ", ...";
      fail(context(), "no tensor named '", detail::clip(name), "' (the file holds ", entries_.size(), " tensors: ", held, ")");
    }
    return entries_[it->second].second;
  }

  // The stored little-endian bytes of a tensor.
  std::span<const std::uint8_t> raw(std::string_view name) const {
    const TensorInfo& i = info(name);
    return {bytes_.data() + data_begin_ + i.begin, static_cast<std::size_t>(i.end - i.begin)};
  }

  // The tensor as stored; its dtype must be exactly T's.
  template <NativeScalar T>
  Tensor<T> read(std::string_view name) const {
    constexpr Dtype want = dtype_of<T>::value;
    const TensorInfo& i = info(name);
    if (i.dtype != want)
      fail(context(), "tensor '", name, "' dtype must be ", want, " to be read without conversion, got ", i.dtype,
           is_floating(i.dtype) == is_floating(want) ? " (read_as converts explicitly)" : "");
    Tensor<T> t(i.shape);
    const std::uint8_t* p = raw(name).data();
    for (index_t k = 0; k < t.size(); ++k) {
      if constexpr (std::is_same_v<T, bool>)
        t[k] = bool_at(name, p, k);
      else
        t[k] = detail::load_le<T>(p + k * index_t(sizeof(T)));
    }
    return t;
  }

  // The tensor converted to T, every value exactly or not at all, except where stated:
  //  - integer T from integer or BOOL dtypes: each value range-checked;
  //  - floating T from integer dtypes: each value must be exactly representable (I64 2^62 + 1
  //    does not read as double);
  //  - floating T from floating dtypes: widening is exact, NaN payloads included; narrowing (F64 to
  //    float) rounds to nearest and refuses a finite value beyond T's range (no silent inf).
  // Floating data never converts to an integer T.
  template <ConvertibleScalar T>
  Tensor<T> read_as(std::string_view name) const {
    const TensorInfo& i = info(name);
    if (std::is_integral_v<T> && is_floating(i.dtype))
      fail(context(), "read_as: tensor '", name, "' holds floating dtype ", i.dtype,
           ", which does not convert to an integer type");
    Tensor<T> t(i.shape);
    const std::uint8_t* p = raw(name).data();
    switch (i.dtype) {
      case Dtype::f64: convert<double>(name, p, t); break;
      case Dtype::f32: convert<float>(name, p, t); break;
      case Dtype::f16:
        for (index_t k = 0; k < t.size(); ++k)
          t[k] = floating<T>(name, k, detail::half_to_float(detail::load_le<std::uint16_t>(p + 2 * k)));
        break;
      case Dtype::bf16:
        for (index_t k = 0; k < t.size(); ++k)
          t[k] = floating<T>(name, k, detail::bfloat16_to_float(detail::load_le<std::uint16_t>(p + 2 * k)));
        break;
      case Dtype::i64: convert<std::int64_t>(name, p, t); break;
      case Dtype::i32: convert<std::int32_t>(name, p, t); break;
      case Dtype::i16: convert<std::int16_t>(name, p, t); break;
      case Dtype::i8: convert<std::int8_t>(name, p, t); break;
      case Dtype::u8: convert<std::uint8_t>(name, p, t); break;
      case Dtype::boolean:
        for (index_t k = 0; k < t.size(); ++k) t[k] = T(bool_at(name, p, k) ? 1 : 0);
        break;
    }
    return t;
  }

 private:
  SafetensorsFile() = default;

  std::string context() const { return "SafetensorsFile(" + source_ + "): "; }

  bool bool_at(std::string_view name, const std::uint8_t* p, index_t k) const {
    if (p[k] > 1)
      fail(context(), "BOOL tensor '", detail::clip(name), "' element ", k, " must be 0 or 1, got ", int(p[k]));
    return p[k] == 1;
  }

  template <class T, class S>
  T floating(std::string_view name, index_t k, S v) const {
    if constexpr (std::is_floating_point_v<T>) {
      const std::optional<T> out = detail::convert_floating<T>(v);
      if (!out)
        fail(context(), "read_as: tensor '", name, "' element ", k, " = ", v,
             " is beyond the target type's range (max ", std::numeric_limits<T>::max(), ")");
      return *out;
    } else {
      return T(v);  // unreachable: read_as refuses floating data for integer T
    }
  }

  template <class S, class T>
  void convert(std::string_view name, const std::uint8_t* p, Tensor<T>& t) const {
    for (index_t k = 0; k < t.size(); ++k) {
      const S v = detail::load_le<S>(p + k * index_t(sizeof(S)));
      if constexpr (std::is_floating_point_v<S>) {
        t[k] = floating<T>(name, k, v);
      } else if constexpr (std::is_integral_v<T>) {
        if (!std::in_range<T>(v))
          fail(context(), "read_as: tensor '", name, "' element ", k, " = ", +v, " is out of the target type's range [",
               +std::numeric_limits<T>::min(), ", ", +std::numeric_limits<T>::max(), "]");
        t[k] = static_cast<T>(v);
      } else {
        if (!detail::exactly_representable<T>(v))
          fail(context(), "read_as: tensor '", name, "' element ", k, " = ", +v,
               " is not exactly representable in the floating target type (", std::numeric_limits<T>::digits,
               "-bit significand)");
        t[k] = static_cast<T>(v);
      }
    }
  }

  template <class... Parts>
  [[noreturn]] void malformed(Parts&&... parts) const {
    fail(context(), std::forward<Parts>(parts)...);
  }

  void parse_header() {
    const std::uint64_t size = bytes_.size();
    if (size < 8) malformed("file is truncated: it has ", size, " bytes, fewer than the 8 of the header length");
    const auto n = detail::load_le<std::uint64_t>(bytes_.data());
    if (n > max_header_bytes)
      malformed("header length ", n, " exceeds the limit of ", max_header_bytes, " bytes");
    if (n > size - 8)
      malformed("header length ", n, " runs past the end of the file (", size - 8, " bytes follow the length field)");
    data_begin_ = 8 + n;
    const std::uint64_t data_size = size - data_begin_;
    const char* text = reinterpret_cast<const char*>(bytes_.data() + 8);
    if (n == 0) malformed("header length is 0; the header must be a JSON object");
    if (text[0] != '{') malformed("header must start with '{' (byte 123), got byte ", int(bytes_[8]));
    // nlohmann's lexer takes NUL for the end of input and would ignore everything after it.
    if (const void* nul = std::memchr(text, 0, n))
      malformed("header byte ", static_cast<const char*>(nul) - text, " is NUL; a header is JSON text");

    HeaderReader reader(*this, data_size);
    (void)nlohmann::json::sax_parse(text, text + n, &reader);  // throws on every failure
    if (!reader.complete()) malformed("header is not valid JSON: it ends inside the top-level object");

    std::sort(entries_.begin(), entries_.end(), [](const auto& a, const auto& b) {
      return std::tie(a.second.begin, a.second.end, a.first) < std::tie(b.second.begin, b.second.end, b.first);
    });
    std::uint64_t covered = 0;  // the tensors so far tile [0, covered)
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      const auto& [name, t] = entries_[i];
      if (t.begin < covered) {
        const auto& [prev, p] = entries_[i - 1];
        malformed("tensors '", detail::clip(prev), "' (data_offsets ", detail::format_range(p.begin, p.end), ") and '",
                  detail::clip(name), "' (data_offsets ", detail::format_range(t.begin, t.end), ") overlap");
      }
      if (t.begin > covered)
        malformed("data buffer bytes ", detail::format_range(covered, t.begin), " belong to no tensor (the next, '",
                  detail::clip(name), "', begins at ", t.begin, ")");
      covered = t.end;
    }
    if (covered != data_size)
      malformed("data buffer has ", data_size, " bytes, but the tensors cover only the first ", covered);
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      index_.find(entries_[i].first)->second = i;
      const auto& [name, t] = entries_[i];
      if (t.dtype != Dtype::boolean) continue;
      const std::uint8_t* p = bytes_.data() + data_begin_ + t.begin;
      for (index_t k = 0; k < index_t(t.end - t.begin); ++k) (void)bool_at(name, p, k);
    }
  }

  // The header as a stream of JSON events checked against the schema as they arrive: no JSON tree,
  // no recursion, a duplicate found by one lookup. Every failure throws smoe::error.
  class HeaderReader {
   public:
    using json = nlohmann::json;
    HeaderReader(SafetensorsFile& file, std::uint64_t data_size) : f_(file), data_size_(data_size) {}
    bool complete() const { return at_ == At::done; }

    bool null() { return value("null"); }
    bool boolean(bool b) { return value(b ? "true" : "false"); }
    bool number_integer(json::number_integer_t v) { return value(std::to_string(v)); }  // negative only
    bool number_unsigned(json::number_unsigned_t v) {
      if (at_ == At::shape) {
        if (v > std::uint64_t(std::numeric_limits<index_t>::max())) return value(std::to_string(v));
        if (info_.shape.size() == max_rank)
          f_.malformed(where(), "shape has more than ", max_rank, " dimensions (the rank limit)");
        info_.shape.push_back(static_cast<index_t>(v));
        return true;
      }
      if (at_ == At::offsets) {
        if (offsets_ < 2) (offsets_ == 0 ? info_.begin : info_.end) = v;
        ++offsets_;
        return true;
      }
      return value(std::to_string(v));
    }
    bool number_float(json::number_float_t, const json::string_t& text) { return value(text); }
    bool string(json::string_t& s) {
      if (at_ == At::metadata) {
        if (!f_.metadata_.try_emplace(key_, std::move(s)).second)
          f_.malformed("__metadata__ key '", detail::clip(key_), "' appears more than once");
        return true;
      }
      if (at_ == At::tensor && field_ == Field::dtype) {
        const auto parsed = parse_dtype(s);
        if (!parsed)
          f_.malformed(where(), "unknown dtype '", detail::clip(s),
                       "' (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
        info_.dtype = *parsed;
        return true;
      }
      return value("a string");
    }
    bool binary(json::binary_t&) { return value("binary data"); }
    bool start_object(std::size_t) {
      if (at_ == At::start) {
        at_ = At::top;
      } else if (at_ == At::top && name_ == "__metadata__") {
        at_ = At::metadata;
      } else if (at_ == At::top) {
        at_ = At::tensor;
        info_ = TensorInfo{};
        seen_ = 0;
      } else {
        return value("an object");
      }
      return true;
    }
    bool key(json::string_t& k) {
      if (at_ == At::top) {
        if (k.empty()) f_.malformed("tensor name must not be empty");
        const bool metadata = k == "__metadata__";
        if (metadata ? seen_metadata_ : !f_.index_.emplace(k, 0).second)
          f_.malformed("tensor name '", detail::clip(k), "' appears more than once in the header");
        seen_metadata_ = seen_metadata_ || metadata;
        name_ = std::move(k);
      } else if (at_ == At::metadata) {
        key_ = std::move(k);
      } else {  // At::tensor
        constexpr std::string_view fields[] = {"dtype", "shape", "data_offsets"};
        const auto it = std::find(std::begin(fields), std::end(fields), k);
        if (it == std::end(fields))
          f_.malformed(where(), "unknown field '", detail::clip(k), "' (expected dtype, shape, data_offsets)");
        const unsigned bit = 1u << (it - std::begin(fields));
        if ((seen_ & bit) != 0) f_.malformed(where(), "key '", k, "' appears more than once");
        seen_ |= bit;
        field_ = static_cast<Field>(it - std::begin(fields));
      }
      return true;
    }
    bool end_object() {
      if (at_ == At::top) {
        at_ = At::done;
      } else if (at_ == At::metadata) {
        at_ = At::top;
      } else {  // At::tensor
        for (unsigned i = 0; i < 3; ++i)
          if ((seen_ & (1u << i)) == 0)
            f_.malformed(where(), "missing field '", i == 0 ? "dtype" : i == 1 ? "shape" : "data_offsets", "'");
        f_.check_info(name_, info_, data_size_);
        f_.entries_.emplace_back(std::move(name_), std::move(info_));
        at_ = At::top;
      }
      return true;
    }
    bool start_array(std::size_t) {
      if (at_ == At::tensor && field_ == Field::shape) {
        at_ = At::shape;
      } else if (at_ == At::tensor && field_ == Field::offsets) {
        at_ = At::offsets;
        offsets_ = 0;
      } else {
        return value("an array");
      }
      return true;
    }
    bool end_array() {
      if (at_ == At::offsets && offsets_ != 2)
        f_.malformed(where(), "data_offsets must be two non-negative integers [begin, end], got ", offsets_, " values");
      at_ = At::tensor;
      return true;
    }
    bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) {
      // nlohmann's message quotes the last token, which may be megabytes long.
      f_.malformed("header is not valid JSON at byte ", position, ": ", detail::clip(e.what(), 200));
    }

   private:
    enum class At { start, top, metadata, tensor, shape, offsets, done };
    enum class Field { dtype, shape, offsets };

    std::string where() const { return "tensor '" + detail::clip(name_) + "': "; }

    // A value that does not fit the schema where it appears; `got` describes it, never unbounded.
    bool value(std::string_view got) {
      const std::string g = detail::clip(got);
      switch (at_) {
        case At::start: f_.malformed("header must be a JSON object, got ", g);
        case At::top:
          if (name_ == "__metadata__") f_.malformed("__metadata__ must be a JSON object, got ", g);
          f_.malformed(where(), "entry must be a JSON object, got ", g);
        case At::metadata: f_.malformed("__metadata__['", detail::clip(key_), "'] must be a string, got ", g);
        case At::shape:
          f_.malformed(where(), "shape[", info_.shape.size(), "] must be an integer in [0, 2^63), got ", g);
        case At::offsets:
          f_.malformed(where(), "data_offsets must be two non-negative integers [begin, end], got ", g, " at [",
                       offsets_, "]");
        case At::tensor:
          if (field_ == Field::dtype) f_.malformed(where(), "dtype must be a string, got ", g);
          if (field_ == Field::shape) f_.malformed(where(), "shape must be an array, got ", g);
          f_.malformed(where(), "data_offsets must be two non-negative integers [begin, end], got ", g);
        case At::done: break;
      }
      f_.malformed("header is not valid JSON: a value after the top-level object");
    }

    SafetensorsFile& f_;
    std::uint64_t data_size_;
    At at_ = At::start;
    Field field_ = Field::dtype;
    std::string name_, key_;
    TensorInfo info_;
    unsigned seen_ = 0;  // fields of the current tensor, one bit each
    bool seen_metadata_ = false;
    std::size_t offsets_ = 0;
  };

  void check_info(const std::string& name, const TensorInfo& info, std::uint64_t data_size) const {
    const std::string where = "tensor '" + detail::clip(name) + "': ";
    if (info.begin > info.end)
      malformed(where, "data_offsets ", detail::format_range(info.begin, info.end), " must have begin <= end");
    if (info.end > data_size)
      malformed(where, "data_offsets ", detail::format_range(info.begin, info.end), " run past the data buffer of ",
                data_size, " bytes");
    const auto bytes = detail::checked_bytes(info.shape, dtype_size(info.dtype));
    if (!bytes)
      malformed(where, "shape ", detail::format_shape(info.shape), " of ", info.dtype,
                " has more bytes than index_t can count");
    if (info.end - info.begin != *bytes)
      malformed(where, "data_offsets ", detail::format_range(info.begin, info.end), " hold ", info.end - info.begin,
                " bytes, but dtype ", info.dtype, " x shape ", detail::format_shape(info.shape), " needs ", *bytes);
  }

  std::vector<std::uint8_t> bytes_;
  std::string source_;
  std::uint64_t data_begin_ = 0;
  std::vector<std::pair<std::string, TensorInfo>> entries_;  // sorted by data offset
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string, std::less<>> metadata_;
};

class SafetensorsWriter {
 public:
  // Copies `t` (of its own shape, a 0-d scalar when the shape is []) into the file under `name`.
  template <NativeScalar T>
  void add(std::string name, const Tensor<T>& t) {
    const std::size_t at = begin_entry(name, dtype_of<T>::value, t.shape(), t.size() * index_t(sizeof(T)));
    for (index_t k = 0; k < t.size(); ++k) detail::store_le<T>(t[k], data_.data() + at + k * index_t(sizeof(T)));
  }

  // Adds already-encoded little-endian data (e.g. F16 or BF16 bits) of the given dtype and shape.
  void add_raw(std::string name, Dtype dtype, std::vector<index_t> shape, std::span<const std::uint8_t> bytes) {
    for (index_t d : shape)
      if (d < 0)
        fail("SafetensorsWriter: tensor '", name, "' shape ", detail::format_shape(shape), " has a negative dimension");
    const auto need = detail::checked_bytes(shape, dtype_size(dtype));
    if (!need || *need != bytes.size())
      fail("SafetensorsWriter: tensor '", name, "' bytes must be ", need ? *need : 0, " for dtype ", dtype, " x shape ",
           detail::format_shape(shape), ", got ", bytes.size());
    if (dtype == Dtype::boolean)
      for (std::size_t k = 0; k < bytes.size(); ++k)
        if (bytes[k] > 1)
          fail("SafetensorsWriter: BOOL tensor '", name, "' byte ", k, " must be 0 or 1, got ", int(bytes[k]));
    const std::size_t at = begin_entry(name, dtype, shape, static_cast<index_t>(bytes.size()));
    std::copy(bytes.begin(), bytes.end(), data_.begin() + static_cast<std::ptrdiff_t>(at));
  }

  void set_metadata(std::string key, std::string value) {
    check_utf8("metadata key", key);
    check_utf8("metadata value", value);
    metadata_[std::move(key)] = std::move(value);
  }

  bool contains(std::string_view name) const { return names_.find(name) != names_.end(); }

  // The complete file.
  std::vector<std::uint8_t> bytes() const {
    // Written as text (what nlohmann's dump() of the same object gives): an ordered_json object
    // looks keys up by a linear scan, which made 10^5 names quadratic.
    // Appends only: GCC 12 reports false -Wrestrict for `"literal" + std::string` at -O3.
    std::string text = "{";
    const auto key = [&](const std::string& k) {
      if (text.size() > 1 && text.back() != '{') text += ',';
      text += nlohmann::json(k).dump();
      text += ':';
    };
    if (!metadata_.empty()) {
      key("__metadata__");
      text += '{';
      for (const auto& [k, v] : metadata_) {
        key(k);
        text += nlohmann::json(v).dump();
      }
      text += '}';
    }
    for (const auto& e : entries_) {
      key(e.name);
      text += "{\"dtype\":\"";
      text += dtype_name(e.dtype);
      text += "\",\"shape\":[";
      for (std::size_t i = 0; i < e.shape.size(); ++i) {
        if (i > 0) text += ',';
        text += std::to_string(e.shape[i]);
      }
      text += "],\"data_offsets\":[";
      text += std::to_string(e.begin);
      text += ',';
      text += std::to_string(e.end);
      text += "]}";
    }
    text += "}";
    text.append((8 - text.size() % 8) % 8, ' ');  // pad so the data buffer starts 8-byte aligned
    std::vector<std::uint8_t> out(8 + text.size() + data_.size());
    detail::store_le<std::uint64_t>(text.size(), out.data());
    std::copy(text.begin(), text.end(), out.begin() + 8);
    std::copy(data_.begin(), data_.end(), out.begin() + 8 + static_cast<std::ptrdiff_t>(text.size()));
    return out;
  }

  void save(const std::filesystem::path& path) const {
    const auto file = bytes();
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) fail("SafetensorsWriter: cannot open '", path.string(), "' for writing");
    out.write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(file.size()));
    out.close();
    if (!out) fail("SafetensorsWriter: error while writing '", path.string(), "'");
  }

 private:
  struct Entry {
    std::string name;
    Dtype dtype;
    std::vector<index_t> shape;
    std::uint64_t begin, end;
  };

  static void check_utf8(const char* what, const std::string& s) {
    try {
      (void)nlohmann::json(s).dump();
    } catch (const nlohmann::json::type_error&) {
      fail("SafetensorsWriter: ", what, " '", s, "' is not valid UTF-8");
    }
  }

  // Registers the entry and grows the data buffer; returns where its bytes go.
  std::size_t begin_entry(const std::string& name, Dtype dtype, const std::vector<index_t>& shape, index_t bytes) {
    if (name.empty()) fail("SafetensorsWriter: tensor name must not be empty");
    if (name == "__metadata__") fail("SafetensorsWriter: tensor name '__metadata__' is reserved for the metadata");
    if (contains(name)) fail("SafetensorsWriter: tensor name '", name, "' was already added");
    check_utf8("tensor name", name);
    const std::size_t at = data_.size();
    data_.resize(at + static_cast<std::size_t>(bytes));
    entries_.push_back({name, dtype, shape, at, at + static_cast<std::uint64_t>(bytes)});
    names_.insert(name);
    return at;
  }

  std::vector<Entry> entries_;
  std::set<std::string, std::less<>> names_;  // a duplicate found in log time, not by a scan
  std::vector<std::uint8_t> data_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace smoe::io
