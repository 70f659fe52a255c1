"""``sfm bench``: rows, best of rounds, ratios against the right baseline, and the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import scaled

from sfm_core.bench.runner import (
    QUICK,
    Result,
    add_ratios,
    best_rows,
    by_scheme,
    parse_openssl_speed,
    pick_schemes,
    plan_steps,
    with_plain,
    wrapped,
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
    wrap = {(r["workload"], r["size"]): r for r in results if r["scheme"] == "tcp (wrapped receiver)"}
    assert set(wrap) == {("msg_rate", 100), ("throughput", 1 << 20)}
    for key, row in wrap.items():  # a pass-through receiver wrapper plugin against plain tcp
        assert row["value"] > 0 and row["baseline_name"] == "tcp" and row["baseline"] == tcp[key]["value"]
        assert row["ratio"] == pytest.approx(row["value"] / tcp[key]["value"])


# -- a plugin on the frame path: sfm_wrap_frame_receiver ------------------------------------


def test_tcp_alone_is_measured_again_with_a_receiver_wrapper_against_plain_tcp() -> None:
    steps, baselines = plan_steps(["tcp", "ws"], QUICK)
    labels = [s.label for s in steps if "wrapped" in s.label]
    assert labels == [
        "sfm tcp, receiver wrapped by a plugin: 100 B message rate",
        "sfm tcp, receiver wrapped by a plugin: 1 MiB throughput",
    ]
    assert all(s.repeat for s in steps if "wrapped" in s.label)  # in the interleaved rounds
    order = [s.label for s in steps if s.label.startswith("sfm tcp")][:4]
    assert [label.rsplit(": ", 1)[1] for label in order] == ["100 B message rate"] * 2 + ["1 MiB throughput"] * 2
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
    )
    assert proc.returncode == 0, proc.stderr
    assert "FAILED" not in proc.stderr, proc.stderr
    results = json.loads(out.read_text())["results"]
    rows = {(r["scheme"], r["workload"], r["size"]): r for r in results}
    for workload, size in [("msg_rate", 100), ("throughput", 1 << 20), ("throughput", 64 << 20), ("rtt_p50", 100)]:
        row, base = rows[(secure, workload, size)], rows[(plain, workload, size)]
        assert row["value"] > 0
        assert row["baseline_name"] == plain and row["baseline"] == base["value"]
        assert row["ratio"] == pytest.approx(row["value"] / base["value"])
    table = proc.stdout.splitlines()
    assert any(line.split()[:2] == [secure, "msg_rate"] and f"({plain})" in line for line in table)
    if secure == "stcp":
        assert rows[("stcp", "fanin_ready", 500)]["value"] == 500  # every mTLS client READY under one cert
        aes = [r for r in results if r["workload"] == "aes_gcm_speed"]
        if aes:  # openssl is installed
            vs = rows[("stcp", "vs_aes_gcm", 1 << 20)]
            assert vs["value"] == rows[("stcp", "throughput", 1 << 20)]["value"]
            assert vs["ratio"] == pytest.approx(vs["value"] / aes[0]["value"])
