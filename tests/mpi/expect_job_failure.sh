#!/usr/bin/env bash
# Runs a multi-rank job that must END IN FAILURE, and passes when it does so properly:
#   expect_job_failure.sh LIMIT_S PATTERN [PATTERN ...] -- COMMAND [ARG ...]
# passes when COMMAND exits non-zero within LIMIT_S seconds (no rank left hanging) and its
# combined output contains every PATTERN (fixed strings). Used by CTest for the watchdog abort and
# for a rank that dies mid-collective (tests/CMakeLists.txt).
set -u
limit=$1
shift
patterns=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  patterns+=("$1")
  shift
done
[ "${1:-}" = "--" ] || { echo "usage: $0 LIMIT_S PATTERN... -- COMMAND..." >&2; exit 2; }
shift
# The job runs in a session of its own, so that on a hang every process it started (mpirun and
# the ranks) is ended, not only mpirun.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
setsid "$@" >"$log" 2>&1 &
pid=$!
hung=0
while kill -0 "$pid" 2>/dev/null; do
  if [ $(( $(date +%s) - start )) -ge "$limit" ]; then
    hung=1
    kill -TERM -- "-$pid" 2>/dev/null
    sleep 2
    kill -KILL -- "-$pid" 2>/dev/null
    break
  fi
  sleep 0.2
done
wait "$pid"
rc=$?
elapsed=$(( $(date +%s) - start ))
out=$(cat "$log")
printf '%s\n' "$out"
echo "expect_job_failure: exit code $rc after ${elapsed} s"
fail=0
if [ "$rc" -eq 0 ]; then
  echo "expect_job_failure: FAIL: the job exited 0, but it had to fail" >&2; fail=1
fi
if [ "$hung" -eq 1 ]; then
  echo "expect_job_failure: FAIL: the job was still running after ${limit} s (a rank hung)" >&2; fail=1
fi
for p in "${patterns[@]}"; do
  if ! grep -qF -- "$p" <<<"$out"; then
    echo "expect_job_failure: FAIL: the output lacks \"$p\"" >&2; fail=1
  fi
done
[ "$fail" -eq 0 ] && echo "expect_job_failure: PASS (non-zero exit in ${elapsed} s, every pattern found)"
exit "$fail"
