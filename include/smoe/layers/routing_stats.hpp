#pragma once
// Routing statistics of one forward, for logging expert usage in training loops:
//   tokens per expert, assignments dropped by capacity, tokens with no expert, the entropy of the
//   mean routing distribution, and the coefficient of variation of the load.
// The mean routing distribution is mean_t softmax(logits_t) when the router has logits (what the
// balance losses see), else the normalized load; its entropy is in nats, at most log E.
#include <cmath>
#include <cstdint>
#include <ostream>
#include <vector>

#include "smoe/core/dispatch.hpp"
#include "smoe/losses/balance_loss.hpp"
#include "smoe/routing/routing.hpp"

namespace smoe {

struct RoutingStats {
  std::vector<index_t> tokens_per_expert;  // assignments per expert
  index_t assignments = 0;                 // non-empty (token, k) assignments
  index_t dropped = 0;                     // assignments removed by a capacity limit
  double fraction_dropped = 0.0;           // dropped / (assignments + dropped), 0 when nothing was routed
  index_t tokens_without_expert = 0;       // tokens with no assignment at all (their output is 0)
  double routing_entropy = 0.0;            // entropy of the mean routing distribution (nats)
  double load_cv = 0.0;                    // std / mean of tokens_per_expert (population), 0 if mean is 0
};

template <class T>
RoutingStats compute_routing_stats(const Routing<T>& r, const Dispatch<T>& dispatch) {
  RoutingStats s;
  const index_t E = dispatch.experts, tokens = dispatch.tokens;
  s.tokens_per_expert.resize(static_cast<std::size_t>(E));
  for (index_t e = 0; e < E; ++e) s.tokens_per_expert[e] = dispatch.count(e);
  s.assignments = dispatch.assignments();
  s.dropped = r.dropped;
  s.fraction_dropped = s.assignments + s.dropped == 0 ? 0.0 : double(s.dropped) / double(s.assignments + s.dropped);
  for (index_t t = 0; t < tokens; ++t) {
    bool any = false;
    for (index_t j = 0; j < dispatch.k && !any; ++j) any = dispatch.slot(t, j) >= 0;
    s.tokens_without_expert += any ? 0 : 1;
  }
  std::vector<double> p(static_cast<std::size_t>(E), 0.0);
  const bool has_logits = r.logits.rank() == 2 && r.logits.dim(1) == E && tokens > 0;
  if (has_logits) {
    std::vector<T> lse;
    const std::vector<T> sums = detail::softmax_column_sums(r.logits, E, lse);
    for (index_t e = 0; e < E; ++e) p[e] = double(sums[e]) / double(tokens);
  } else if (s.assignments > 0) {
    for (index_t e = 0; e < E; ++e) p[e] = double(s.tokens_per_expert[e]) / double(s.assignments);
  }
  for (double v : p)
    if (v > 0) s.routing_entropy -= v * std::log(v);
  double mean = double(s.assignments) / double(E), var = 0;
  for (index_t c : s.tokens_per_expert) var += (double(c) - mean) * (double(c) - mean) / double(E);
  s.load_cv = mean > 0 ? std::sqrt(var) / mean : 0.0;
  return s;
}

// A human-readable table: one line of summary, then one row per expert.
inline void print_routing_stats(std::ostream& out, const RoutingStats& s) {
  out << "assignments " << s.assignments << ", dropped " << s.dropped << " (" << 100.0 * s.fraction_dropped
      << "%), tokens without expert " << s.tokens_without_expert << ", routing entropy " << s.routing_entropy
      << " nats, load CV " << s.load_cv << "\n";
  out << "expert  tokens  share\n";
  for (std::size_t e = 0; e < s.tokens_per_expert.size(); ++e)
    out << e << "  " << s.tokens_per_expert[e] << "  "
        << (s.assignments ? double(s.tokens_per_expert[e]) / double(s.assignments) : 0.0) << "\n";
}

// CSV for training logs: write_routing_stats_csv_header once, then one row per logged step.
inline void write_routing_stats_csv_header(std::ostream& out, index_t experts) {
  out << "step,layer,assignments,dropped,fraction_dropped,tokens_without_expert,routing_entropy,load_cv";
  for (index_t e = 0; e < experts; ++e) out << ",expert_" << e;
  out << "\n";
}
inline void write_routing_stats_csv_row(std::ostream& out, std::int64_t step, int layer, const RoutingStats& s) {
  out << step << "," << layer << "," << s.assignments << "," << s.dropped << "," << s.fraction_dropped << ","
      << s.tokens_without_expert << "," << s.routing_entropy << "," << s.load_cv;
  for (index_t c : s.tokens_per_expert) out << "," << c;
  out << "\n";
}

}  // namespace smoe
