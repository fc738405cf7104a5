#!/usr/bin/env bash
# Installs what is missing, builds lasp and trains the default small model on the built-in corpus
# (on CPU when there is no GPU). Extra arguments go to `lasp train`, e.g. --set train.steps=50.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# The training loop runs on CPU in this version: skip compiling the CUDA kernels for it.
export LASP_CUDA=${LASP_CUDA:-OFF}
export LASP_BUILD_DIR=${LASP_BUILD_DIR:-$root/build-train}
"$root/scripts/build.sh" --target lasp
config=${LASP_CONFIG:-$root/configs/tiny.yaml}
cd "$root"
exec "$LASP_BUILD_DIR/lasp" train "$config" "$@"
