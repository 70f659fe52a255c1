"""Plans and runs ``sfm bench``, shows progress, prints the table, writes JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import workloads as wl

log = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass
class Result:
    scheme: str
    workload: str
    size: int
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    baseline_name: str | None = None


@dataclass
class Plan:
    rate_count: int
    mib1_count: int
    mib64_count: int
    rtt_count: int
    fanin: dict[str, int]


FULL = Plan(rate_count=200_000, mib1_count=400, mib64_count=8, rtt_count=5_000, fanin={"tcp": 10_000})
QUICK = Plan(rate_count=20_000, mib1_count=50, mib64_count=2, rtt_count=500, fanin={"tcp": 500})
DEFAULT_FANIN = 1_000


def _rate(elapsed: float, count: int) -> float:
    return (count - 1) / elapsed


def _mbps(elapsed: float, count: int, size: int) -> float:
    return (count - 1) * size / elapsed / 1e6


def _baseline_for(scheme: str) -> Any:
    from sfm_core.plugins import get_plugin_manager

    try:
        return get_plugin_manager().hook.sfm_bench_baseline(scheme=scheme)
    except Exception:
        log.exception("bench baseline of %s failed", scheme)
        return None


def run(schemes: list[str], plan: Plan, progress: Callable[[str], None]) -> list[Result]:
    """Measure the raw baseline and sfm over each scheme; return rows with ratios."""
    from sfm_core import get_registry

    registry = get_registry()
    for scheme in schemes:
        registry.get_driver_class(scheme)  # loads the driver module, which may add a baseline hook
    steps: list[tuple[str, Callable[[], list[Result]]]] = []
    raw: dict[str, float] = {}

    def raw_steps() -> None:
        def rate() -> list[Result]:
            v = _rate(wl.raw_oneway(100, plan.rate_count), plan.rate_count)
            raw["rate"] = v
            return [Result("raw", "msg_rate", 100, v, "msg/s")]

        def tput(size: int, count: int) -> Callable[[], list[Result]]:
            def f() -> list[Result]:
                v = _mbps(wl.raw_oneway(size, count), count, size)
                raw[f"tput{size}"] = v
                return [Result("raw", "throughput", size, v, "MB/s")]

            return f

        def rtt() -> list[Result]:
            r = wl.raw_rtt(100, plan.rtt_count)
            raw["p50"], raw["p99"] = r["p50_us"], r["p99_us"]
            return [Result("raw", "rtt_p50", 100, r["p50_us"], "us"), Result("raw", "rtt_p99", 100, r["p99_us"], "us")]

        steps.append(("raw sockets: 100 B message rate", rate))
        steps.append(("raw sockets: 1 MiB throughput", tput(MiB, plan.mib1_count)))
        steps.append(("raw sockets: 64 MiB throughput", tput(64 * MiB, plan.mib64_count)))
        steps.append(("raw sockets: 100 B round trip", rtt))

    raw_steps()
    for scheme in schemes:
        base = _baseline_for(scheme)
        base_vals: dict[str, float] = {}
        if base is not None:
            bname = base.name

            def b_rate(base: Any = base, bname: str = bname, vals: dict = base_vals, scheme: str = scheme) -> list:
                v = base.run("rate", 100, plan.rate_count)["msgs_per_s"]
                vals["rate"] = v
                return [Result(bname, "msg_rate", 100, v, "msg/s")]

            def b_tput(size: int, count: int, base: Any = base, bname: str = bname, vals: dict = base_vals) -> Any:
                def f() -> list[Result]:
                    v = base.run("throughput", size, count)["mb_per_s"]
                    vals[f"tput{size}"] = v
                    return [Result(bname, "throughput", size, v, "MB/s")]

                return f

            def b_rtt(base: Any = base, bname: str = bname, vals: dict = base_vals) -> list:
                r = base.run("rtt", 100, plan.rtt_count)
                vals["p50"], vals["p99"] = r["p50_us"], r["p99_us"]
                return [
                    Result(bname, "rtt_p50", 100, r["p50_us"], "us"),
                    Result(bname, "rtt_p99", 100, r["p99_us"], "us"),
                ]

            steps.append((f"{bname}: 100 B message rate", b_rate))
            steps.append((f"{bname}: 1 MiB throughput", b_tput(MiB, plan.mib1_count)))
            steps.append((f"{bname}: 64 MiB throughput", b_tput(64 * MiB, plan.mib64_count)))
            steps.append((f"{bname}: 100 B round trip", b_rtt))

        def ref(key: str, vals: dict = base_vals, base: Any = base) -> tuple[float | None, str]:
            if key in vals:
                return vals[key], base.name
            return raw.get(key), "raw"

        def s_rate(scheme: str = scheme, ref: Callable = ref) -> list[Result]:
            v = _rate(wl.sfm_oneway(scheme, 100, plan.rate_count), plan.rate_count)
            return [_with_ratio(Result(scheme, "msg_rate", 100, v, "msg/s"), *ref("rate"))]

        def s_tput(size: int, count: int, scheme: str = scheme, ref: Callable = ref) -> Callable[[], list[Result]]:
            def f() -> list[Result]:
                v = _mbps(wl.sfm_oneway(scheme, size, count), count, size)
                return [_with_ratio(Result(scheme, "throughput", size, v, "MB/s"), *ref(f"tput{size}"))]

            return f

        def s_rtt(scheme: str = scheme, ref: Callable = ref) -> list[Result]:
            r = wl.sfm_rtt(scheme, 100, plan.rtt_count)
            return [
                _with_ratio(Result(scheme, "rtt_p50", 100, r["p50_us"], "us"), *ref("p50")),
                _with_ratio(Result(scheme, "rtt_p99", 100, r["p99_us"], "us"), *ref("p99")),
            ]

        steps.append((f"sfm {scheme}: 100 B message rate", s_rate))
        steps.append((f"sfm {scheme}: 1 MiB throughput", s_tput(MiB, plan.mib1_count)))
        steps.append((f"sfm {scheme}: 64 MiB throughput", s_tput(64 * MiB, plan.mib64_count)))
        steps.append((f"sfm {scheme}: 100 B round trip", s_rtt))

        clients = wl.tcp_fanin if scheme == "tcp" else getattr(base, "fanin", None)
        if clients is not None:
            n = plan.fanin.get(scheme, min(DEFAULT_FANIN, plan.fanin.get("tcp", DEFAULT_FANIN)))

            def s_fanin(scheme: str = scheme, n: int = n, clients: Callable = clients) -> list[Result]:
                r = wl.sfm_fanin(scheme, n, 60.0, clients)
                return [
                    Result(scheme, "fanin_ready", n, r["ready"], "endpoints"),
                    Result(scheme, "fanin_seconds", n, r["seconds"], "s"),
                    Result(scheme, "fanin_rss", n, r["rss"] / MiB, "MiB"),
                    Result(scheme, "fanin_threads", n, r["threads"], "threads"),
                ]

            steps.append((f"sfm {scheme}: fan-in of {n} endpoints", s_fanin))

    results: list[Result] = []
    for i, (label, step) in enumerate(steps, 1):
        progress(f"[{i}/{len(steps)}] {label} ...")
        t0 = time.perf_counter()
        try:
            rows = step()
        except Exception as e:
            progress(f"[{i}/{len(steps)}] {label}: FAILED: {type(e).__name__}: {e}")
            continue
        results.extend(rows)
        progress(f"[{i}/{len(steps)}] {label}: {_brief(rows)} ({time.perf_counter() - t0:.1f} s)")
    return results


def _with_ratio(result: Result, baseline: float | None, name: str) -> Result:
    if baseline:
        result.baseline = baseline
        result.ratio = result.value / baseline
        result.baseline_name = name
    return result


def _brief(rows: list[Result]) -> str:
    return ", ".join(f"{r.workload} {r.value:,.1f} {r.unit}" for r in rows)


def format_size(size: int, workload: str) -> str:
    if workload.startswith("fanin"):
        return f"{size:,} eps"
    if size >= MiB:
        return f"{size // MiB} MiB"
    return f"{size} B"


def table(results: list[Result]) -> str:
    """Results as an aligned text table."""
    head = ("scheme", "workload", "size", "value", "unit", "baseline", "ratio")
    rows = [head]
    for r in results:
        rows.append(
            (
                r.scheme,
                r.workload,
                format_size(r.size, r.workload),
                f"{r.value:,.1f}",
                r.unit,
                f"{r.baseline:,.1f} ({r.baseline_name})" if r.baseline else "",
                f"{r.ratio:.2f}" if r.ratio is not None else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(results: list[Result], path: str) -> None:
    keys = ("scheme", "workload", "size", "value", "unit", "baseline", "ratio", "baseline_name")
    with open(path, "w") as f:
        json.dump({"results": [{k: asdict(r)[k] for k in keys} for r in results]}, f, indent=2)


def stderr_progress(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
