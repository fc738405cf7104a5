#!/usr/bin/env bash
# The precision comparison: the same small model (configs/tiny.yaml, or $LASP_CONFIG) trained for
# the same tokens, one process on CPU, with the attention and MLP projections in
#   bf16           full precision (fp32 on CPU)
#   fp8            E4M3 forward, E5M2 gradients ($FP8_SCALING: per_tensor | delayed | block)
#   mxfp4_sr       Quartet: MXFP4 QuEST forward, MXFP4 stochastic-rounding backward
#   nvfp4_sr       NVFP4 RTN forward, NVFP4 stochastic-rounding backward
#   nvfp4_ms_eden  NVFP4 RTN forward, NVFP4 MS-EDEN backward (Quartet II)
# The LM head stays in bf16 in every run (it is fused with the cross-entropy, not a projection).
# Runs go to runs/precision/<name>; the loss curves to runs/precision/loss.png; the script ends
# with a table of final validation losses and their gaps relative to bf16.
#   scripts/compare_precision.sh                        # all five runs, sequentially
#   VARIANTS="bf16 fp8" scripts/compare_precision.sh --set train.steps=50   # extra args -> lasp train
#   SKIP_TRAIN=1 scripts/compare_precision.sh           # only the plot and the table
#   SEEDS="1 2 3" scripts/compare_precision.sh          # each variant per seed (runs <name>_s<seed>);
#                                                       # the table gives the mean and spread per variant
#   JOBS=2 ...                                          # 2 runs at a time (CPU: one core each;
#                                                       # not on a single GPU, see below)
#   LASP_BIN=build/lasp ...                             # an existing binary (no build; e.g. a CUDA one,
#                                                       # then train.device=auto trains on the GPU)
# On CPU the FP4 runs cost ~3 s a step (emulated quantizers), the bf16 run ~0.15 s: the measured
# comparison in docs/low_precision.md uses --set train.steps=100.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export LASP_CUDA=${LASP_CUDA:-OFF}
export LASP_BUILD_DIR=${LASP_BUILD_DIR:-$root/build-train}
export LASP_JOBS=${LASP_JOBS:-2}
config=${LASP_CONFIG:-$root/configs/tiny.yaml}
out=${PRECISION_DIR:-runs/precision}
variants=${VARIANTS:-"bf16 fp8 mxfp4_sr nvfp4_sr nvfp4_ms_eden"}
block=${HADAMARD_BLOCK:-32}  # divides the tiny model's 128 / 64 / 384 and the 2048 tokens per step
fp8_scaling=${FP8_SCALING:-per_tensor}
python=${PYTHON:-/usr/bin/python3}
# One BLAS thread: the emulated low-precision runs spend most of their time in the (single-threaded)
# quantizers, and spinning BLAS threads only compete with them for the cores.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}

seeds=${SEEDS:-}
lasp_bin=${LASP_BIN:-}
if [ -z "${SKIP_TRAIN:-}" ] && [ -z "$lasp_bin" ]; then
  "$root/scripts/build.sh" --target lasp
fi
lasp_bin=${lasp_bin:-$LASP_BUILD_DIR/lasp}

# The --set overrides of one variant.
variant_args() {
  case "$1" in
    bf16) echo "--set precision.attention=bf16 --set precision.mlp=bf16" ;;
    fp8) echo "--set precision.attention=fp8 --set precision.mlp=fp8 --set precision.fp8_scaling=$fp8_scaling" ;;
    mxfp4_sr) echo "--set precision.attention=fp4 --set precision.mlp=fp4 --set precision.fp4_format=mxfp4 --set precision.fp4_backward=sr --set precision.hadamard_block=$block" ;;
    nvfp4_sr) echo "--set precision.attention=fp4 --set precision.mlp=fp4 --set precision.fp4_format=nvfp4 --set precision.fp4_backward=sr --set precision.hadamard_block=$block" ;;
    nvfp4_ms_eden) echo "--set precision.attention=fp4 --set precision.mlp=fp4 --set precision.fp4_format=nvfp4 --set precision.fp4_backward=ms_eden --set precision.hadamard_block=$block" ;;
    *) echo "compare_precision.sh: unknown variant '$1' (bf16 fp8 mxfp4_sr nvfp4_sr nvfp4_ms_eden)" >&2; return 1 ;;
  esac
}

# The runs, seed-major (with JOBS > 1 a seed's variants finish together, so a run cut short by a
# time cap leaves whole seeds behind it).
runs=()
for seed in ${seeds:-none}; do
  for v in $variants; do
    variant_args "$v" >/dev/null || exit 2
    runs+=("$v:$seed")
  done
