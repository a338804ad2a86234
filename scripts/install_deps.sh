#!/usr/bin/env bash
# Installs smoe's build and test dependencies from Debian packages (idempotent: apt runs only
# when something is missing).
set -euo pipefail
# clang-14 and libclang-rt-14-dev: the second compiler of CI and libFuzzer with the sanitizers.
# libdlpack-dev and libtorch-dev: the optional interop (smoe/interop/, docs/interop.md) and its tests.
# openmpi-bin, libopenmpi-dev: expert parallelism over MPI and its tests (docs/distributed.md).
# gnuplot-nox: the plots of train_lm --stats and scripts/run_experiments.sh (optional: skipped without it).
packages=(cmake g++ make libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev
          python3 python3-numpy python3-torch libopenblas0-pthread clang-14 libclang-rt-14-dev libomp-dev
          libdlpack-dev libtorch-dev openmpi-bin libopenmpi-dev gnuplot-nox)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "smoe: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
