// smoe_eval's multi-layer mode for double (smoe_eval_stack_impl.hpp).
#include "smoe_eval_stack_impl.hpp"

namespace smoe_eval {
template smoe::io::SafetensorsWriter evaluate_stack<double, PoolKind::per_layer>(const StackSpec&, const smoe::io::SafetensorsFile&);
template smoe::io::SafetensorsWriter evaluate_stack<double, PoolKind::tied>(const StackSpec&, const smoe::io::SafetensorsFile&);
template smoe::io::SafetensorsWriter evaluate_stack<double, PoolKind::samoe_weight>(const StackSpec&, const smoe::io::SafetensorsFile&);
template smoe::io::SafetensorsWriter evaluate_stack<double, PoolKind::samoe_output>(const StackSpec&, const smoe::io::SafetensorsFile&);
}  // namespace smoe_eval
