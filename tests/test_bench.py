"""``sfm bench``: rows, best of rounds, ratios against the right baseline, and the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import scaled

from sfm_core.bench.runner import Result, add_ratios, best_rows


def test_each_scheme_is_compared_with_its_own_baseline_else_raw() -> None:
    rows = [
        Result("raw", "msg_rate", 100, 1000.0, "msg/s"),
        Result("raw", "throughput", 1 << 20, 500.0, "MB/s"),
        Result("bare lib", "msg_rate", 100, 200.0, "msg/s"),
        Result("ws", "msg_rate", 100, 300.0, "msg/s"),
        Result("ws", "throughput", 1 << 20, 250.0, "MB/s"),  # the bare lib has no such row
        Result("tcp", "msg_rate", 100, 600.0, "msg/s"),
        Result("tcp", "fanin_ready", 500, 500.0, "endpoints"),  # nothing to compare with
    ]
    add_ratios(rows, {"ws": "bare lib", "tcp": "raw"})
    ratios = {(r.scheme, r.workload): (r.baseline_name, r.ratio) for r in rows}
    assert ratios[("ws", "msg_rate")] == ("bare lib", 1.5)
    assert ratios[("ws", "throughput")] == ("raw", 0.5)
    assert ratios[("tcp", "msg_rate")] == ("raw", 0.6)
    assert ratios[("tcp", "fanin_ready")] == (None, None)
    assert ratios[("raw", "msg_rate")] == (None, None) and ratios[("bare lib", "msg_rate")] == (None, None)


def test_a_row_is_the_best_of_its_rounds() -> None:
    rounds = [
        [Result("raw", "rtt_p50", 100, rtt, "us"), Result("raw", "throughput", 1 << 20, mbps, "MB/s")]
        for rtt, mbps in [(60.0, 2100.0), (200.0, 5300.0), (62.0, 5100.0)]
    ]
    assert [(r.workload, r.value) for r in best_rows(rounds)] == [("rtt_p50", 60.0), ("throughput", 5300.0)]


def test_bench_quick_over_tcp_writes_the_documented_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sfm_core.cli", "bench", "--quick", "--schemes", "tcp", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=scaled(180),
    )
    assert proc.returncode == 0, proc.stderr
    assert "[1/" in proc.stderr  # progress on stderr, the table on stdout
    assert "ratio" in proc.stdout.splitlines()[0]
    results = json.loads(out.read_text())["results"]
    assert all({"scheme", "workload", "size", "value", "unit", "baseline", "ratio"} <= set(r) for r in results)
    tcp = {(r["workload"], r["size"]): r for r in results if r["scheme"] == "tcp"}
    raw = {(r["workload"], r["size"]): r["value"] for r in results if r["scheme"] == "raw"}
    for key in [("msg_rate", 100), ("throughput", 1 << 20), ("throughput", 64 << 20), ("rtt_p50", 100)]:
        assert tcp[key]["value"] > 0
        assert tcp[key]["baseline"] == raw[key]
        assert tcp[key]["ratio"] == pytest.approx(tcp[key]["value"] / raw[key])
    assert tcp[("fanin_ready", 500)]["value"] == 500  # every light client got READY


def test_bench_refuses_a_repeat_below_one() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sfm_core.cli", "bench", "--repeat", "0"],
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert proc.returncode != 0 and "--repeat must be at least 1" in proc.stderr
