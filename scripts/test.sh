#!/usr/bin/env bash
# Run every tier of the test suite, each in its own pytest process (tests/conftest.py defines the tiers):
#   unit     fast, no Ray, no subprocess; the inner loop: .venv/bin/python -m pytest -m unit
#   ray      the one session-scoped local Ray, shared by every test of the tier, and the slow in-process tests
#   cluster  tests that start processes of their own (multi-node clusters, `ray start`, `ray job submit`,
#            `smn run` or another Python as a subprocess); in their own pytest process, so they never tear
#            down the ray tier's session
# Two lanes run at the same time: `unit` then `ray` in one, `cluster` in the other. Most of a cluster test's
# wall time is waiting (process and Ray start-up, polling a run it killed), so the lanes share 2 cores well;
# every test that depends on timing waits with a deadline, not a fixed sleep. SMN_TEST_SERIAL=1 runs the
# three tiers one after another instead (the cluster lane's output is then streamed, not printed at the end).
# Extra arguments go to every pytest run (`bash scripts/test.sh -x`, or test files instead of all of tests/).
# Exits non-zero if any tier fails; a tier that selects no test (pytest's exit code 5) is not a failure.
# Ends with each tier's exit code, seconds and pytest summary line, and the total.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
begin=$SECONDS

# run_tier TIER [pytest args...]: the tier's output into $logs/TIER.log; its exit code, seconds and summary line
# into $logs/TIER.result
run_tier() {
  local tier=$1 start=$SECONDS rc line
  shift
  "$PY" -m pytest -q -m "$tier" --durations=15 "$@" > "$logs/$tier.log" 2>&1  # no paths: testpaths
  rc=$?
  line=$(grep -E '^=* ?[0-9]+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)|no tests ran' \
         "$logs/$tier.log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
  if [ "$rc" -eq 5 ]; then
    rc=0
    line="no tests selected${line:+ ($line)}"
  fi
  printf '%s\n' "$rc" "$((SECONDS - start))" "${line:-no summary line}" > "$logs/$tier.result"
}

# show_tier TIER: print a finished tier's output under a header
show_tier() {
  echo "=== tier $1"
  cat "$logs/$1.log"
}

if [ -n "${SMN_TEST_SERIAL:-}" ]; then
  for tier in unit ray cluster; do
    run_tier "$tier" "$@"
    show_tier "$tier"
  done
else
  echo "=== tiers unit, ray (one lane) and cluster (the other lane), at the same time"
  run_tier cluster "$@" &
  cluster_pid=$!
  run_tier unit "$@"
  show_tier unit
  run_tier ray "$@"
  show_tier ray
  wait "$cluster_pid"
  show_tier cluster
fi

echo "=== tiers"
failed=0
for tier in unit ray cluster; do
  { read -r rc; read -r secs; read -r line; } < "$logs/$tier.result"
  [ "$rc" -eq 0 ] || failed=1
  printf '%-8s exit %-2s %4ss  %s\n' "$tier" "$rc" "$secs" "$line"
  echo "$line" > "$logs/$tier.summary"
done
echo "whole suite: $((SECONDS - begin))s"
count() { grep -hoE "[0-9]+ $1" "$logs"/*.summary | awk '{s += $1} END {print s + 0}'; }
# the closing line: every tier's counts added up (errors count as failures)
echo "tests: $(count passed) passed, $(( $(count failed) + $(count 'errors?') )) failed, $(count skipped) skipped"
exit "$failed"
