#pragma once
// The balance losses on the device, with the CPU's formulas (losses/*.hpp): Switch load balance,
// router z-loss, the sigma-MoE entropy regularizer and the importance loss. Each forward writes its
// value (without the coefficient) to a device scalar, so the layer never waits for the GPU; each
// backward adds coef · ∂L into d_logits / d_gates like the CPU's. Reductions over tokens run in
// fixed blocks of 256 tokens, then over the blocks in order (as the CPU's): deterministic.
// They run on the stream of the routing they read.
#include <cmath>
#include <cstdint>
#include <limits>

#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/topk.cuh"
#include "smoe/losses/entropy.hpp"
#include "smoe/losses/importance.hpp"
#include "smoe/losses/switch_balance.hpp"
#include "smoe/losses/z_loss.hpp"

namespace smoe {

namespace cuda_kernels {

inline constexpr index_t loss_token_block = 256;

// lse[t] = log Σ_e exp(s[t, e]); a row whose max is not finite gets that max (as the CPU).
template <class G>
struct RowLogSumExp {
  const G* s;
  index_t E;
  G* lse;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    using std::exp, std::log, std::isfinite;
    const G* row = s + t * E;
    G m = row[0];
    for (index_t e = 1; e < E; ++e) m = m < row[e] ? row[e] : m;
    if (!isfinite(m)) {
      lse[t] = m;
      return;
    }
    G z = 0;
    for (index_t e = 0; e < E; ++e) z += exp(row[e] - m);
    lse[t] = m + log(z);
  }
};

// partial[b, e] = Σ_{t in block b} f(t, e), in token order.
template <class G, class F>
struct BlockColumnSums {
  F f;
  index_t tokens, E;
  G* partial;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t b = i / E, e = i % E;
    const index_t end = (b + 1) * loss_token_block < tokens ? (b + 1) * loss_token_block : tokens;
    G sum = 0;
    for (index_t t = b * loss_token_block; t < end; ++t) sum += f(t, e);
    partial[i] = sum;
  }
};

// total[e] = Σ_b partial[b, e], in block order.
template <class G>
struct SumBlocks {
  const G* partial;
  index_t blocks, E;
  G* total;
  SMOE_HOST_DEVICE void operator()(index_t e) const {
    G sum = 0;
    for (index_t b = 0; b < blocks; ++b) sum += partial[b * E + e];
    total[e] = sum;
  }
};

// softmax(s[t])_e from the row's lse.
template <class G>
struct SoftmaxAt {
  const G* s;
  const G* lse;
  index_t E;
  SMOE_HOST_DEVICE G operator()(index_t t, index_t e) const {
    using std::exp;
    return exp(s[t * E + e] - lse[t]);
  }
};

template <class G>
struct ConstantAt {  // lse[t]² summed as a column: the z-loss
  const G* lse;
  SMOE_HOST_DEVICE G operator()(index_t t, index_t) const { return lse[t] * lse[t]; }
};

// Σ_t f(t, e) per e, blocked: partial [blocks, E] scratch, total [E].
template <class G, class F>
void column_sums(cuda_stream stream, F f, index_t tokens, index_t E, Tensor<G, cuda>& partial, Tensor<G, cuda>& total) {
  const index_t blocks = tokens == 0 ? 0 : (tokens + loss_token_block - 1) / loss_token_block;
  partial.resize({blocks, E});
  total.resize({E});
  for_each_index(stream, blocks * E, BlockColumnSums<G, F>{f, tokens, E, partial.data()});
  for_each_index(stream, E, SumBlocks<G>{partial.data(), blocks, E, total.data()});
}

// Runs f() once on the device: the scalar tail of a loss (a few E-sized loops).
template <class F>
struct Once {
  F f;
  SMOE_HOST_DEVICE void operator()(index_t) const { f(); }
};
template <class F>
void run_once(cuda_stream stream, const F& f) {
  for_each_index(stream, 1, Once<F>{f});
}

template <class G>
void expect_logits(const char* context, const Routing<G, cuda>& r, index_t experts) {
  if (r.logits.rank() != 2 || r.logits.dim(0) != r.tokens() || r.logits.dim(1) != experts)
    fail(context, ": needs router logits [", r.tokens(), ", ", experts, "]; this router provides ",
         r.logits.rank() == 2 ? r.logits.dim(1) : 0, " logits per token");
}

}  // namespace cuda_kernels

