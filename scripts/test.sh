#!/usr/bin/env bash
# Installs what is missing, builds lasp and runs every test CTest knows (CPU unit tests, the
# multi-rank tests under mpirun, and the GPU tests, which skip without a GPU).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
if [ "$(id -u)" -eq 0 ]; then  # Open MPI refuses root unless told
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export LASP_BUILD_DIR=${LASP_BUILD_DIR:-$root/build}
"$root/scripts/build.sh"
cd "$LASP_BUILD_DIR"
ctest --output-on-failure -j "${LASP_TEST_JOBS:-2}" --timeout 900 "$@"
