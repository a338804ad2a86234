// Compile-only: NcclCommunicator (dist/nccl_communicator.cuh) builds against the toolkit's nccl.h
// and satisfies the Communicator concept. It runs only where a GPU is (not in CI).
#include <smoe/dist/communicator.hpp>
#include <smoe/dist/nccl_communicator.cuh>

static_assert(smoe::Communicator<smoe::NcclCommunicator>);
