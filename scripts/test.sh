#!/usr/bin/env bash
# Run every tier of the test suite, each in its own pytest process (tests/conftest.py defines the tiers):
#   unit     fast, no Ray, no subprocess; the inner loop: .venv/bin/python -m pytest -m unit
#   ray      the one session-scoped local Ray, shared by every test of the tier, and the slow in-process tests
#   cluster  tests that start processes of their own (multi-node clusters, `ray start`, `ray job submit`,
#            `smn run` or another Python as a subprocess); in their own pytest process, so they never tear
#            down the ray tier's session
# Extra arguments go to every pytest run (`bash scripts/test.sh -x`, or test files instead of all of tests/).
# Exits non-zero if any tier fails; a tier that selects no test (pytest's exit code 5) is not a failure.
# Ends with each tier's exit code, seconds and pytest summary line.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=0
summary=()
for tier in unit ray cluster; do
  echo "=== tier $tier"
  start=$SECONDS
  "$PY" -m pytest -q -m "$tier" --durations=15 "$@" 2>&1 | tee "$logs/$tier.log"  # no paths: testpaths
  rc=${PIPESTATUS[0]}
  line=$(grep -E '^=* ?[0-9]+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)|no tests ran' \
         "$logs/$tier.log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
  if [ "$rc" -eq 5 ]; then
    rc=0
    line="no tests selected${line:+ ($line)}"
  fi
  [ "$rc" -eq 0 ] || failed=1
  echo "$line" > "$logs/$tier.summary"
  summary+=("$(printf '%-8s exit %-2s %4ss  %s' "$tier" "$rc" "$((SECONDS - start))" "${line:-no summary line}")")
done
echo "=== tiers"
printf '%s\n' "${summary[@]}"
count() { grep -hoE "[0-9]+ $1" "$logs"/*.summary | awk '{s += $1} END {print s + 0}'; }
# the closing line: every tier's counts added up (errors count as failures)
echo "tests: $(count passed) passed, $(( $(count failed) + $(count 'errors?') )) failed, $(count skipped) skipped"
exit "$failed"