// ---------------------------------------------------------------------------------------------
// sigma-MoE entropy: L = Σ_e p_e log p_e, p = mean_t softmax(s_t); log space for an expert whose
// column sum underflows (losses/entropy.hpp).
template <class G>
struct EntropyLoss<G, cuda> {
  using scalar_type = G;
  using backend = cuda;
  static constexpr const char* name = "EntropyLoss<cuda>";
  double coef;

  explicit EntropyLoss(double coefficient = 0.001) : coef(coefficient) {}

  struct Tail {
    const G* s;
    const G* lse;
    const G* column_sums;
    G* log_p;
    G* value;
    index_t tokens, E;
    SMOE_HOST_DEVICE void operator()() const {
      using std::exp, std::log, std::isfinite;
      const G neg_inf = -std::numeric_limits<G>::infinity();
      const G tiny = std::numeric_limits<G>::min() / std::numeric_limits<G>::epsilon();
      G loss = 0;
      for (index_t e = 0; e < E; ++e) {
        if (tokens == 0) {
          log_p[e] = neg_inf;
          continue;
        }
        if (column_sums[e] > tiny) {
          log_p[e] = log(column_sums[e]) - log(G(tokens));
        } else {
          G m = neg_inf, sum = 0;
          for (index_t t = 0; t < tokens; ++t) {
            const G z = s[t * E + e] - lse[t];
            if (!(z > neg_inf)) continue;
            const G nm = m > z ? m : z;
            sum = (m > neg_inf ? sum * exp(m - nm) : G(0)) + exp(z - nm);
            m = nm;
          }
          log_p[e] = m > neg_inf ? m + log(sum) - log(G(tokens)) : neg_inf;
        }
        if (isfinite(log_p[e])) loss += exp(log_p[e]) * log_p[e];
      }
      *value = loss;
    }
  };

  void forward(const Routing<G, cuda>& r, index_t E, G* value) {
    using namespace cuda_kernels;
    cuda_kernels::expect_logits(name, r, E);
    const cuda_stream stream = r.logits.stream();
    const index_t tokens = r.tokens();
    for (auto* t : {&lse_, &partial_, &sums_, &log_p_}) t->set_stream(stream);
    lse_.resize({tokens});
    log_p_.resize({E});
    for_each_index(stream, tokens, RowLogSumExp<G>{r.logits.data(), E, lse_.data()});
    column_sums(stream, SoftmaxAt<G>{r.logits.data(), lse_.data(), E}, tokens, E, partial_, sums_);
    run_once(stream, Tail{r.logits.data(), lse_.data(), sums_.data(), log_p_.data(), value, tokens, E});
  }

  struct Backward {
    const G* s;
    const G* lse;
    const G* log_p;
    G* d_logits;
    index_t stride, E;
    G scale;
    SMOE_HOST_DEVICE void operator()(index_t t) const {
      using std::exp, std::isfinite;
      G mean = 0;
      for (index_t e = 0; e < E; ++e) {
        const G lp = isfinite(log_p[e]) ? log_p[e] : G(0);
        mean += exp(s[t * E + e] - lse[t]) * lp;
      }
      for (index_t e = 0; e < E; ++e) {
        const G lp = isfinite(log_p[e]) ? log_p[e] : G(0);
        d_logits[t * stride + e] += scale * exp(s[t * E + e] - lse[t]) * (lp - mean);
      }
    }
  };

  void backward(const Routing<G, cuda>& r, index_t E, MatrixView<G, cuda> d_logits, MatrixView<G, cuda>) const {
    const index_t tokens = r.tokens();
    if (tokens == 0) return;
    expect_equal(name, "tokens of backward (= tokens of the last forward)", lse_.size(), tokens);
    cuda_kernels::for_each_index(r.logits.stream(), tokens,
                                 Backward{r.logits.data(), lse_.data(), log_p_.data(), d_logits.data, d_logits.stride, E,
                                          G(coef) / G(tokens)});
  }

 private:
  Tensor<G, cuda> lse_, partial_, sums_, log_p_;
};

// ---------------------------------------------------------------------------------------------
// Switch load balance: L = E · Σ_e f_e · P_e, f_e = share of tokens whose argmax is e
// (ties to the smaller id), P_e = mean_t softmax(s_t)_e (losses/switch_balance.hpp).
template <class G>
struct SwitchBalanceLoss<G, cuda> {
  using scalar_type = G;
  using backend = cuda;
  static constexpr const char* name = "SwitchBalanceLoss<cuda>";
  double coef;

