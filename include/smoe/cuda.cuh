#pragma once
// The CUDA backend in one include, for .cu files (and the host-emulated build): device tensors,
// dispatch, routers, experts, combiner, losses and the MoE layer. CPU-only code includes
// <smoe/smoe.hpp>, which never includes this.
#include "smoe/cuda/adamw.cuh"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/dispatch.cuh"
#include "smoe/cuda/execution.cuh"
#include "smoe/cuda/feed_forward_experts.cuh"
#include "smoe/cuda/group_topk_router.cuh"
#include "smoe/cuda/grouped_gemm.cuh"
#include "smoe/cuda/hash_router.cuh"
#include "smoe/cuda/linear_scores.cuh"
#include "smoe/cuda/losses.cuh"
#include "smoe/cuda/moe.cuh"
#include "smoe/cuda/numeric.cuh"
#include "smoe/cuda/random.cuh"
#include "smoe/cuda/tensor_core_gemm.cuh"
#include "smoe/cuda/topk.cuh"
#include "smoe/cuda/topk_router.cuh"
#include "smoe/cuda/transfer.cuh"
#include "smoe/cuda/weighted_sum.cuh"
#include "smoe/routing/sigmoid_topk.hpp"
#include "smoe/routing/softmax_topk.hpp"