done
run_name() {  # variant:seed -> run name
  local v=${1%%:*} seed=${1#*:}
  if [ "$seed" = none ]; then echo "$v"; else echo "${v}_s$seed"; fi
}
# One run, its log in $out/<name>.log; prints one line when done.
train_one() {
  local v=${1%%:*} seed=${1#*:} name args seed_args="" start
  shift
  name=$(run_name "$v:$seed")
  args=$(variant_args "$v")
  [ "$seed" != none ] && seed_args="--set train.seed=$seed"
  rm -rf "${out:?}/$name"
  start=$(date +%s)
  # shellcheck disable=SC2086  # $args is a list of words
  if "$lasp_bin" train "$config" --set run.dir="$out/$name" --set checkpoint.every=-1 $args $seed_args "$@" \
      >"$out/$name.log" 2>&1; then
    echo "=== $name: $(( $(date +%s) - start )) s, $(grep -o 'final validation loss.*' "$out/$name.log" | tail -1)"
  else
    tail -20 "$out/$name.log"
    echo "=== $name failed (log: $out/$name.log)" >&2
    return 1
  fi
}

# JOBS runs at a time (default 1): for CPUs with cores to spare (each run takes one). Not on one
# GPU: without MPS its processes take turns, and 10 at a time on an H200 ran the FP4 runs ~15x
# slower each than one alone (docs/low_precision.md).
jobs_max=${JOBS:-1}
if [ -z "${SKIP_TRAIN:-}" ]; then
  mkdir -p "$out"
  echo "=== ${#runs[@]} runs, $jobs_max at a time: lasp train $config <variant args> $*"
  # A time cap (timeout's TERM) or Ctrl-C stops the runs in flight too.
  trap 'kill $(jobs -p) 2>/dev/null; exit 143' TERM INT
  failed=0 running=0
  for r in "${runs[@]}"; do
    if ((running >= jobs_max)); then
      wait -n || failed=1
      running=$((running - 1))
    fi
    train_one "$r" "$@" &
    running=$((running + 1))
  done
  while ((running > 0)); do
    wait -n || failed=1
    running=$((running - 1))
  done
  ((failed == 0)) || { echo "compare_precision.sh: a run failed" >&2; exit 1; }
fi

files=()
for r in "${runs[@]}"; do
  name=$(run_name "$r")
  # Only finished runs (a run cut short has no final validation loss in its log).
  if grep -q 'final validation loss' "$out/$name.log" 2>/dev/null; then
    files+=("$out/$name/metrics.jsonl")
  else
    echo "    $name: not finished, left out of the plot and the table"
  fi
done

# The plot needs matplotlib; without it the table below is still printed.
if "$python" "$root/scripts/plot_metrics.py" "${files[@]}" -o "$out/loss.png" \
  --title "$(basename "$config" .yaml), same tokens: projections in bf16 / fp8 / fp4 (lm_head bf16)"; then
  echo "plot: $out/loss.png"
fi

# Final validation loss (the last val_loss of each run) and the gap relative to bf16.
"$python" - "${files[@]}" <<'PY'
import json, os, sys
rows = []
for path in sys.argv[1:]:
    val, loss = None, None
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("val_loss") is not None: val = r["val_loss"]
            if r.get("loss") is not None: loss = r["loss"]
    rows.append((os.path.basename(os.path.dirname(path)), val, loss))
# Runs named <variant>_s<seed> are grouped per variant: mean and spread (max - min) over seeds.
import re, statistics
groups = {}
for name, val, loss in rows:
    groups.setdefault(re.sub(r"_s\d+$", "", name), []).append((name, val, loss))
def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None
base = mean([v for _, v, _ in groups.get("bf16", [])])
fmt = lambda x: f"{x:.4f}" if x is not None else "-"
# Paired gaps: each seed's run against the bf16 run of the same seed (same initial weights and
# data order), then their mean and standard error over the seeds.
bf16_by_seed = {re.search(r"_s(\d+)$", n).group(1): v for n, v, _ in groups.get("bf16", [])
                if re.search(r"_s(\d+)$", n) and v is not None}
def paired(runs):
    gaps = []
    for n, v, _ in runs:
        m = re.search(r"_s(\d+)$", n)
        if m and v is not None and bf16_by_seed.get(m.group(1)):
            gaps.append(100 * (v - bf16_by_seed[m.group(1)]) / bf16_by_seed[m.group(1)])
    if len(gaps) < 2:
        return "-"
    se = statistics.stdev(gaps) / len(gaps) ** 0.5
    return f"{statistics.fmean(gaps):+.2f}% +- {se:.2f} ({' '.join(f'{g:+.2f}' for g in gaps)})"
print("| run | seeds | final val loss (per seed) | mean | spread | gap of the mean vs bf16 | paired gap, mean +- s.e. (per seed) | final train loss (mean) |")
print("|---|---|---|---|---|---|---|---|")
for g, runs in groups.items():
    vals = [v for _, v, _ in runs if v is not None]
    m = mean(vals)
    spread = f"{max(vals) - min(vals):.4f}" if len(vals) > 1 else "-"
    gap = f"{100 * (m - base) / base:+.2f}%" if base and m is not None else "-"
    print(f"| {g} | {len(runs)} | {' / '.join(fmt(v) for v in vals)} | {fmt(m)} | {spread} | {gap} | {paired(runs)} | {fmt(mean([l for _, _, l in runs]))} |")
PY
