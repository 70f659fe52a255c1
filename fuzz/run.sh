#!/usr/bin/env bash
# Run each fuzz target for a while (libFuzzer via atheris); fail if any target finds a crash.
#
#   fuzz/run.sh [target ...]          targets: frames handshake session (default: all three)
#
# Environment:
#   SFM_FUZZ_SECONDS  seconds per target (-max_total_time), default 20
#   SFM_FUZZ_SEED     libFuzzer -seed, default 1: the same inputs in the same order every run
#   SFM_FUZZ_RUNS     if set, stop each target after this many inputs (-runs), for a run that
#                     does not depend on the machine's speed
#   SFM_FUZZ_WORKDIR  where the grown corpus, logs and crash files go; default a temporary
#                     directory, removed after a clean run and kept (and named) after a crash
#   PYTHON            the interpreter, default .venv/bin/python (else python3)
#
# The checked-in seeds in fuzz/corpus/<target>/ are read, never written: new inputs go to the
# work directory. See docs/fuzzing.md for long runs, minimizing and reproducing a crash.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${SFM_FUZZ_SECONDS:-20}
seed=${SFM_FUZZ_SEED:-1}
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frames handshake session)

if ! "$python" -c "import atheris" 2>/dev/null; then
    echo "fuzz/run.sh: atheris does not import in $python; install it: $python -m pip install 'atheris>=2.3'" >&2
    exit 1
fi

if [ -n "${SFM_FUZZ_WORKDIR:-}" ]; then
    work=$SFM_FUZZ_WORKDIR
    mkdir -p "$work"
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/sfm-fuzz.XXXXXX")
    trap 'rc=$?; if [ $rc -eq 0 ]; then rm -rf "$work"; else echo "fuzz/run.sh: logs and crash files kept in $work" >&2; fi' EXIT
fi

failed=()
for t in "${targets[@]}"; do
    if [ ! -f "fuzz/fuzz_$t.py" ]; then
        echo "fuzz/run.sh: no target fuzz/fuzz_$t.py" >&2
        exit 2
    fi
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
    args=(-max_total_time="$seconds" -seed="$seed" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
        -artifact_prefix="$work/$t/artifacts/")
    [ -z "${SFM_FUZZ_RUNS:-}" ] || args+=(-runs="$SFM_FUZZ_RUNS")
    [ ! -f "fuzz/$t.dict" ] || args+=(-dict="fuzz/$t.dict")
    log="$work/$t/log"
    echo "+ $python fuzz/fuzz_$t.py ${args[*]} $work/$t/corpus fuzz/corpus/$t"
    rc=0
    "$python" "fuzz/fuzz_$t.py" "${args[@]}" "$work/$t/corpus" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
    # What libFuzzer says at the end: coverage (cov: edges, ft: features), corpus, speed.
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
    execs=$(grep -E '^stat::average_exec_per_sec' "$log" | awk '{print $2}' || true)
    crashes=$(find "$work/$t/artifacts" -type f | sort)
    if [ $rc -ne 0 ] || [ -n "$crashes" ]; then
        failed+=("$t")
        echo "FAIL $t (exit $rc)" >&2
        grep -v -E '^INFO: Instrumenting' "$log" | tail -n 40 >&2
        for f in $crashes; do
            echo "crash file: $f" >&2
            echo "  hex: $(od -An -v -tx1 "$f" | tr -d ' \n')" >&2
            echo "  reproduce: $python fuzz/fuzz_$t.py $f" >&2
        done
    else
        echo "ok   $t: ${done_line:-no DONE line} execs/s: ${execs:-?}"
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz/run.sh: crash in: ${failed[*]}" >&2
    exit 1
fi
