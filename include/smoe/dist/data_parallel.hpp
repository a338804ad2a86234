#pragma once
// Data-parallel gradient reduction next to expert parallelism, and the global gradient norm.
//
// allreduce_gradients(model, comm) visits the model's parameters by name (for_each_parameter) and
// sums every replicated parameter's gradient over the ranks, then divides it by P (the average);
// parameters the model marks as not replicated are left exactly as they are:
//   GradientSharding::sharded  an expert shard (ExpertParallel's "experts.*"): its owner already
//                              holds the full gradient, from every rank's tokens
//   GradientSharding::reduced  reduced inside the layer's backward (ExpertParallel's router, whose
//                              gradient is summed over ranks there)
// A model marks its parameters with `GradientSharding sharding(std::string_view name) const`
// (ExpertParallel has it; a composite forwards it with its name prefixes); a model without it has
// only replicated parameters. All replicated gradients travel in one buffer, one all-reduce.
//
// Scale: ExpertParallel's gradients are those of the sum over ranks of each rank's objective.
// If each rank's loss is its local mean, the global mean is (1/P)·Σ_ranks and the expert and router
// gradients are P times those of the global mean; use Reduction::sum and normalize each rank's
// loss by the global token count instead, so every gradient is that of one global objective.
//
// grad_norm(model, comm) and clip_grad_norm(model, max_norm, comm) (train/clip.hpp's, over ranks):
// the L2 norm of the whole distributed model's gradient, call them after allreduce_gradients.
// Replicated and reduced gradients are then equal on every rank and count once; sharded ones are
// summed over the ranks (one all-reduce of a double; one more when squares overflow and the norm
// is measured again in a common unit, as train/clip.hpp does). Every rank gets the same norm and scale.
#include <cmath>
#include <span>
#include <string_view>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/dist/communicator.hpp"
#include "smoe/train/clip.hpp"

namespace smoe {

enum class Reduction { average, sum };

template <HasParameters M, Communicator Comm>
void allreduce_gradients(M& model, Comm& comm, Reduction reduction = Reduction::average) {
  using T = typename M::scalar_type;
  std::vector<T> buffer;
  model.for_each_parameter([&](std::string_view name, auto& p) {
    if (gradient_sharding(model, name) == GradientSharding::replicated)
      buffer.insert(buffer.end(), p.grad.data(), p.grad.data() + p.grad.size());
  });
  comm.all_reduce_sum(std::span<T>(buffer));  // every rank calls it, also with nothing replicated
  const T scale = reduction == Reduction::average ? T(1) / T(comm.size()) : T(1);
  std::size_t at = 0;
  model.for_each_parameter([&](std::string_view name, auto& p) {
    if (gradient_sharding(model, name) != GradientSharding::replicated) return;
    for (index_t i = 0; i < p.grad.size(); ++i) p.grad[i] = buffer[at++] * scale;
  });
}

template <HasParameters M, Communicator Comm>
double grad_norm(M& model, Comm& comm) {
  // [replicated and reduced: once, this rank's shards: summed over ranks], the squares of g / unit
  const auto sum = [&](double unit, double& largest) {
    double squares[2] = {0, 0};
    model.for_each_parameter([&](std::string_view name, auto& p) {
      const bool shard = gradient_sharding(model, name) == GradientSharding::sharded;
      gradient_ops_of<decltype(p.grad)>::sum_squares(p.grad, unit, squares[shard ? 1 : 0], largest);
    });
    comm.all_reduce_sum(std::span<double>(squares + 1, 1));
    return squares[0] + squares[1];
  };
  double largest = 0;
  const double squares = sum(1.0, largest);
  if (!std::isinf(squares)) return std::sqrt(squares);  // the same verdict on every rank
  // Only overflowed squares get here (as in train/clip.hpp): sum (g / u)² instead, u = Σ over ranks
  // of their largest |g| (>= the largest of all; infinite if any gradient is).
  double unit[1] = {largest};
  comm.all_reduce_sum(std::span<double>(unit));
  if (!std::isfinite(unit[0])) return squares;
  double unused = 0;
  return unit[0] * std::sqrt(sum(unit[0], unused));
}

template <HasParameters M, Communicator Comm>
[[nodiscard]] ClipResult clip_grad_norm(M& model, double max_norm, Comm& comm) {
  return detail::clip_to_norm(model, grad_norm(model, comm), max_norm);
}

}  // namespace smoe
