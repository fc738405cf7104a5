#!/usr/bin/env bash
# Reproduces the LASP-2 paper's speed comparison on the GPUs at hand: for the 1B pure-linear model
# and the 1B hybrid model (one softmax layer in four), every sequence-parallel method, and the total
# sequence length doubling from 16K tokens per GPU up to the largest that fits, it trains a few
# steps and records tokens/s, step time and peak memory per GPU. Writes to results/:
#   lasp2_tables.md   method x sequence length tables (tokens/s, step time, peak memory)
#   lasp2.csv         every measurement
#   throughput_<model>.png, memory_<model>.png
#
# usage: scripts/reproduce_lasp2.sh [--gpus N] [--models linear,hybrid] [--methods lasp2,lasp1,ring]
#                                   [--min-per-gpu 16384] [--max-per-gpu 1048576] [--steps 3]
#                                   [--hostfile FILE] [--time-limit SECONDS] [--factor 2]
# Several nodes: pass an Open MPI host file (one line per node: "node1 slots=8") with --hostfile and
# --gpus = the total GPU count; the run directory must be on a shared file system.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
models="linear,hybrid"
methods=""
min_per=16384
max_per=1048576
steps=3
hostfile=""
time_limit=900
factor=2
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus=$2; shift ;;
    --models) models=$2; shift ;;
    --methods) methods=$2; shift ;;
    --min-per-gpu) min_per=$2; shift ;;
    --max-per-gpu) max_per=$2; shift ;;
    --steps) steps=$2; shift ;;
    --hostfile) hostfile=$2; shift ;;
    --time-limit) time_limit=$2; shift ;;
    --factor) factor=$2; shift ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) echo "reproduce_lasp2.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$gpus" -ge 1 ] || { echo "reproduce_lasp2.sh: no GPU found (pass --gpus N)" >&2; exit 1; }
if [ -z "${LASP_BIN:-}" ]; then
  LASP_CUDA=ON LASP_BUILD_DIR=${LASP_BUILD_DIR:-$root/build-gpu} "$root/scripts/build.sh" --target lasp >/dev/null || exit 1
  LASP_BIN=${LASP_BUILD_DIR:-$root/build-gpu}/lasp
fi
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off (shared machines)
[ "$(id -u)" -eq 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=$root/results
mkdir -p "$out/raw"
mpi=(mpirun -np "$gpus" --bind-to none -x NCCL_NVLS_ENABLE -x LASP_COMM_TIMEOUT)
[ -n "$hostfile" ] && mpi+=(--hostfile "$hostfile")
export LASP_COMM_TIMEOUT=${LASP_COMM_TIMEOUT:-300}

for model in ${models//,/ }; do
  cfg=$root/configs/${model}_llama3_1b.yaml
  [ -f "$cfg" ] || { echo "no config $cfg" >&2; exit 1; }
  ms=$methods
  if [ -z "$ms" ]; then
    if [ "$gpus" -eq 1 ]; then ms=lasp2                    # one GPU: no sequence parallelism
    elif [ "$model" = linear ]; then ms=lasp2,lasp1,ring   # allgather_kv = lasp2 on linear layers
    else ms=lasp2,lasp1,ring,allgather_kv; fi
  fi
  for method in ${ms//,/ }; do
    per=$min_per
    while [ "$per" -le "$max_per" ]; do
      total=$((per * gpus))
      dir=$out/raw/${model}_${method}_${total}
      echo "== $model $method total=$total (per GPU $per)"
      if timeout "$time_limit" "${mpi[@]}" "$LASP_BIN" bench sp --config "$cfg" --methods "$method" \
          --lengths "$total" --steps "$steps" --out "$dir" --set train.recompute=block \
          --set model.ce_chunk=8192 >"$dir.log" 2>&1; then
        tail -2 "$dir.log" | head -1
        sed 1d "$dir/bench_sp.csv" | sed "s/^/$model,/" >>"$out/raw/rows.csv"
      else
        echo "   did not fit or failed (see $dir.log): $(grep -m1 -E 'error|out of memory' "$dir.log")"
        echo "$model,$method,$total,$per,,,,,$gpus" >>"$out/raw/rows.csv"
        break
      fi
      per=$((per * factor))
    done
  done
done
{ echo "model,method,seq_len,per_rank,tokens_per_s,step_ms,peak_mib,comm_share,world"; sort -u "$out/raw/rows.csv"; } >"$out/lasp2.csv"
python3 "$root/scripts/lasp2_tables.py" "$out/lasp2.csv" "$out" && cat "$out/lasp2_tables.md"
