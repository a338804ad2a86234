#pragma once
// smoe: sparse Mixture-of-Experts layers. Umbrella header for the CPU backend (never includes CUDA).
#include "smoe/core/config.hpp"
#include "smoe/core/dispatch.hpp"
#include "smoe/core/error.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/core/rng.hpp"
#include "smoe/core/tensor.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/core/view.hpp"

#include "smoe/routing/capacity.hpp"
#include "smoe/routing/expert_dropout.hpp"
#include "smoe/routing/routing.hpp"
#include "smoe/routing/sigmoid_topk.hpp"
#include "smoe/routing/softmax_topk.hpp"
#include "smoe/routing/topk_router.hpp"
#include "smoe/routing/topk_select.hpp"

#include "smoe/experts/activation.hpp"
#include "smoe/experts/experts.hpp"
#include "smoe/experts/feed_forward_experts.hpp"

#include "smoe/combine/weighted_sum.hpp"

#include "smoe/losses/balance_loss.hpp"
#include "smoe/losses/entropy.hpp"
#include "smoe/losses/importance.hpp"
#include "smoe/losses/switch_balance.hpp"
#include "smoe/losses/z_loss.hpp"

#include "smoe/layers/dense_mlp.hpp"
#include "smoe/layers/moe.hpp"
#include "smoe/layers/routing_stats.hpp"

#include "smoe/train/gradient_check.hpp"
#include "smoe/train/init.hpp"
