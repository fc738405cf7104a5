#!/usr/bin/env bash
# Installs what is missing, builds lasp and trains the default small model on the built-in corpus
# on CPU: two ranks under mpirun splitting every sequence with LASP-2 sequence parallelism
# (LASP_RANKS=1 for one process). Extra arguments go to `lasp train`, e.g. --set train.steps=50.
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
ranks=${LASP_RANKS:-2}
cd "$root"
if [ "$ranks" -gt 1 ] && command -v mpirun >/dev/null; then
  exec mpirun -np "$ranks" --oversubscribe "$LASP_BUILD_DIR/lasp" train "$config" \
    --set parallel.sp="$ranks" --set parallel.sp_method=lasp2 "$@"
fi
exec "$LASP_BUILD_DIR/lasp" train "$config" "$@"
