// smoe_eval built without a CUDA backend (neither nvcc nor the host-emulated device build): a SPEC
// asking for "backend": "cuda" is refused.
#include "smoe_eval_layer.hpp"
#include "smoe_eval_stack.hpp"

namespace smoe_eval {

namespace {
[[noreturn]] void refuse() {
  fail("SPEC: \"backend\": \"cuda\" needs smoe_eval built with the CUDA backend (SMOE_ENABLE_CUDA or "
       "SMOE_CUDA_EMULATION)");
}
}  // namespace

smoe::io::SafetensorsWriter evaluate_on_device(const Spec&, const smoe::io::SafetensorsFile&) { refuse(); }
smoe::io::SafetensorsWriter evaluate_stack_on_device(const StackSpec&, const smoe::io::SafetensorsFile&) { refuse(); }

}  // namespace smoe_eval
