// smoe_eval built without a CUDA backend (neither nvcc nor the host-emulated device build): a SPEC
// asking for "backend": "cuda" is refused.
#include "smoe_eval_layer.hpp"

namespace smoe_eval {

smoe::io::SafetensorsWriter evaluate_on_device(const Spec&, const smoe::io::SafetensorsFile&) {
  fail("SPEC: \"backend\": \"cuda\" needs smoe_eval built with the CUDA backend (SMOE_ENABLE_CUDA or "
       "SMOE_CUDA_EMULATION)");
}

}  // namespace smoe_eval
