#pragma once
// A balance loss: the load-balancing loss computed per sequence and averaged over sequences, so
// that every sequence, not only the batch, spreads its tokens (as DeepSeek-V3's sequence-wise
// auxiliary loss, here on softmax probabilities of the router logits).
#include <cmath>
#include <vector>

#include <smoe/core/error.hpp>
#include <smoe/routing/routing.hpp>

namespace extending {

// example-begin loss
// Tokens are Q sequences of S consecutive rows. For sequence q, expert e:
//   f_qe = (1/S) Σ_{t∈q} #{j : ids[t, j] = e}   (non-differentiable: what the router chose)
//   P_qe = (1/S) Σ_{t∈q} softmax(logits[t])_e
//   L = (1/Q) Σ_q (E/K) Σ_e f_qe P_qe            (= 1 when every sequence is balanced)
template <class T>
struct SequenceBalanceLoss {
  using scalar_type = T;
  double coef;             // MoE<> adds coef · L to the aux loss; backward includes coef
  smoe::index_t sequence;  // S

  SequenceBalanceLoss(double coefficient, smoe::index_t sequence_length)
      : coef(coefficient), sequence(sequence_length) {}

  T forward(const smoe::Routing<T>& r, smoe::index_t E) {
    const smoe::index_t tokens = r.tokens(), K = r.k();
    if (sequence < 1 || tokens % sequence != 0)
      smoe::fail("SequenceBalanceLoss: tokens (", tokens, ") must be a multiple of sequence (", sequence, ")");
    smoe::expect_equal("SequenceBalanceLoss", "router logits per token", E, r.logits.rank() == 2 ? r.logits.dim(1) : 0);
    p_.assign(static_cast<std::size_t>(tokens * E), T(0));
    f_.assign(static_cast<std::size_t>(tokens / sequence * E), T(0));
    for (smoe::index_t t = 0; t < tokens; ++t) {  // p = softmax(logits[t])
      const T* s = r.logits.data() + t * E;
      T* p = p_.data() + t * E;
      T m = s[0], z = 0;
      for (smoe::index_t e = 1; e < E; ++e) m = std::max(m, s[e]);
      for (smoe::index_t e = 0; e < E; ++e) z += p[e] = std::exp(s[e] - m);
      for (smoe::index_t e = 0; e < E; ++e) p[e] /= z;
      for (smoe::index_t j = 0; j < K; ++j)
        if (const auto e = r.experts.data()[t * K + j]; e >= 0) f_[t / sequence * E + e] += T(1) / T(sequence);
    }
    T loss = 0;
    for (smoe::index_t t = 0; t < tokens; ++t)
      for (smoe::index_t e = 0; e < E; ++e) loss += f_[t / sequence * E + e] * p_[t * E + e];
    return tokens == 0 ? T(0) : loss * T(E) / T(K) / T(sequence) / T(tokens / sequence);
  }

  // ∂L/∂s_tj = (E/K) / (Q·S) · p_tj (f_qj − Σ_e f_qe p_te): added into d_logits; d_gates untouched.
  void backward(const smoe::Routing<T>& r, smoe::index_t E, smoe::MatrixView<T> d_logits, smoe::MatrixView<T>) const {
    const smoe::index_t tokens = r.tokens();
    if (tokens == 0) return;
    const T scale = T(coef) * T(E) / T(r.k()) / T(tokens);
    for (smoe::index_t t = 0; t < tokens; ++t) {
      const T* p = p_.data() + t * E;
      const T* f = f_.data() + t / sequence * E;
      T fp = 0;
      for (smoe::index_t e = 0; e < E; ++e) fp += f[e] * p[e];
      for (smoe::index_t e = 0; e < E; ++e) d_logits(t, e) += scale * p[e] * (f[e] - fp);
    }
  }

 private:
  std::vector<T> p_, f_;  // from forward: softmax rows [T, E] and per-sequence fractions [Q, E]
};
// example-end loss

}  // namespace extending
