// smoe_eval's entry point; the tool is examples/smoe_eval.cpp (and the fuzz harness links it too).
#include "smoe_eval_common.hpp"

int main(int argc, char** argv) { return smoe_eval::run_main(argc, argv); }