  explicit SwitchBalanceLoss(double coefficient = 0.01) : coef(coefficient) {}

  struct TopOne {
    const G* s;
    index_t E;
    std::int32_t* top;
    SMOE_HOST_DEVICE void operator()(index_t t) const { cuda_kernels::topk_row(s + t * E, E, 1, top + t, cuda_kernels::NotRemoved{}); }
  };
  struct IsTop {  // 1 where token t's argmax is e: summed per column, the dispatch counts
    const std::int32_t* top;
    SMOE_HOST_DEVICE G operator()(index_t t, index_t e) const { return top[t] == e ? G(1) : G(0); }
  };
  struct Tail {
    const G* counts;
    const G* P;
    G* f;
    G* value;
    index_t tokens, E;
    SMOE_HOST_DEVICE void operator()() const {
      G loss = 0;
      for (index_t e = 0; e < E; ++e) {
        f[e] = tokens == 0 ? G(0) : counts[e] / G(tokens);
        if (tokens > 0) loss += f[e] * P[e] / G(tokens);
      }
      *value = G(E) * loss;
    }
  };

  void forward(const Routing<G, cuda>& r, index_t E, G* value) {
    using namespace cuda_kernels;
    cuda_kernels::expect_logits(name, r, E);
    const cuda_stream stream = r.logits.stream();
    const index_t tokens = r.tokens();
    for (auto* t : {&lse_, &partial_, &P_, &counts_, &f_}) t->set_stream(stream);
    top_.set_stream(stream);
    lse_.resize({tokens});
    top_.resize({tokens});
    f_.resize({E});
    for_each_index(stream, tokens, RowLogSumExp<G>{r.logits.data(), E, lse_.data()});
    for_each_index(stream, tokens, TopOne{r.logits.data(), E, top_.data()});
    column_sums(stream, SoftmaxAt<G>{r.logits.data(), lse_.data(), E}, tokens, E, partial_, P_);
    column_sums(stream, IsTop{top_.data()}, tokens, E, partial_, counts_);
    run_once(stream, Tail{counts_.data(), P_.data(), f_.data(), value, tokens, E});
  }

  struct Backward {
    const G* s;
    const G* lse;
    const G* f;
    G* d_logits;
    index_t stride, E;
    G scale;
    SMOE_HOST_DEVICE void operator()(index_t t) const {
      using std::exp;
      G fp = 0;
      for (index_t e = 0; e < E; ++e) fp += f[e] * exp(s[t * E + e] - lse[t]);
      for (index_t e = 0; e < E; ++e) d_logits[t * stride + e] += scale * exp(s[t * E + e] - lse[t]) * (f[e] - fp);
    }
  };

  void backward(const Routing<G, cuda>& r, index_t E, MatrixView<G, cuda> d_logits, MatrixView<G, cuda>) const {
    const index_t tokens = r.tokens();
    if (tokens == 0) return;
    expect_equal(name, "tokens of backward (= tokens of the last forward)", lse_.size(), tokens);
    cuda_kernels::for_each_index(r.logits.stream(), tokens,
                                 Backward{r.logits.data(), lse_.data(), f_.data(), d_logits.data, d_logits.stride, E,
                                          G(coef) * G(E) / G(tokens)});
  }

 private:
  Tensor<G, cuda> lse_, partial_, P_, counts_, f_;
  Tensor<std::int32_t, cuda> top_;
};

// ---------------------------------------------------------------------------------------------
// Router z-loss: L = mean_t (logsumexp_e s_te)² (losses/z_loss.hpp).
template <class G>
struct RouterZLoss<G, cuda> {
  using scalar_type = G;
  using backend = cuda;
  static constexpr const char* name = "RouterZLoss<cuda>";
  double coef;

  explicit RouterZLoss(double coefficient = 0.001) : coef(coefficient) {}

  struct Tail {
    const G* total;
    G* value;
    index_t tokens;
    SMOE_HOST_DEVICE void operator()() const { *value = tokens == 0 ? G(0) : total[0] / G(tokens); }
  };

