// smoe_eval built without MPI (SMOE_WITH_MPI off or MPI not found): "expert_parallel": true is refused.
#include "smoe_eval_layer.hpp"

namespace smoe_eval {

void evaluate_expert_parallel(const Spec&, const smoe::io::SafetensorsFile&, const std::string&) {
  fail("SPEC: \"expert_parallel\": true needs smoe_eval built with MPI (SMOE_WITH_MPI and an MPI found by CMake)");
}

}  // namespace smoe_eval
