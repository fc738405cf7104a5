#!/usr/bin/env bash
# Installs what lasp needs to build and test, if it is missing (Debian/Ubuntu, idempotent).
# Runs apt-get as root, or through sudo otherwise.
set -euo pipefail

packages=(cmake g++ make pkg-config libopenmpi-dev openmpi-bin libyaml-cpp-dev libprotobuf-dev
          protobuf-compiler libopenblas-dev libgtest-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
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