  void forward(const Routing<G, cuda>& r, index_t E, G* value) {
    using namespace cuda_kernels;
    cuda_kernels::expect_logits(name, r, E);
    const cuda_stream stream = r.logits.stream();
    const index_t tokens = r.tokens();
    for (auto* t : {&lse_, &partial_, &total_}) t->set_stream(stream);
    lse_.resize({tokens});
    for_each_index(stream, tokens, RowLogSumExp<G>{r.logits.data(), E, lse_.data()});
    column_sums(stream, ConstantAt<G>{lse_.data()}, tokens, 1, partial_, total_);
    run_once(stream, Tail{total_.data(), value, tokens});
  }

  struct Backward {
    const G* s;
    const G* lse;
    G* d_logits;
    index_t stride, E;
    G scale;
    SMOE_HOST_DEVICE void operator()(index_t i) const {
      using std::exp;
      const index_t t = i / E, e = i % E;
      d_logits[t * stride + e] += scale * lse[t] * exp(s[i] - lse[t]);
    }
  };

  void backward(const Routing<G, cuda>& r, index_t E, MatrixView<G, cuda> d_logits, MatrixView<G, cuda>) const {
    const index_t tokens = r.tokens();
    if (tokens == 0) return;
    expect_equal(name, "tokens of backward (= tokens of the last forward)", lse_.size(), tokens);
    cuda_kernels::for_each_index(r.logits.stream(), tokens * E,
                                 Backward{r.logits.data(), lse_.data(), d_logits.data, d_logits.stride, E,
                                          G(coef) * G(2) / G(tokens)});
  }

 private:
  Tensor<G, cuda> lse_, partial_, total_;
};

// ---------------------------------------------------------------------------------------------
// Importance: L = CV(I)², I_e = Σ of the gates routed to e (losses/importance.hpp).
template <class G>
struct ImportanceLoss<G, cuda> {
  using scalar_type = G;
  using backend = cuda;
  static constexpr const char* name = "ImportanceLoss<cuda>";
  double coef;

  explicit ImportanceLoss(double coefficient = 0.1) : coef(coefficient) {}

  struct GateAt {  // token t's gate mass on expert e
    const std::int32_t* ids;
    const G* gates;
    index_t K;
    SMOE_HOST_DEVICE G operator()(index_t t, index_t e) const {
      G sum = 0;
      for (index_t j = 0; j < K; ++j)
        if (ids[t * K + j] == e) sum += gates[t * K + j];
      return sum;
    }
  };
  struct Tail {
    const G* importance;
    G* stats;  // mean, var
    G* value;
    index_t E;
    SMOE_HOST_DEVICE void operator()() const {
      G mean = 0, var = 0;
      for (index_t e = 0; e < E; ++e) mean += importance[e] / G(E);
      for (index_t e = 0; e < E; ++e) var += (importance[e] - mean) * (importance[e] - mean) / G(E);
      stats[0] = mean;
      stats[1] = var;
      *value = mean == G(0) ? G(0) : var / (mean * mean);
    }
  };

  void forward(const Routing<G, cuda>& r, index_t E, G* value) {
    using namespace cuda_kernels;
    const cuda_stream stream = r.gates.stream();
    for (auto* t : {&partial_, &importance_, &stats_}) t->set_stream(stream);
    stats_.resize({2});
    column_sums(stream, GateAt{r.experts.data(), r.gates.data(), r.k()}, r.tokens(), E, partial_, importance_);
    run_once(stream, Tail{importance_.data(), stats_.data(), value, E});
  }

  struct Backward {
    const std::int32_t* ids;
    const G* importance;
    const G* stats;
    G* d_gates;
    index_t stride, K, E;
    G coef;
    SMOE_HOST_DEVICE void operator()(index_t i) const {
      const G mean = stats[0], var = stats[1];
      const std::int32_t e = ids[i];
      if (mean == G(0) || e < 0 || e >= E) return;
      d_gates[(i / K) * stride + i % K] +=
          coef * G(2) / G(E) * ((importance[e] - mean) / (mean * mean) - var / (mean * mean * mean));
    }
  };

  void backward(const Routing<G, cuda>& r, index_t E, MatrixView<G, cuda>, MatrixView<G, cuda> d_gates) const {
    cuda_kernels::for_each_index(r.gates.stream(), r.tokens() * r.k(),
                                 Backward{r.experts.data(), importance_.data(), stats_.data(), d_gates.data,
                                          d_gates.stride, r.k(), E, G(coef)});
  }

 private:
  Tensor<G, cuda> partial_, importance_, stats_;
};

}  // namespace smoe
