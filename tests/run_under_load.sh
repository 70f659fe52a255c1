#!/usr/bin/env bash
# Run the test suite on a machine kept busy, to catch tests that depend on wall-clock luck.
#
# Starts one CPU-bound busy loop per core (nproc, or $SFM_LOAD_JOBS), runs pytest with
# SFM_TESTS_TIMEOUT_FACTOR=3 (every timeout the tests wait with, the leak check's grace
# period and pytest-timeout's per-test limit are multiplied by it; see tests/helpers.py and
# tests/conftest.py), then stops the busy loops whatever happens (pass, failure, Ctrl-C).
# A test that passes normally but fails here waits for time instead of for an event.
#
# Usage, from anywhere:   tests/run_under_load.sh [pytest args...]
#   default args:         -q -x -p no:randomly
#   environment:          PYTHON (default: .venv/bin/python of the repo, else python3),
#                         SFM_LOAD_JOBS (busy loops, default: nproc),
#                         SFM_TESTS_TIMEOUT_FACTOR (default: 3)
# Exit status: pytest's.
set -u

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
jobs="${SFM_LOAD_JOBS:-$(nproc)}"
[ "$#" -gt 0 ] || set -- -q -x -p no:randomly

pids=()
stop_load() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null
    done
    pids=()
}
trap stop_load EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for _ in $(seq "$jobs"); do
    "$python" -c 'while True: pass' &
    pids+=("$!")
done
echo "run_under_load: $jobs busy loop(s) (pids ${pids[*]}), SFM_TESTS_TIMEOUT_FACTOR=${SFM_TESTS_TIMEOUT_FACTOR:-3}" >&2

SFM_TESTS_TIMEOUT_FACTOR="${SFM_TESTS_TIMEOUT_FACTOR:-3}" "$python" -m pytest "$@"
