// Expert-parallel layer over MPI: bytes sent per token per layer and the share of the layer's time
// spent in communication, forward + backward, at a sigma-MoE-like shape.
//   mpirun -np P --oversubscribe --bind-to none build/bench/bench_expert_parallel [tokens_per_rank] [reps]
// A plain main (no Google Benchmark): every rank must run the same iterations, so the collective
// calls match; rank 0 prints one line of medians. On one small machine the numbers show the
// overheads of the exchange, not a network: use them for correctness and order of magnitude only.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <smoe/dist/mpi_communicator.hpp>
#include <smoe/layers/expert_parallel.hpp>
#include <smoe/smoe.hpp>

using namespace smoe;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// A Communicator that forwards to another one and counts bytes sent to other ranks and seconds.
template <class Inner>
class TimedCommunicator {
 public:
  explicit TimedCommunicator(Inner& inner) : inner_(&inner) {}
  int rank() const { return inner_->rank(); }
  int size() const { return inner_->size(); }
  void all_to_all(std::span<const std::int32_t> send, std::span<std::int32_t> recv) {
    const double t0 = now();
    inner_->all_to_all(send, recv);
    seconds += now() - t0;
  }
  template <class T>
  void all_to_all_rows(const T* send, std::span<const std::int32_t> send_rows, T* recv,
                       std::span<const std::int32_t> recv_rows, index_t width) {
    for (int p = 0; p < size(); ++p)
      if (p != rank()) bytes_sent += double(send_rows[p]) * double(width) * sizeof(T);
    const double t0 = now();
    inner_->all_to_all_rows(send, send_rows, recv, recv_rows, width);
    seconds += now() - t0;
  }
  template <class T>
  void all_reduce_sum(std::span<T> values) {
    const double t0 = now();
    inner_->all_reduce_sum(values);
    seconds += now() - t0;
  }
  bool all_agree(bool ok) {
    const double t0 = now();
    const bool r = inner_->all_agree(ok);
    seconds += now() - t0;
    return r;
  }
  double seconds = 0, bytes_sent = 0;

 private:
  Inner* inner_;
};

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  {
    MpiCommunicator world(MPI_COMM_WORLD);
    TimedCommunicator comm(world);
    const int P = world.size();
    // sigma-MoE-like: d = 256, E = 16 experts of G = 128, k = 4, fp32.
    const index_t tokens = argc > 1 ? std::atoi(argv[1]) : 1024, reps = argc > 2 ? std::atoi(argv[2]) : 10;
    const index_t d = 256, E = 16, G = 128, K = 4;
    SigmoidTopK<float> router({.d_model = d, .experts = E, .k = K});
    router.for_each_parameter([](std::string_view, auto& p) { for (index_t i = 0; i < p.value.size(); ++i) p.value[i] = float(standard_normal(1, std::uint64_t(i), 3)) * 0.06f; });
    FeedForwardExperts<float, Relu> experts({d, E / P, G, false});
    experts.for_each_parameter([&](std::string_view, auto& p) { for (index_t i = 0; i < p.value.size(); ++i) p.value[i] = float(standard_normal(2 + world.rank(), std::uint64_t(i), 3)) * 0.06f; });
    ExpertParallel layer(comm, router, experts);
    layer.validate_inputs = false;
    Tensor<float> x({tokens, d}), y({tokens, d}), dy({tokens, d}), dx({tokens, d});
    for (index_t i = 0; i < x.size(); ++i) {
      x[i] = float(standard_normal(10 + world.rank(), std::uint64_t(i), 3));
      dy[i] = float(standard_normal(20 + world.rank(), std::uint64_t(i), 3));
    }
    std::vector<double> total, comm_share, bytes;
    for (index_t r = 0; r < reps + 1; ++r) {
      MPI_Barrier(world.comm());
      comm.seconds = comm.bytes_sent = 0;
      const double t0 = now();
      layer.forward(x.matrix(), y.matrix(), Mode::train);
      layer.backward(dy.matrix(), dx.matrix());
      const double t = now() - t0;
      // The slowest rank's step; its communication share.
      std::vector<double> v{t, comm.seconds, comm.bytes_sent};
      std::vector<double> mx(3);
      MPI_Allreduce(v.data(), mx.data(), 3, MPI_DOUBLE, MPI_MAX, world.comm());
      if (r == 0) continue;  // warm-up
      total.push_back(mx[0]);
      comm_share.push_back(comm.seconds / t);
      bytes.push_back(comm.bytes_sent / double(tokens));
    }
    const auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    if (world.rank() == 0)
      std::printf("P=%d tokens/rank=%lld d=%lld E=%lld G=%lld k=%lld fp32: step %.3f ms, communication %.1f%% "
                  "(rank 0), bytes sent per token (fwd+bwd, rank 0) %.0f, formula 4·k·d·4·(P-1)/P = %.0f\n",
                  P, (long long)tokens, (long long)d, (long long)E, (long long)G, (long long)K, 1e3 * median(total),
                  100 * median(comm_share), median(bytes), 4.0 * K * d * 4 * (P - 1) / P);
  }
  MPI_Finalize();
  return 0;
}
