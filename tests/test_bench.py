"""``sfm bench``: the statistics, rows, best of rounds, ratios, --compare, third-party baselines and the JSON."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap

import pytest
from helpers import scaled
from hypothesis import given
from hypothesis import strategies as st

from sfm_core.bench import stats
from sfm_core.bench.runner import (
    QUICK,
    Result,
    add_ratios,
    add_reference_rows,
    best_rows,
    by_scheme,
    compare,
    fit,
    parse_openssl_speed,
    pick_schemes,
    plan_steps,
    read_json,
    table,
    with_plain,
    wrapped,
    write_json,
)


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
        env={**os.environ, "COLUMNS": "250"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "FAILED" not in proc.stderr, proc.stderr
    assert "[1/" in proc.stderr  # progress on stderr, the table on stdout
    assert "ratio" in proc.stdout.splitlines()[0] and "cpu tx us" in proc.stdout.splitlines()[0]
    data = json.loads(out.read_text())
    assert data["version"] == 2 and {"nproc", "cpu", "python", "date"} <= set(data["machine"])
    results = data["results"]
    keys = {"scheme", "workload", "size", "value", "unit", "baseline", "ratio", "cpu_tx_us", "cpu_rx_us", "note"}
    assert all(keys <= set(r) for r in results)
    tcp = {(r["workload"], r["size"]): r for r in results if r["scheme"] == "tcp"}
    raw = {(r["workload"], r["size"]): r["value"] for r in results if r["scheme"] == "raw"}
    measured = [("msg_rate", 100), ("msg_rate_4s", 100), ("throughput", 1 << 20), ("throughput", 64 << 20)]
    measured += [("throughput", 256 << 20), ("rtt_p50", 100)]
    for key in measured:  # the same workloads for sfm and the raw baseline, each with its ratio
        assert tcp[key]["value"] > 0
        assert tcp[key]["baseline"] == raw[key]
        assert tcp[key]["ratio"] == pytest.approx(tcp[key]["value"] / raw[key])
        assert tcp[key]["cpu_tx_us"] > 0 and tcp[key]["cpu_rx_us"] > 0  # both processes' CPU
    batch = tcp[("msg_rate_b64", 100)]  # send_messages, against raw's one send per message
    assert batch["baseline"] == raw[("msg_rate", 100)] and "64" in batch["note"]
    for side in ("tx", "rx"):  # peak RSS of both processes, against the message size
        row, base = tcp[(f"peak_rss_{side}", 256 << 20)], raw[(f"peak_rss_{side}", 256 << 20)]
        assert row["unit"] == "MiB" and row["value"] >= 256  # each side held the message once
        assert row["note"] == f"{row['value'] / 256:.2f} x message" and row["baseline"] == base
    assert tcp[("fanin_ready", 500)]["value"] == 500  # every light client got READY
    wrap = {(r["workload"], r["size"]): r for r in results if r["scheme"] == "tcp (wrapped receiver)"}
    assert set(wrap) == {("msg_rate", 100), ("throughput", 1 << 20)}
    for key, row in wrap.items():  # a pass-through receiver wrapper plugin against plain tcp
        assert row["value"] > 0 and row["baseline_name"] == "tcp" and row["baseline"] == tcp[key]["value"]
        assert row["ratio"] == pytest.approx(row["value"] / tcp[key]["value"])
    zmq = [r for r in results if r["scheme"].startswith("pyzmq")]
    if zmq:  # the reference row, when pyzmq is installed
        ref = next(r["value"] for r in zmq if r["workload"] == "msg_rate")
        vs = tcp[("msg_rate_vs_pyzmq", 100)]
        assert vs["baseline"] == ref and vs["ratio"] == pytest.approx(tcp[("msg_rate", 100)]["value"] / ref)
    else:
        assert "pyzmq" in proc.stderr and "skipped" in proc.stderr


# -- a plugin on the frame path: sfm_wrap_frame_receiver ------------------------------------


def test_tcp_alone_is_measured_again_with_a_receiver_wrapper_against_plain_tcp() -> None:
    steps, baselines = plan_steps(["tcp", "ws"], QUICK)
    labels = [s.label for s in steps if "wrapped" in s.label]
    assert labels == [
        "sfm tcp, receiver wrapped by a plugin: 100 B message rate",
        "sfm tcp, receiver wrapped by a plugin: 1 MiB throughput",
    ]
    assert all(s.repeat for s in steps if "wrapped" in s.label)  # in the interleaved rounds
    every = [s.label for s in steps]
    for i, label in enumerate(every):  # each right after the step it is compared with
        if "wrapped" in label:
            assert every[i - 1] == "sfm tcp: " + label.rsplit(": ", 1)[1]
    assert baselines[wrapped("tcp")] == ("tcp",) and wrapped("ws") not in baselines
    assert wrapped("tcp") not in plan_steps(["ws"], QUICK)[1]


def test_rows_are_grouped_by_scheme_in_order_of_first_appearance() -> None:
    rows = [
        Result(scheme, w, 100, 1.0, "msg/s")
        for scheme, w in [("raw", "a"), ("tcp", "a"), ("w", "a"), ("tcp", "b"), ("w", "b"), ("tcp", "c")]
    ]
    assert [(r.scheme, r.workload) for r in by_scheme(rows)] == [
        ("raw", "a"),
        ("tcp", "a"),
        ("tcp", "b"),
        ("tcp", "c"),
        ("w", "a"),
        ("w", "b"),
    ]


def test_the_bench_wrapper_counts_frames_and_passes_batches_on_whole() -> None:
    from sfm_core.bench.wrapper import CountingReceiver, WrapperPlugin
    from sfm_core.driver import FrameReceiver

    class Inner(FrameReceiver):
        def __init__(self) -> None:
            self.batches: list[list[bytes]] = []

        def process_frame(self, frame) -> None:
            raise AssertionError("a batch must stay a batch")

        def process_frames(self, frames) -> None:
            self.batches.append(list(frames))

    inner = Inner()
    receiver = WrapperPlugin().sfm_wrap_frame_receiver(None, None, inner)
    assert isinstance(receiver, CountingReceiver) and receiver.inner is inner
    before = CountingReceiver.frames
    receiver.process_frames([b"a", b"b"])
    receiver.process_frames([b"c"])
    assert inner.batches == [[b"a", b"b"], [b"c"]]
    assert CountingReceiver.frames - before == 3


def test_bench_refuses_a_repeat_below_one() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sfm_core.cli", "bench", "--repeat", "0"],
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert proc.returncode != 0 and "--repeat must be at least 1" in proc.stderr


# -- secure schemes: the cost of TLS, secure / plain in the same run ----------------------------


def test_a_secure_scheme_is_compared_with_its_plain_scheme_only() -> None:
    rows = [
        Result("raw", "msg_rate", 100, 1000.0, "msg/s"),
        Result("raw", "rtt_p50", 100, 50.0, "us"),
        Result("tcp", "msg_rate", 100, 500.0, "msg/s"),
        Result("stcp", "msg_rate", 100, 400.0, "msg/s"),
        Result("stcp", "rtt_p50", 100, 80.0, "us"),  # tcp has no such row: no ratio, not raw's
    ]
    add_ratios(rows, {"tcp": "raw", "stcp": ("tcp",)})
    ratios = {(r.scheme, r.workload): (r.baseline_name, r.ratio) for r in rows}
    assert ratios[("stcp", "msg_rate")] == ("tcp", 0.8)
    assert ratios[("stcp", "rtt_p50")] == (None, None)
    assert ratios[("tcp", "msg_rate")] == ("raw", 0.5)


def test_secure_schemes_follow_their_plain_scheme_which_is_added_if_missing() -> None:
    assert with_plain(["wss"]) == ["ws", "wss"]
    assert with_plain(["stcp", "grpc", "tcp", "grpcs"]) == ["tcp", "stcp", "grpc", "grpcs"]
    assert with_plain(["tcp"]) == ["tcp"]


def test_by_default_one_scheme_per_driver_and_security() -> None:
    from sfm_core import get_registry
    from sfm_core.tls import SECURE_SCHEMES

    registry = get_registry()
    installed = [e.scheme for e in registry.load_all() if e.status == "ok"]
    picked = pick_schemes(registry, installed)
    assert len(picked) == len(set(picked))
    for scheme in installed:  # each installed (driver, secure or not) is measured once
        cls, secure = registry.get_driver_class(scheme), scheme in SECURE_SCHEMES
        assert [p for p in picked if registry.get_driver_class(p) is cls and (p in SECURE_SCHEMES) == secure]
    for plain, secure in (("tcp", "stcp"), ("ws", "wss"), ("grpc", "grpcs")):
        if secure in installed:
            assert plain in picked and secure in picked
    assert "http" not in picked and "https" not in picked  # ws and wss stand for them


def test_the_aes_gcm_column_of_openssl_speed() -> None:
    out = (
        "The 'numbers' are in 1000s of bytes per second processed.\n"
        "type             16 bytes     64 bytes    256 bytes   1024 bytes   8192 bytes  16384 bytes\n"
        "AES-128-GCM     521034.12k  1381422.36k  2951066.11k  3929218.05k  4304573.10k  4336926.72k\n"
    )
    assert parse_openssl_speed(out, 16384) == pytest.approx(4336.92672)
    assert parse_openssl_speed(out, 64) == pytest.approx(1381.42236)
    only = "type          16384 bytes\nAES-128-GCM    4336926.72k\n"
    assert parse_openssl_speed(only, 16384) == pytest.approx(4336.92672)


def test_the_throwaway_pki_names_both_sides(tmp_path) -> None:
    pytest.importorskip("trustme")
    import ipaddress

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from sfm_core.pki import make_pki

    pki = make_pki(str(tmp_path), "bench-server", "bench-client")
    assert set(pki.server) == {"ca_cert", "server_cert", "server_key"}
    assert set(pki.client) == {"ca_cert", "client_cert", "client_key"}
    for side, cn in (("server", "bench-server"), ("client", "bench-client")):
        with open(getattr(pki, side)[f"{side}_cert"], "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [cn]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def _secure_scheme() -> str:
    """The secure scheme the JSON test measures: stcp if installed (the quickest), else another."""
    from sfm_core import get_registry

    installed = {e.scheme for e in get_registry().load_all() if e.status == "ok"}
    for scheme in ("stcp", "wss", "grpcs"):
        if scheme in installed:
            return scheme
    pytest.skip("no secure scheme installed")


def test_bench_quick_over_a_secure_scheme_reports_secure_over_plain(tmp_path) -> None:
    pytest.importorskip("trustme")
    from sfm_core.tls import SECURE_SCHEMES

    secure = _secure_scheme()
    plain = SECURE_SCHEMES[secure]
    out = tmp_path / "bench.json"
    proc = subprocess.run(  # only the secure scheme: the bench adds its plain one
        [sys.executable, "-m", "sfm_core.cli", "bench", "--quick", "--schemes", secure, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=scaled(240),
        env={**os.environ, "COLUMNS": "250"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "FAILED" not in proc.stderr, proc.stderr
    results = json.loads(out.read_text())["results"]
    rows = {(r["scheme"], r["workload"], r["size"]): r for r in results}
    secure_rows = [("msg_rate", 100), ("msg_rate_4s", 100), ("throughput", 1 << 20), ("throughput", 64 << 20)]
    secure_rows += [("throughput", 256 << 20), ("peak_rss_rx", 256 << 20), ("rtt_p50", 100)]
    for workload, size in secure_rows:
        row, base = rows[(secure, workload, size)], rows[(plain, workload, size)]
        assert row["value"] > 0
        assert row["baseline_name"] == plain and row["baseline"] == base["value"]
        assert row["ratio"] == pytest.approx(row["value"] / base["value"])
    table = proc.stdout.splitlines()
    assert any(line.split()[:2] == [secure, "msg_rate"] and f"  {plain}  " in line for line in table)
    if secure == "stcp":
        assert rows[("stcp", "fanin_ready", 500)]["value"] == 500  # every mTLS client READY under one cert
        aes = [r for r in results if r["workload"] == "aes_gcm_speed"]
        if aes:  # openssl is installed
            vs = rows[("stcp", "vs_aes_gcm", 1 << 20)]
            assert vs["value"] == rows[("stcp", "throughput", 1 << 20)]["value"]
            assert vs["ratio"] == pytest.approx(vs["value"] / aes[0]["value"])


# -- the statistics, once for every row ------------------------------------------------------

_samples = st.lists(st.floats(min_value=0, max_value=1e3, allow_nan=False), min_size=1, max_size=200)


@given(_samples)
def test_p50_is_the_median_and_p0_p100_the_extremes(samples: list[float]) -> None:
    assert stats.percentile(samples, 50) == pytest.approx(statistics.median(samples))
    assert stats.percentile(samples, 0) == min(samples)
    assert stats.percentile(samples, 100) == max(samples)


@given(_samples, st.floats(0, 100), st.floats(0, 100))
def test_percentiles_are_monotone_and_within_the_samples(samples: list[float], q1: float, q2: float) -> None:
    lo, hi = sorted((q1, q2))
    assert min(samples) <= stats.percentile(samples, lo) <= stats.percentile(samples, hi) <= max(samples)


@given(st.lists(st.floats(min_value=0, max_value=1e3, allow_nan=False), min_size=2, max_size=200))
def test_percentiles_agree_with_the_inclusive_quartiles(samples: list[float]) -> None:
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    assert [stats.percentile(samples, q) for q in (25, 50, 75)] == pytest.approx([q1, q2, q3], abs=1e-9)


def test_a_percentile_of_nothing_or_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


@given(st.lists(st.integers(), min_size=0, max_size=300))
def test_warm_up_drops_the_first_tenth_and_keeps_the_rest_in_order(samples: list[int]) -> None:
    kept = stats.warm(samples)
    assert kept == samples[len(samples) - len(kept) :]
    assert len(samples) - len(kept) == min(len(samples) // 10, max(len(samples) - 1, 0))
    assert kept or not samples


def test_rates_and_cpu_per_message() -> None:
    assert stats.rate(1000, 0.5) == 2000
    assert stats.mb_per_s(10, 1_000_000, 2.0) == 5.0
    assert stats.per_message_us(0.002, 1000) == pytest.approx(2.0)


# -- rows: best of rounds, ratios, the reference row, the table ----------------------------------


def test_the_cpu_columns_of_a_row_are_the_least_of_its_rounds() -> None:
    rounds = [
        [Result("raw", "msg_rate", 100, 900.0, "msg/s", cpu_tx_us=3.0, cpu_rx_us=2.0)],
        [Result("raw", "msg_rate", 100, 1000.0, "msg/s", cpu_tx_us=4.0, cpu_rx_us=1.5)],
        [Result("raw", "msg_rate", 100, 950.0, "msg/s", cpu_tx_us=2.5, cpu_rx_us=None)],
    ]
    (row,) = best_rows(rounds)
    assert (row.value, row.cpu_tx_us, row.cpu_rx_us) == (1000.0, 2.5, 1.5)


def test_a_batch_row_is_compared_with_the_baselines_one_send_per_message_rate() -> None:
    rows = [
        Result("raw", "msg_rate", 100, 1000.0, "msg/s"),
        Result("raw", "msg_rate_4s", 100, 800.0, "msg/s"),
        Result("tcp", "msg_rate_b64", 100, 3000.0, "msg/s"),
        Result("tcp", "msg_rate_4s", 100, 400.0, "msg/s"),
    ]
    add_ratios(rows, {"tcp": "raw"})
    got = {r.workload: (r.baseline, r.ratio) for r in rows if r.scheme == "tcp"}
    assert got == {"msg_rate_b64": (1000.0, 3.0), "msg_rate_4s": (800.0, 0.5)}


def test_tcp_rates_are_also_given_against_the_reference_row() -> None:
    rows = [
        Result("pyzmq 27", "msg_rate", 100, 400.0, "msg/s"),
        Result("tcp", "msg_rate", 100, 200.0, "msg/s", 1000.0, 0.2, "raw"),
        Result("tcp", "msg_rate_4s", 100, 100.0, "msg/s", note="4 sender threads"),
        Result("tcp", "throughput", 1 << 20, 5.0, "MB/s"),
    ]
    out = add_reference_rows(rows, "tcp", "pyzmq 27")
    assert [(r.workload, r.ratio, r.baseline_name) for r in out if r.scheme == "tcp"] == [
        ("msg_rate", 0.2, "raw"),
        ("msg_rate_vs_pyzmq", 0.5, "pyzmq 27"),
        ("msg_rate_4s", None, None),
        ("msg_rate_4s_vs_pyzmq", 0.25, "pyzmq 27"),
        ("throughput", None, None),
    ]
    assert add_reference_rows(rows[1:], "tcp", "pyzmq 27") == rows[1:]  # no pyzmq: nothing added


def test_the_table_fits_the_width_by_leaving_columns_out_and_says_which() -> None:
    rows = [
        Result("tcp (wrapped receiver)", "msg_rate", 100, 123456.7, "msg/s", 1.0, 0.97, "tcp", 5.5, 4.4, "a long note"),
    ]
    wide = table(rows, width=400)
    assert "a long note" in wide and "left out" not in wide
    narrow = table(rows, width=70)
    assert all(len(line) <= 70 for line in narrow.splitlines()[:-1])
    assert "note" not in narrow.splitlines()[0] and "123,456.7" in narrow and "0.97" in narrow
    assert narrow.splitlines()[-1].startswith("(left out to fit 70 columns: note")
    assert fit(("a", "b"), [("x", "y")], width=10) == "a  b\n-  -\nx  y"


# -- --compare: this run against an earlier one ---------------------------------------------------


def _write(path, rows: list[dict], version: int | None = 2) -> str:
    data: dict = {"results": rows}
    if version is not None:
        data["version"] = version
    path.write_text(json.dumps(data))
    return str(path)


def test_compare_marks_each_row_better_or_worse_by_its_unit_and_names_missing_rows(tmp_path) -> None:
    base = _write(  # a version-1 file (before CPU columns): still read
        tmp_path / "base.json",
        [
            {"scheme": "tcp", "workload": "msg_rate", "size": 100, "value": 100.0, "unit": "msg/s"},
            {"scheme": "tcp", "workload": "rtt_p50", "size": 100, "value": 50.0, "unit": "us"},
            {"scheme": "tcp", "workload": "throughput", "size": 1 << 20, "value": 10.0, "unit": "MB/s"},
            {"scheme": "tcp", "workload": "gone", "size": 100, "value": 1.0, "unit": "msg/s"},
        ],
        version=None,
    )
    now = tmp_path / "now.json"
    write_json(
        [
            Result("tcp", "msg_rate", 100, 150.0, "msg/s", cpu_tx_us=2.0),
            Result("tcp", "rtt_p50", 100, 60.0, "us"),
            Result("tcp", "throughput", 1 << 20, 10.0, "MB/s"),
            Result("tcp", "msg_rate_4s", 100, 1.0, "msg/s"),
        ],
        str(now),
    )
    out = compare(read_json(str(now)), read_json(base), "base.json", width=200)
    lines = {tuple(line.split()[:2]): line for line in out.splitlines()[2:]}
    assert lines[("tcp", "msg_rate")].split()[-2:] == ["1.50", "better"]  # a rate: higher is better
    assert lines[("tcp", "rtt_p50")].split()[-2:] == ["1.20", "worse"]  # a time: lower is better
    assert lines[("tcp", "throughput")].split()[-2:] == ["1.00", "same"]
    assert lines[("tcp", "msg_rate_4s")].endswith("only in this run")
    assert lines[("tcp", "gone")].endswith("only in base.json")
    assert not any("cpu" in line for line in out.splitlines())  # no CPU in the base: no CPU ratio


def test_compare_gives_cpu_ratios_lower_is_better(tmp_path) -> None:
    then = [Result("raw", "msg_rate", 100, 10.0, "msg/s", cpu_tx_us=2.0, cpu_rx_us=1.0)]
    now = [Result("raw", "msg_rate", 100, 10.0, "msg/s", cpu_tx_us=1.0, cpu_rx_us=2.0)]
    out = compare(now, then, width=200)
    assert "msg_rate (cpu tx us)" in out and "msg_rate (cpu rx us)" in out
    verdicts = {line.split("(")[1].split(")")[0]: line.split()[-1] for line in out.splitlines() if "(cpu" in line}
    assert verdicts == {"cpu tx us": "better", "cpu rx us": "worse"}


def test_bench_refuses_an_unreadable_compare_file_before_running(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = subprocess.run(
        [sys.executable, "-m", "sfm_core.cli", "bench", "--schemes", "tcp", "--compare", str(bad)],
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert proc.returncode != 0 and "not a bench JSON file" in proc.stderr
    assert "[1/" not in proc.stderr  # nothing was measured


# -- third-party baselines: the sfm.bench_baselines entry points ----------------------------------


@pytest.fixture
def baseline_dists(tmp_path, monkeypatch):
    """A fake distribution with three ``sfm.bench_baselines`` entry points: a good one (raw
    sockets under another name), one whose module fails to import, one that is no Baseline."""
    info = tmp_path / "fake_bench_baselines-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-bench-baselines\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[sfm.bench_baselines]\n"
        "fakescheme = fake_baselines:FakeBaseline\n"
        "broken = fake_broken:Nothing\n"
        "notone = fake_baselines:NOT_A_BASELINE\n"
        "mixed = fake_baselines:Mixed\n"
        "fakeasync = sfm_core.bench.baselines.websockets:WebsocketsBaseline\n"
    )
    (tmp_path / "fake_baselines.py").write_text(
        textwrap.dedent(
            """
            from sfm_core.bench.baselines.raw import RawBaseline

            class FakeBaseline(RawBaseline):
                name = "fake lib 1.0"

            NOT_A_BASELINE = object()

            class Mixed(RawBaseline):
                async def listen(self):
                    return super().listen()
            """
        )
    )
    (tmp_path / "fake_broken.py").write_text("raise RuntimeError('fake_broken cannot load')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # The receiving child process must find the distribution too.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    yield tmp_path
    for name in ("fake_baselines", "fake_broken"):
        sys.modules.pop(name, None)


def test_a_third_party_baseline_is_loaded_and_broken_ones_are_named_and_skipped(baseline_dists, caplog) -> None:
    from sfm_core.bench import baselines

    found = baselines.load()
    key, base = found.for_("fakescheme")
    assert key == "ep:fakescheme" and base.name == "fake lib 1.0" and isinstance(base, baselines.Baseline)
    errors = dict(found.errors)
    assert set(errors) == {"broken", "notone", "mixed"}
    assert "fake_broken cannot load" in errors["broken"] and "does not implement Baseline" in errors["notone"]
    assert "both be coroutines or neither" in errors["mixed"]
    assert "broken" in caplog.text and found.for_("broken") is None
    assert found.for_("tcp")[0] == "raw"  # the built-ins are still there


def test_a_third_party_baseline_runs_through_the_same_harness_in_both_processes(baseline_dists) -> None:
    from sfm_core.bench import baselines
    from sfm_core.bench import workloads as wl

    key, base = baselines.load().for_("fakescheme")
    subject = wl.BaselineSubject(key, base)
    m = wl.oneway(subject, 100, 200)  # the child resolves the same entry point by its key
    assert (m.count, m.size) == (200, 100) and m.elapsed > 0 and m.cpu_receiver > 0
    rows = {r.workload: r for r in _rtt_rows(subject)}
    assert rows["rtt_p50"].scheme == "fake lib 1.0" and rows["rtt_p50"].value <= rows["rtt_p99"].value


def test_an_asyncio_baseline_runs_on_an_event_loop_in_both_processes(baseline_dists) -> None:
    pytest.importorskip("websockets")
    from sfm_core.bench import baselines
    from sfm_core.bench import workloads as wl

    key, base = baselines.load().for_("fakeasync")
    assert baselines.is_async(base)
    subject = wl.BaselineSubject(key, base)
    for senders in (1, 4):  # tasks stand for the sender threads
        m = wl.oneway(subject, 100, 200, senders=senders)
        assert m.count == 200 and m.elapsed > 0 and m.cpu_sender > 0 and m.cpu_receiver > 0
    rows = {r.workload: r for r in _rtt_rows(subject)}
    assert 0 < rows["rtt_p50"].value <= rows["rtt_p99"].value


def _rtt_rows(subject) -> list[Result]:
    from dataclasses import replace

    from sfm_core.bench import runner

    return runner._rtt(subject, replace(QUICK, rtt_count=50))


def test_every_scheme_gets_the_same_workloads_and_an_unavailable_baseline_is_skipped_with_a_note() -> None:
    from sfm_core.bench import baselines
    from sfm_core.bench.baselines.raw import RawBaseline

    class Missing(RawBaseline):
        name = "missing lib"

        def available(self) -> str | None:
            return "missinglib is not installed"

    found = baselines.load()
    found.by_key["websockets"] = Missing()
    found.by_key["pyzmq"] = Missing()
    notes: list[str] = []
    steps, names = plan_steps(["tcp", "ws"], QUICK, baselines=found, progress=notes.append)
    assert notes.count("baseline missing lib skipped: missinglib is not installed") == 2
    assert names["ws"] == "raw"  # compared with raw sockets instead
    labels = [s.label for s in steps]
    assert not any(label.startswith("missing lib") for label in labels)
    workloads = [label.split(": ", 1)[1] for label in labels if label.startswith("raw sockets")]
    for who in ("sfm ws", "sfm tcp"):
        mine = [label.split(": ", 1)[1] for label in labels if label.startswith(f"{who}: ")]
        assert [w for w in mine if "send_messages" not in w and "fan-in" not in w] == workloads
    assert "256 MiB throughput, peak RSS" in workloads and "100 B message rate, 4 sender threads" in workloads
    assert any("send_messages x64" in label for label in labels if label.startswith("sfm tcp: "))
    assert not any("send_messages" in label for label in labels if label.startswith("sfm ws: "))
