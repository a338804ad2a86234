// smoe_eval's multi-layer mode for float (smoe_eval_stack_impl.hpp).
#include "smoe_eval_stack_impl.hpp"

namespace smoe_eval {
template smoe::io::SafetensorsWriter evaluate_stack<float, PoolKind::per_layer>(const StackSpec&, const smoe::io::SafetensorsFile&);
template smoe::io::SafetensorsWriter evaluate_stack<float, PoolKind::tied>(const StackSpec&, const smoe::io::SafetensorsFile&);
template smoe::io::SafetensorsWriter evaluate_stack<float, PoolKind::samoe_weight>(const StackSpec&, const smoe::io::SafetensorsFile&);
template smoe::io::SafetensorsWriter evaluate_stack<float, PoolKind::samoe_output>(const StackSpec&, const smoe::io::SafetensorsFile&);
}  // namespace smoe_eval
