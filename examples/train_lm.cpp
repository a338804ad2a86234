// train_lm's command line (examples/train_lm.hpp has the trainer; docs/training.md every flag).
#include "train_lm.hpp"

namespace train_lm {
namespace {

Options parse(int argc, char** argv, const std::vector<Flag>& flags, bool& help) {
  Options o;
  for (int a = 1; a < argc; ++a) {
    std::string arg = argv[a], value;
    if (!arg.starts_with("--")) throw usage_error("unexpected argument '" + arg + "' (flags start with --)");
    arg = arg.substr(2);
    const auto eq = arg.find('=');
    const bool inline_value = eq != std::string::npos;
    if (inline_value) value = arg.substr(eq + 1), arg = arg.substr(0, eq);
    const auto it = std::find_if(flags.begin(), flags.end(), [&](const Flag& f) { return f.name == arg; });
    if (it == flags.end()) throw usage_error("unknown flag '--" + arg + "' (see --help)");
    if (arg == "help") {
      help = true;
      continue;
    }
    if (it->metavar.empty()) {
      if (inline_value) throw usage_error("--" + arg + " takes no value");
    } else if (!inline_value) {
      if (a + 1 >= argc) throw usage_error("--" + arg + " needs a value (" + it->metavar + ")");
      value = argv[++a];
    }
    it->set(o, value);
    o.given.insert(arg);
  }
  return o;
}

}  // namespace
}  // namespace train_lm

using namespace train_lm;

int main(int argc, char** argv) {
  const std::vector<Flag> flags = make_flags();
  try {
    bool help = false;
    Options o = parse(argc, argv, flags, help);
    if (help) {
      print_help(std::cout, flags);
      return 0;
    }
    const bool sampling = o.sample > 0;
    if (sampling) {
      if (o.resume.empty() && o.save.empty()) throw usage_error("--sample needs a checkpoint: --resume FILE");
      const std::string path = o.resume.empty() ? o.save : o.resume;
      if (!std::filesystem::exists(path)) throw usage_error("--sample: no checkpoint '" + path + "'");
      apply_checkpoint_settings(path, o, false);
    } else {
      if (o.data.empty()) throw usage_error("--data FILE is required (see --help)");
      if (!o.resume.empty()) {
        if (!std::filesystem::exists(o.resume)) throw usage_error("--resume: no checkpoint '" + o.resume + "'");
        apply_checkpoint_settings(o.resume, o, true);
        if (o.save.empty()) o.save = o.resume;
      }
    }
    resolve(o);
#if defined(_OPENMP)
    if (o.threads > 0) omp_set_num_threads(int(o.threads));
#endif
    if (o.expert_parallel) return run_expert_parallel(o);
    // Sampling reads the checkpoint into the CPU model, wherever it was trained.
    if (o.device == "cuda" && !sampling) return run_on_device(o);
    return dispatch<smoe::cpu>(o);
  } catch (const usage_error& e) {
    std::cerr << "train_lm: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "train_lm: error: " << e.what() << "\n";
    return 1;
  }
}
