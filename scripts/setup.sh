#!/usr/bin/env bash
# Installs what lasp needs to build and test, if it is missing (Debian/Ubuntu, idempotent).
# Runs apt-get as root, or through sudo otherwise.
set -euo pipefail

packages=(cmake g++ make pkg-config libopenmpi-dev openmpi-bin libyaml-cpp-dev libprotobuf-dev
          protobuf-compiler libopenblas-dev libgtest-dev)
# A package counts as present when dpkg has it or what lasp uses from it is found anyway (GPU
# images often ship these libraries outside dpkg, and may have no network to install from).
header() {
  local d
  for d in /usr/include /usr/local/include /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu \
           /usr/include/openblas; do
    [ -e "$d/$1" ] && return 0
  done
  return 1
}
provided() {
  case "$1" in
    cmake|make|pkg-config) command -v "$1" >/dev/null ;;
    g++) command -v g++ >/dev/null || command -v c++ >/dev/null ;;
    libopenmpi-dev) command -v mpicxx >/dev/null ;;
    openmpi-bin) command -v mpirun >/dev/null ;;
    libyaml-cpp-dev) header yaml-cpp/yaml.h ;;
    libprotobuf-dev) header google/protobuf/message.h ;;
    protobuf-compiler) command -v protoc >/dev/null ;;
    # OpenBLAS itself, not any cblas.h: the reference BLAS's (libblas-dev) is 10x slower.
    libopenblas-dev) header openblas_config.h || header x86_64-linux-gnu/openblas-pthread/openblas_config.h ||
                     header aarch64-linux-gnu/openblas-pthread/openblas_config.h ||
                     ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so ' ;;
    libgtest-dev) header gtest/gtest.h ;;
    *) return 1 ;;
  esac
}
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || provided "$p" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
