#!/usr/bin/env bash
# Packaging smoke test, as a user installs sfm: build the four distributions as wheels, install
# the wheels (not editable checkouts, which hide missing package data) into a fresh virtual
# environment, and from a directory outside the checkout (so the checkout is not importable):
#   - `sfm drivers --json` lists all eight schemes, each `ok`;
#   - `sfm demo --json` exits 0 with every scheme exchanging messages, the secure ones included
#     (the demo skips those without trustme, so this checks each scheme's result, not the exit
#     code alone);
#   - each package ships py.typed (and the gRPC driver its .proto and .pyi), and the installed
#     modules are the wheel's, not the checkout's;
#   - the metadata carries the SPDX license, and no build printed a dated setuptools deprecation
#     (those turn into build failures on their date).
# Usage: tests/packaging/wheel_smoke.sh   (PYTHON=python3.x to pick the interpreter)
# Output: one line per step; pip's and the builds' output go to a log shown only on failure.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/sfm-wheel-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT
log="$work/log"
: >"$log"
start=$SECONDS

step() { echo "wheel smoke: $* ($((SECONDS - start)) s)"; }
fail() {
    echo "wheel smoke: FAILED: $*" >&2
    echo "---- last lines of the log ----" >&2
    tail -n 60 "$log" >&2
    exit 1
}
quiet() { "$@" >>"$log" 2>&1 || fail "$*"; }

# Build from a copy of the files git would commit (tracked and not ignored), not in place: an
# in-place build leaves build/ and *.egg-info in the checkout and can reuse a stale build/lib.
src="$work/src"
mkdir -p "$src"
(
    cd "$repo"
    git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        if [ -e "$f" ]; then printf '%s\0' "$f"; fi  # not a file deleted but not yet committed
    done | tar --null -T - -cf -
) | tar -xf - -C "$src"

venv="$work/venv"
quiet "$PYTHON" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
step "fresh venv at $venv"

# -v only so the log has setuptools' warnings to look for.
quiet "${pip[@]}" wheel -v --no-deps -w "$work/wheels" "$src" "$src/drivers/tcp" "$src/drivers/websocket" "$src/drivers/grpc"
n=$(find "$work/wheels" -name '*.whl' | wc -l)
[ "$n" -eq 4 ] || fail "expected 4 wheels, built $n: $(ls "$work/wheels")"
if grep -q "SetuptoolsDeprecationWarning" "$log"; then
    echo "wheel smoke: setuptools deprecation warnings in the build:" >&2
    grep -A6 "SetuptoolsDeprecationWarning" "$log" | sed 's/^/  /' >&2
    if grep -A6 "SetuptoolsDeprecationWarning" "$log" | grep -qE "By [0-9]{4}-"; then
        fail "a dated setuptools deprecation (a build failure from that date on); fix the pyproject.toml it names"
    fi
fi
step "built $(cd "$work/wheels" && echo *.whl)"

core=$(echo "$work"/wheels/sfm_core-*.whl)
# The demo extra brings trustme, which the secure schemes' demo needs.
quiet "${pip[@]}" install -q "$core[demo]" "$work"/wheels/sfm_driver_*.whl
step "installed the wheels and their dependencies"

run="$work/run"
mkdir -p "$run"
cd "$run"
unset PYTHONPATH PYTHONHOME

"$venv/bin/sfm" drivers --json >drivers.json 2>>"$log" || fail "sfm drivers --json exited $?"
"$venv/bin/python" - drivers.json <<'EOF' || fail "sfm drivers --json: see above"
import json, sys
want = {
    "tcp": "sfm-driver-tcp", "stcp": "sfm-driver-tcp",
    "ws": "sfm-driver-websocket", "http": "sfm-driver-websocket",
    "wss": "sfm-driver-websocket", "https": "sfm-driver-websocket",
    "grpc": "sfm-driver-grpc", "grpcs": "sfm-driver-grpc",
}
got = {d["scheme"]: d for d in json.load(open(sys.argv[1]))["drivers"]}
bad = [f"{s}: missing" for s in want if s not in got]
bad += [f"{s}: unexpected" for s in got if s not in want]
bad += [f"{s}: status {d['status']}: {d['error']}" for s, d in got.items() if d["status"] != "ok"]
bad += [f"{s}: from {got[s]['distribution']}" for s in want if s in got and got[s]["distribution"] != want[s]]
if bad:
    sys.exit("sfm drivers: " + "; ".join(bad))
EOF
step "sfm drivers: all 8 schemes ok"

rc=0
"$venv/bin/sfm" demo --json >demo.json 2>>"$log" || rc=$?
[ "$rc" -eq 0 ] || fail "sfm demo exited $rc"
"$venv/bin/python" - demo.json <<'EOF' || fail "sfm demo: see above"
import json, sys
want = {"tcp", "stcp", "ws", "http", "wss", "https", "grpc", "grpcs"}
results = {r["scheme"]: r for r in json.load(open(sys.argv[1]))["results"]}
bad = [f"{s}: not run" for s in sorted(want - results.keys())]
bad += [f"{s}: {r.get('error', 'incomplete')}" for s, r in sorted(results.items()) if not r["ok"]]
if bad:
    sys.exit("sfm demo: " + "; ".join(bad))
EOF
step "sfm demo: messages exchanged over all 8 schemes"

"$venv/bin/python" - "$venv" <<'EOF' || fail "installed files: see above"
import importlib, importlib.metadata as md, importlib.resources as res, os, sys, sysconfig
site = os.path.realpath(sysconfig.get_paths()["purelib"])
bad = []
need = {
    "sfm_core": ["py.typed"],
    "sfm_driver_tcp": ["py.typed"],
    "sfm_driver_websocket": ["py.typed"],
    "sfm_driver_grpc": ["py.typed", "proto/streamer.proto", "proto/streamer_pb2.pyi"],
}
for pkg, files in need.items():
    mod = importlib.import_module(pkg)
    where = os.path.realpath(os.path.dirname(mod.__file__))
    if not where.startswith(site + os.sep):
        bad.append(f"{pkg} imported from {where}, not the venv's site-packages")
    bad += [f"{pkg}: {f} not installed" for f in files if not res.files(pkg).joinpath(f).is_file()]
for dist in ("sfm-core", "sfm-driver-tcp", "sfm-driver-websocket", "sfm-driver-grpc"):
    lic = md.metadata(dist).get("License-Expression")
    if lic != "Apache-2.0":
        bad.append(f"{dist}: License-Expression {lic!r}")
if bad:
    sys.exit("\n".join(bad))
EOF
step "py.typed and package data installed, imports from the wheels, License-Expression Apache-2.0"
echo "wheel smoke: ok in $((SECONDS - start)) s"
