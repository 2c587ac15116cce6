#!/usr/bin/env bash
# `make test`: the suite as two pytest processes side by side, one per core. The modules that use the session's
# smoke run or its MLflow team stack run in one process, so those start once; every other module runs in the other
# (Prefect's test harness starts in each process that needs it). Arguments go to both (e.g. -x). Each process's output is printed when both have ended.
set -uo pipefail
cd "$(dirname "$0")/.."
# ... plus the readers of medical formats (~45 s), which keep the two processes' times about equal
shared=$( (grep -lE "smoke_run|tracking_server" tests/test_*.py tests/faults/test_*.py; ls tests/test_source_*.py) | sort -u)
rest=$(ls tests/test_*.py tests/faults/test_*.py | sort | grep -vxF "$shared")
logs=$(mktemp -d)
t0=$(date +%s)
python -m pytest -q -p no:cacheprovider --durations=12 "$@" $shared > "$logs/shared.log" 2>&1 &
a=$!
python -m pytest -q -p no:cacheprovider --durations=12 "$@" $rest > "$logs/rest.log" 2>&1 &
b=$!
wait $a; ra=$?
wait $b; rb=$?
echo "=== the modules sharing the session's smoke run and MLflow team stack (exit $ra)"
cat "$logs/shared.log"
echo "=== the other modules (exit $rb)"
cat "$logs/rest.log"
echo "=== both in $(( $(date +%s) - t0 )) s"
rm -rf "$logs"
[ "$ra" -eq 0 ] && [ "$rb" -eq 0 ]
