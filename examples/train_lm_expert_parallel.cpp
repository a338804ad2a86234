// train_lm --expert-parallel under mpirun -np P (docs/distributed.md): every MoE layer is an
// smoe::ExpertParallel layer whose E experts are split over the P ranks (rank r owns experts
// [r·E/P, (r+1)·E/P)), and each rank runs its slice of every batch: sequences [r·B/P, (r+1)·B/P)
// (the first B % P ranks one more). The run is the single-process run of the same flags:
//   - every rank builds and initializes the whole model from the seed and keeps its shard;
//   - each rank's cross-entropy is weighted by its share of the batch (Model::backward(B_r / B)),
//     and the balance losses take the global scope, so the gradients are those of the global
//     batch's objective: replicated ones summed over ranks (allreduce_gradients), the router's
//     summed inside the layer, the experts' complete on their owner;
//   - gradient clipping uses the norm of the whole model (clip_grad_norm over ranks);
//   - expert dropout draws each token's mask at its index in the whole batch;
//   - a checkpoint is the whole model (gathered; rank 0 writes it), so it resumes with any P or
//     in one process, and --sample reads it in one process.
// Rank 0 prints and writes the --log and --stats files; the others are silent.
// Built only with MPI; train_lm_expert_parallel_no_mpi.cpp refuses the flag otherwise.
#include <smoe/dist/mpi_communicator.hpp>
#include <smoe/layers/expert_parallel.hpp>

#include "mpi_session.hpp"
#include "train_lm.hpp"

namespace train_lm {
namespace {

// Run's Ranks: the communicator of the run.
class ExpertParallelRanks {
 public:
  explicit ExpertParallelRanks(smoe::MpiCommunicator& comm) : comm_(&comm) {}
  smoe::MpiCommunicator& comm() const { return *comm_; }
  int rank() const { return comm_->rank(); }
  int size() const { return comm_->size(); }

 private:
  smoe::MpiCommunicator* comm_;
};

// Kind K (a token-choice kind with make_router and make_loss) with its MoE layers expert-parallel:
// the same router (replicated) and loss (global scope) over this rank's E/P ReLU experts.
template <template <class> class K>
struct ExpertParallelKind {
  using Base = K<smoe::cpu>;
  using Router = decltype(Base::make_router(std::declval<const Options&>(), 0, 0));
  using Loss = decltype(Base::make_loss(std::declval<const Options&>()));
  using FFN = smoe::ExpertParallel<smoe::MpiCommunicator, Router, smoe::ReluExperts<T>, smoe::WeightedSum<T>, Loss>;
  struct Shared {
    ExpertParallelRanks ranks;
    std::uint64_t first_token;  // this rank's first token in every batch
  };
  static Shared make_shared(const Options& o, const ExpertParallelRanks& ranks) {
    return {ranks, std::uint64_t(batch_slice(o.batch, ranks.rank(), ranks.size()).first * o.context)};
  }
  static FFN make_ffn(const Options& o, index_t l, Shared& s) {
    Loss loss = Base::make_loss(o);
    loss.scope = smoe::LossScope::global;
    FFN f(s.ranks.comm(), Base::make_router(o, l, s.first_token),
          relu_experts<smoe::cpu>(o, o.experts / s.ranks.size()), {}, std::move(loss));
    f.capacity.capacity_factor = o.capacity_factor;
    return f;
  }
};

template <template <class> class K>
int train_expert_parallel(Options& o, ExpertParallelRanks ranks) {
  Run<K<smoe::cpu>, ExpertParallelKind<K>, ExpertParallelRanks> run(o, ranks);
  const Corpus corpus = load_corpus(o);
  return run.train(corpus);
}

}  // namespace

int run_expert_parallel(Options& o) {
  MpiSession session("--expert-parallel");
  smoe::MpiCommunicator comm(MPI_COMM_WORLD);
  const int P = comm.size(), rank = comm.rank();
  // The flags are the same on every rank, so every rank refuses them alike.
  if (o.experts % P != 0)
    throw usage_error("--expert-parallel: --experts " + std::to_string(o.experts) + " must be a multiple of the " +
                      std::to_string(P) + " ranks");
  if (o.batch < P)
    throw usage_error("--expert-parallel: --batch " + std::to_string(o.batch) + " must be >= the " +
                      std::to_string(P) + " ranks (each rank runs at least one sequence)");
  if (rank != 0) {  // rank 0 reports; the checkpoint is gathered by all and written by rank 0
    std::cout.setstate(std::ios::failbit);
    o.log.clear();
    o.stats.clear();
  }
  try {
    const ExpertParallelRanks ranks(comm);
    if (o.ffn == "sigma-moe") return train_expert_parallel<SigmaKind>(o, ranks);
    if (o.ffn == "switch") return train_expert_parallel<SwitchKind>(o, ranks);
    return train_expert_parallel<SoftmaxMoEKind>(o, ranks);  // resolve() allows these three
  } catch (const std::exception& e) {
    // A rank that fails alone would leave the others waiting in their next collective.
    if (P > 1) {
      std::cerr << "train_lm: error on rank " << rank << " of " << P << ": " << e.what() << "\n";
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    throw;
  }
}

}  // namespace train_lm
