#pragma once
// Rotary position embedding (RoPE; Su et al. 2021, "RoFormer"), half-split pairing as in
// GPT-NeoX and LLaMA in Hugging Face transformers ("rotate_half"): dimension i is paired with
// i + h, h = d_head / 2 (not the interleaved pairs (2i, 2i+1) of the paper and of Meta's LLaMA).
// For position p and i < h, θ_i = base^(−2i / d_head) and a = p·θ_i:
//   x'_i     = x_i · cos a − x_{i+h} · sin a
//   x'_{i+h} = x_{i+h} · cos a + x_i · sin a
// A rotation is orthogonal, so the backward is the rotation by −a. Angles and their cos/sin are
// computed in double, then stored as T.
#include <cmath>

#include "smoe/core/tensor.hpp"

namespace smoe {

// The rotation angle p·θ_i of pair i at position p, in double; shared with the device build of the
// table (cuda/attention.cuh) so both sides round the same values to T.
SMOE_HOST_DEVICE double rope_angle(double base, index_t d_head, index_t i, index_t p) {
  using std::pow;
  return double(p) * pow(base, -2.0 * double(i) / double(d_head));
}

// Rotates the pair (a, b) = (x_i, x_{i+h}) by the angle with cosine c and sine s; back = the
// inverse rotation (the backward).
template <class T>
SMOE_HOST_DEVICE void rope_rotate_pair(T& a, T& b, T c, T s, bool back) {
  const T x = a, y = b;
  if (back) {
    a = x * c + y * s;
    b = y * c - x * s;
  } else {
    a = x * c - y * s;
    b = y * c + x * s;
  }
}

template <class T>
class RotaryTable {
 public:
  // Tables for positions first, first + 1, ..., first + count − 1 of heads of size d_head (even).
  void build(index_t d_head, double base, index_t first, index_t count) {
    const char* ctx = "RotaryTable";
    if (d_head < 2 || d_head % 2 != 0) fail(ctx, ": d_head must be even and >= 2 for RoPE, got ", d_head);
    if (!(base > 0) || !std::isfinite(base)) fail(ctx, ": base must be finite and > 0, got ", base);
    if (first < 0) fail(ctx, ": first position must be >= 0, got ", first);
    if (count < 0) fail(ctx, ": count must be >= 0, got ", count);
    half_ = d_head / 2;
    cos_.resize({count, half_});
    sin_.resize({count, half_});
    for (index_t i = 0; i < half_; ++i) {
      for (index_t p = 0; p < count; ++p) {
        const double a = rope_angle(base, d_head, i, first + p);
        cos_[p * half_ + i] = T(std::cos(a));
        sin_[p * half_ + i] = T(std::sin(a));
      }
    }
  }

  index_t half() const { return half_; }
  index_t positions() const { return cos_.rank() == 2 ? cos_.dim(0) : 0; }

  // Rotates one head vector v [d_head] in place by the angles of table row p.
  void rotate(T* v, index_t p) const {
    const T* c = cos_.data() + p * half_;
    const T* s = sin_.data() + p * half_;
    for (index_t i = 0; i < half_; ++i) rope_rotate_pair(v[i], v[i + half_], c[i], s[i], false);
  }

  // The transpose (inverse) rotation: maps the gradient of rotate's output to that of its input.
  void rotate_back(T* v, index_t p) const {
    const T* c = cos_.data() + p * half_;
    const T* s = sin_.data() + p * half_;
    for (index_t i = 0; i < half_; ++i) rope_rotate_pair(v[i], v[i + half_], c[i], s[i], true);
  }

 private:
  index_t half_ = 0;
  Tensor<T> cos_, sin_;  // [positions, d_head / 2]
};

}  // namespace smoe
