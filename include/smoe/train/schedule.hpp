#pragma once
// Cosine learning-rate schedule with linear warm-up (warm-up: Goyal et al. 2017; cosine decay:
// Loshchilov & Hutter 2017, "SGDR", without restarts). For step s = 0, 1, ... (the number of
// optimizer steps already taken, i.e. the index of the step about to use the rate):
//   lr(s) = peak · s / warmup                                                    s < warmup
//   lr(s) = min_lr + (peak − min_lr) · ½ · (1 + cos(π · (s − warmup) / (total − warmup)))
//                                                                                warmup <= s < total
//   lr(s) = min_lr                                                               s >= total
// So lr(0) = 0 when warmup > 0, lr(warmup) = peak, and the cosine reaches min_lr at s = total.
// With warmup = 0 the schedule starts at peak; with warmup = total it warms up and then drops to
// min_lr. The usual loop: optimizer.set_lr(schedule(step)); optimizer.step(model); ++step.
#include <cmath>
#include <cstdint>
#include <numbers>

#include "smoe/core/error.hpp"

namespace smoe {

struct CosineScheduleConfig {
  double peak_lr = 0;
  double min_lr = 0;
  std::uint64_t warmup_steps = 0;
  std::uint64_t total_steps = 0;  // where the cosine ends; >= warmup_steps and >= 1

  void validate(const char* context) const {
    if (!(peak_lr > 0.0) || !std::isfinite(peak_lr)) fail(context, ": peak_lr must be finite and > 0, got ", peak_lr);
    if (!(min_lr >= 0.0 && min_lr <= peak_lr))
      fail(context, ": min_lr must be in [0, peak_lr = ", peak_lr, "], got ", min_lr);
    if (total_steps < 1) fail(context, ": total_steps must be >= 1, got ", total_steps);
    if (warmup_steps > total_steps)
      fail(context, ": warmup_steps must be <= total_steps = ", total_steps, ", got ", warmup_steps);
  }
};

class CosineSchedule {
 public:
  static constexpr const char* name = "CosineSchedule";

  explicit CosineSchedule(CosineScheduleConfig config) : config_((config.validate(name), config)) {}

  const CosineScheduleConfig& config() const { return config_; }

  double operator()(std::uint64_t step) const {
    const auto& c = config_;
    if (step < c.warmup_steps) return c.peak_lr * double(step) / double(c.warmup_steps);
    if (step >= c.total_steps) return c.min_lr;
    const double progress = double(step - c.warmup_steps) / double(c.total_steps - c.warmup_steps);
    return c.min_lr + (c.peak_lr - c.min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  }

 private:
  CosineScheduleConfig config_;
};

}  // namespace smoe
