"""Plans and runs ``sfm bench``, shows progress, prints the table, writes JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
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
    #: Rounds of the comparative workloads; each row shows the best of its rounds.
    repeat: int = 1


FULL = Plan(rate_count=200_000, mib1_count=1_000, mib64_count=12, rtt_count=5_000, fanin={"tcp": 10_000}, repeat=3)
QUICK = Plan(rate_count=20_000, mib1_count=50, mib64_count=2, rtt_count=500, fanin={"tcp": 500})
DEFAULT_FANIN = 1_000


@dataclass
class Step:
    """One measurement: ``measure()`` gives rows without ratios; ``repeat`` if it joins rounds."""

    label: str
    measure: Callable[[], list[Result]]
    repeat: bool = True


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


# -- the measurements: each returns its rows, named after who was measured -----------------


def _raw_rate(plan: Plan) -> list[Result]:
    return [Result("raw", "msg_rate", 100, _rate(wl.raw_oneway(100, plan.rate_count), plan.rate_count), "msg/s")]


def _raw_tput(size: int, count: int) -> list[Result]:
    return [Result("raw", "throughput", size, _mbps(wl.raw_oneway(size, count), count, size), "MB/s")]


def _rtt_rows(name: str, r: dict) -> list[Result]:
    return [Result(name, "rtt_p50", 100, r["p50_us"], "us"), Result(name, "rtt_p99", 100, r["p99_us"], "us")]


def _raw_rtt(plan: Plan) -> list[Result]:
    return _rtt_rows("raw", wl.raw_rtt(100, plan.rtt_count))


def _base_rate(base: Any, plan: Plan) -> list[Result]:
    return [Result(base.name, "msg_rate", 100, base.run("rate", 100, plan.rate_count)["msgs_per_s"], "msg/s")]


def _base_tput(base: Any, size: int, count: int) -> list[Result]:
    return [Result(base.name, "throughput", size, base.run("throughput", size, count)["mb_per_s"], "MB/s")]


def _base_rtt(base: Any, plan: Plan) -> list[Result]:
    return _rtt_rows(base.name, base.run("rtt", 100, plan.rtt_count))


def _sfm_rate(scheme: str, plan: Plan) -> list[Result]:
    elapsed = wl.sfm_oneway(scheme, 100, plan.rate_count)
    return [Result(scheme, "msg_rate", 100, _rate(elapsed, plan.rate_count), "msg/s")]


def _sfm_tput(scheme: str, size: int, count: int) -> list[Result]:
    return [Result(scheme, "throughput", size, _mbps(wl.sfm_oneway(scheme, size, count), count, size), "MB/s")]


def _sfm_rtt(scheme: str, plan: Plan) -> list[Result]:
    return _rtt_rows(scheme, wl.sfm_rtt(scheme, 100, plan.rtt_count))


def _sfm_fanin(scheme: str, n: int, clients: Callable) -> list[Result]:
    r = wl.sfm_fanin(scheme, n, 60.0, clients)
    return [
        Result(scheme, "fanin_ready", n, r["ready"], "endpoints"),
        Result(scheme, "fanin_seconds", n, r["seconds"], "s"),
        Result(scheme, "fanin_rss", n, r["rss"] / MiB, "MiB"),
        Result(scheme, "fanin_threads", n, r["threads"], "threads"),
    ]


def plan_steps(schemes: list[str], plan: Plan) -> tuple[list[Step], dict[str, str]]:
    """The steps of a run, and for each scheme the name of its baseline (``raw`` if none)."""
    steps = [
        Step("raw sockets: 100 B message rate", partial(_raw_rate, plan)),
        Step("raw sockets: 1 MiB throughput", partial(_raw_tput, MiB, plan.mib1_count)),
        Step("raw sockets: 64 MiB throughput", partial(_raw_tput, 64 * MiB, plan.mib64_count)),
        Step("raw sockets: 100 B round trip", partial(_raw_rtt, plan)),
    ]
    baselines: dict[str, str] = {}
    for scheme in schemes:
        base = _baseline_for(scheme)
        baselines[scheme] = "raw" if base is None else base.name
        if base is not None:
            steps += [
                Step(f"{base.name}: 100 B message rate", partial(_base_rate, base, plan)),
                Step(f"{base.name}: 1 MiB throughput", partial(_base_tput, base, MiB, plan.mib1_count)),
                Step(f"{base.name}: 64 MiB throughput", partial(_base_tput, base, 64 * MiB, plan.mib64_count)),
                Step(f"{base.name}: 100 B round trip", partial(_base_rtt, base, plan)),
            ]
        steps += [
            Step(f"sfm {scheme}: 100 B message rate", partial(_sfm_rate, scheme, plan)),
            Step(f"sfm {scheme}: 1 MiB throughput", partial(_sfm_tput, scheme, MiB, plan.mib1_count)),
            Step(f"sfm {scheme}: 64 MiB throughput", partial(_sfm_tput, scheme, 64 * MiB, plan.mib64_count)),
            Step(f"sfm {scheme}: 100 B round trip", partial(_sfm_rtt, scheme, plan)),
        ]
        clients = wl.tcp_fanin if scheme == "tcp" else getattr(base, "fanin", None)
        if clients is not None:
            n = plan.fanin.get(scheme, min(DEFAULT_FANIN, plan.fanin.get("tcp", DEFAULT_FANIN)))
            # Fan-in is a capacity check, not a ratio: once is enough (and it is the slow one).
            steps.append(Step(f"sfm {scheme}: fan-in of {n} endpoints", partial(_sfm_fanin, scheme, n, clients), False))
    return steps, baselines


def run(schemes: list[str], plan: Plan, progress: Callable[[str], None]) -> list[Result]:
    """Measure the raw baseline and sfm over each scheme; return rows with ratios.

    With ``plan.repeat`` > 1 the comparative steps run in interleaved rounds (raw, baseline,
    sfm, raw, ...), so a drift of the machine touches baseline and sfm alike, and each row
    is the best of its rounds: on a shared machine interference only ever slows a run down
    (throughput here came out bimodal, 5.3 or 2.1 GB/s, for raw sockets and sfm alike), so
    the best round is the one least disturbed, as ``timeit`` reports its minimum.
    """
    from sfm_core import get_registry

    registry = get_registry()
    for scheme in schemes:
        registry.get_driver_class(scheme)  # loads the driver module, which may add a baseline hook
    steps, baselines = plan_steps(schemes, plan)
    samples: list[list[list[Result]]] = [[] for _ in steps]
    todo = [(r, i) for r in range(plan.repeat) for i, step in enumerate(steps) if r == 0 or step.repeat]
    for n, (rnd, i) in enumerate(todo, 1):
        label = steps[i].label + (f" (round {rnd + 1}/{plan.repeat})" if plan.repeat > 1 and steps[i].repeat else "")
        progress(f"[{n}/{len(todo)}] {label} ...")
        t0 = time.perf_counter()
        try:
            rows = steps[i].measure()
        except Exception as e:
            progress(f"[{n}/{len(todo)}] {label}: FAILED: {type(e).__name__}: {e}")
            continue
        samples[i].append(rows)
        progress(f"[{n}/{len(todo)}] {label}: {_brief(rows)} ({time.perf_counter() - t0:.1f} s)")
    results = [row for rounds in samples if rounds for row in best_rows(rounds)]
    return add_ratios(results, baselines)


LOWER_IS_BETTER = frozenset({"us", "s", "MiB", "threads"})


def best_rows(rounds: list[list[Result]]) -> list[Result]:
    """Row by row, the best value of the rounds of one step (lowest for times, else highest)."""
    best = []
    for rows in zip(*rounds, strict=True):
        pick = min if rows[0].unit in LOWER_IS_BETTER else max
        best.append(replace(rows[0], value=pick(r.value for r in rows)))
    return best


def add_ratios(results: list[Result], baselines: dict[str, str]) -> list[Result]:
    """Give each scheme's row the value of its baseline's matching row (its own, else raw)."""
    index = {(r.scheme, r.workload, r.size): r.value for r in results}
    for r in results:
        if r.scheme not in baselines:
            continue  # a baseline row itself
        for name in dict.fromkeys((baselines[r.scheme], "raw")):
            value = index.get((name, r.workload, r.size))
            if value:
                r.baseline, r.baseline_name, r.ratio = value, name, r.value / value
                break
    return results


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
