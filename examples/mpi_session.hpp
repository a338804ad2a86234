// MPI for the run of a tool under mpirun (smoe_eval's "expert_parallel", train_lm's
// --expert-parallel): initialized here with MPI_THREAD_FUNNELED unless the program already did,
// finalized by the one who initialized it. Without mpirun Open MPI starts a singleton: P = 1.
// (The library itself never initializes MPI: smoe/dist/mpi_communicator.hpp.)
#pragma once
#include <smoe/core/error.hpp>
#include <smoe/dist/mpi_communicator.hpp>

class MpiSession {
 public:
  explicit MpiSession(const char* context) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      int provided = 0;
      if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        smoe::fail(context, ": MPI_Init_thread failed");
      owner_ = true;
    }
  }
  ~MpiSession() {
    if (owner_) MPI_Finalize();
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

 private:
  bool owner_ = false;
};
