// Negative-compile cases for the concept checkers (tests/concept_errors/check.cmake): each
// SMOE_CASE is a user type that does not fit one concept, and must fail to compile with a first
// error line naming the concept and the member. SMOE_CASE = 0 is the control: it compiles.
#include <smoe/layers/moe.hpp>
#include <smoe/losses/switch_balance.hpp>
#include <smoe/routing/softmax_topk.hpp>

using namespace smoe;
using T = double;

// Parts that fit, for the cases about the other parts.
using GoodRouter = SoftmaxTopK<T>;
struct GoodExperts {
  using scalar_type = T;
  index_t experts() const { return 4; }
  index_t d_model() const { return 3; }
  void forward(ConstMatrixView<T>, const Dispatch<T>&, MatrixView<T>) {}
  void backward(ConstMatrixView<T>, const Dispatch<T>&, ConstMatrixView<T>, MatrixView<T>) {}
  template <class F>
  void for_each_parameter(F&&) {}
};

struct RouterBase {
  using scalar_type = T;
  index_t experts() const { return 4; }
  index_t k() const { return 1; }
  index_t d_model() const { return 3; }
};

#if SMOE_CASE == 1  // no scalar_type
struct BadRouter {
  index_t experts() const { return 4; }
};
#elif SMOE_CASE == 2  // no backward
struct BadRouter : RouterBase {
  void forward(ConstMatrixView<T>, Routing<T>&, Mode) {}
};
#elif SMOE_CASE == 3  // forward with the wrong Routing type
struct BadRouter : RouterBase {
  void forward(ConstMatrixView<T>, Routing<float>&, Mode) {}
  void backward(ConstMatrixView<T>, const Routing<T>&, ConstMatrixView<T>, MatrixView<T>, MatrixView<T>) {}
};
#else
using BadRouter = GoodRouter;
#endif

#if SMOE_CASE == 4  // experts without d_model()
struct BadExperts {
  using scalar_type = T;
  index_t experts() const { return 4; }
  void forward(ConstMatrixView<T>, const Dispatch<T>&, MatrixView<T>) {}
  void backward(ConstMatrixView<T>, const Dispatch<T>&, ConstMatrixView<T>, MatrixView<T>) {}
  template <class F>
  void for_each_parameter(F&&) {}
};
#else
using BadExperts = GoodExperts;
#endif

#if SMOE_CASE == 5  // combiner without backward
struct BadCombiner {
  using scalar_type = T;
  void forward(const Dispatch<T>&, ConstMatrixView<T>, MatrixView<T>) {}
};
#elif SMOE_CASE == 6  // combiner of another scalar type
using BadCombiner = WeightedSum<float>;
#else
using BadCombiner = WeightedSum<T>;
#endif

#if SMOE_CASE == 7  // loss without coef
struct BadLoss {
  using scalar_type = T;
  T forward(const Routing<T>&, index_t) { return 0; }
  void backward(const Routing<T>&, index_t, MatrixView<T>, MatrixView<T>) {}
};
#else
using BadLoss = SwitchBalanceLoss<T>;
#endif

#if SMOE_CASE == 8  // gate policy whose backward is not const
struct BadGate {
  void forward(const T*, index_t, const std::int32_t*, index_t, T*) const {}
  void backward(const T*, index_t, const std::int32_t*, index_t, const T*, const T*, T*) {}
};
#else
using BadGate = SoftmaxGate;
#endif

#if SMOE_CASE == 9  // class template argument deduction, as users write it: a router without backward
struct DeducedRouter : RouterBase {
  void forward(ConstMatrixView<T>, Routing<T>&, Mode) {}
};
[[maybe_unused]] void deduced() { MoE layer(DeducedRouter{}, GoodExperts{}); }
#endif

int main() {
  using Layer = MoE<BadRouter, BadExperts, BadCombiner, BadLoss>;
  [[maybe_unused]] Layer* layer = nullptr;
  [[maybe_unused]] TopKRouter<T, BadGate>* router = nullptr;
  return sizeof(Layer) > 0 && sizeof(TopKRouter<T, BadGate>) > 0 ? 0 : 1;
}
