"""Plans and runs ``sfm bench``, shows progress, prints the table, writes JSON."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

from sfm_core.pki import Pki
from sfm_core.tls import SECURE_SCHEMES

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


def wrapped(scheme: str) -> str:
    """The name of ``scheme``'s rows measured with the pass-through ``sfm_wrap_frame_receiver``
    plugin (:mod:`.wrapper`) on the receiving side: ``tcp (wrapped receiver)``."""
    return f"{scheme} (wrapped receiver)"


#: The schemes whose sfm rows are also measured with a receiver wrapper (the cost of a plugin
#: on the frame path; once is enough: the hook is the core's, not the driver's).
WRAPPED_SCHEMES = ("tcp",)


def _sfm_rate(scheme: str, plan: Plan, pki: Pki | None = None, wrap: bool = False) -> list[Result]:
    elapsed = wl.sfm_oneway(scheme, 100, plan.rate_count, pki, wrap_receiver=wrap)
    name = wrapped(scheme) if wrap else scheme
    return [Result(name, "msg_rate", 100, _rate(elapsed, plan.rate_count), "msg/s")]


def _sfm_tput(scheme: str, size: int, count: int, pki: Pki | None = None, wrap: bool = False) -> list[Result]:
    elapsed = wl.sfm_oneway(scheme, size, count, pki, wrap_receiver=wrap)
    name = wrapped(scheme) if wrap else scheme
    return [Result(name, "throughput", size, _mbps(elapsed, count, size), "MB/s")]


def _sfm_rtt(scheme: str, plan: Plan, pki: Pki | None = None) -> list[Result]:
    return _rtt_rows(scheme, wl.sfm_rtt(scheme, 100, plan.rtt_count, pki))


def _sfm_fanin(
    scheme: str, n: int, clients: Callable, pki: Pki | None = None, identity_map: dict[str, str] | None = None
) -> list[Result]:
    r = wl.sfm_fanin(scheme, n, 60.0, clients, pki, identity_map)
    return [
        Result(scheme, "fanin_ready", n, r["ready"], "endpoints"),
        Result(scheme, "fanin_seconds", n, r["seconds"], "s"),
        Result(scheme, "fanin_rss", n, r["rss"] / MiB, "MiB"),
        Result(scheme, "fanin_threads", n, r["threads"], "threads"),
    ]


#: The CNs of the bench's certificates: the endpoint names the two sides claim (the server's
#: certificate also names 127.0.0.1 and localhost).
SERVER_CN = "bench-server"
CLIENT_CN = "bench-client"
#: The openssl cipher the AES-GCM row measures, and the block size whose column it reads
#: (16 KiB: a full TLS record).
AES_GCM = "aes-128-gcm"
AES_BLOCK = 16384
#: The name of the AES-GCM row, and the row that compares stcp's 1 MiB throughput with it.
AES_SCHEME = f"openssl {AES_GCM}"
VS_AES = "vs_aes_gcm"


def _aes_gcm_speed(seconds: int) -> list[Result]:
    """One core's AES-128-GCM speed on 16 KiB blocks (``openssl speed -evp``), in MB/s."""
    out = subprocess.run(
        ["openssl", "speed", "-seconds", str(seconds), "-bytes", str(AES_BLOCK), "-evp", AES_GCM],
        capture_output=True,
        text=True,
        timeout=60 + 10 * seconds,
        check=True,
    ).stdout
    return [Result(AES_SCHEME, "aes_gcm_speed", AES_BLOCK, parse_openssl_speed(out, AES_BLOCK), "MB/s")]


def parse_openssl_speed(text: str, block: int) -> float:
    """MB/s of the ``block``-byte column of ``openssl speed`` (its numbers are 1000s of bytes/s)."""
    header = next(line for line in text.splitlines() if line.startswith("type"))
    columns = re.findall(r"(\d+) bytes", header)
    last = [line for line in text.splitlines() if re.search(r"\d+(\.\d+)?k\s*$", line)][-1]
    values = re.findall(r"(\d+(?:\.\d+)?)k", last)
    return float(values[columns.index(str(block))]) / 1000


def pick_schemes(registry: Any, schemes: list[str]) -> list[str]:
    """One scheme per driver class and security, its driver's first: ws and http are the same
    transport, so are wss and https; tcp and stcp are not (stcp is measured against tcp)."""
    by_class: dict[tuple[type, bool], list[str]] = {}
    for scheme in schemes:
        by_class.setdefault((registry.get_driver_class(scheme), scheme in SECURE_SCHEMES), []).append(scheme)
    unique = []
    for (cls, _), names in by_class.items():
        preferred = [t for t in cls.supported_transports() if t in names]
        unique.append(preferred[0] if preferred else names[0])
    return unique


def with_plain(schemes: list[str]) -> list[str]:
    """``schemes`` with each secure one right after its plain scheme, which is added if missing
    (stcp needs tcp: its ratios are secure / plain in the same run)."""
    out: list[str] = []
    for scheme in schemes:
        plain = SECURE_SCHEMES.get(scheme)
        if plain is None:
            group = [scheme, *(t for t in schemes if SECURE_SCHEMES.get(t) == scheme)]
        else:
            group = [plain, scheme]
        for s in group:
            if s not in out:
                out.append(s)
    return out


def _sfm_steps(scheme: str, plan: Plan, pki: Pki | None) -> list[Step]:
    tls = " (mTLS)" if pki is not None else ""
    return [
        Step(f"sfm {scheme}{tls}: 100 B message rate", partial(_sfm_rate, scheme, plan, pki)),
        Step(f"sfm {scheme}{tls}: 1 MiB throughput", partial(_sfm_tput, scheme, MiB, plan.mib1_count, pki)),
        Step(f"sfm {scheme}{tls}: 64 MiB throughput", partial(_sfm_tput, scheme, 64 * MiB, plan.mib64_count, pki)),
        Step(f"sfm {scheme}{tls}: 100 B round trip", partial(_sfm_rtt, scheme, plan, pki)),
    ]


def _wrapped_steps(scheme: str, plan: Plan) -> list[Step]:
    """100 B rate (the workload most sensitive to per-frame cost) and 1 MiB throughput with a
    pass-through receiver wrapper on the receiving side, compared with ``scheme``'s own rows."""
    label = f"sfm {scheme}, receiver wrapped by a plugin"
    return [
        Step(f"{label}: 100 B message rate", partial(_sfm_rate, scheme, plan, None, True)),
        Step(f"{label}: 1 MiB throughput", partial(_sfm_tput, scheme, MiB, plan.mib1_count, None, True)),
    ]


def _fanin_count(scheme: str, plan: Plan) -> int:
    return plan.fanin.get(scheme, min(DEFAULT_FANIN, plan.fanin.get("tcp", DEFAULT_FANIN)))


def plan_steps(
    schemes: list[str], plan: Plan, pki: Pki | None = None, aes_gcm: bool = False
) -> tuple[list[Step], dict[str, str | tuple[str, ...]]]:
    """The steps of a run, and for each scheme the name of its baseline (see :func:`add_ratios`).

    A plain scheme's baseline is its driver's bare library (``raw`` if none, or for rows the
    library lacks). A secure scheme (stcp, grpcs, wss) is measured with ``pki``'s certificates
    (mutual TLS) and compared with its plain scheme's sfm rows only (stcp with tcp), which
    :func:`with_plain` adds if missing: the ratio is the cost of TLS in this run. ``aes_gcm``
    adds one core's AES-GCM speed (``openssl speed``) to compare stcp's 1 MiB throughput with.
    tcp's 100 B rate and 1 MiB throughput are measured again with a pass-through
    ``sfm_wrap_frame_receiver`` plugin on the receiving side (rows ``tcp (wrapped receiver)``,
    baseline tcp's sfm rows): what a plugin on the frame path costs.
    """
    schemes = with_plain(schemes)
    if pki is None and any(s in SECURE_SCHEMES for s in schemes):
        raise ValueError(f"secure schemes need a PKI: {', '.join(s for s in schemes if s in SECURE_SCHEMES)}")
    steps = [
        Step("raw sockets: 100 B message rate", partial(_raw_rate, plan)),
        Step("raw sockets: 1 MiB throughput", partial(_raw_tput, MiB, plan.mib1_count)),
        Step("raw sockets: 64 MiB throughput", partial(_raw_tput, 64 * MiB, plan.mib64_count)),
        Step("raw sockets: 100 B round trip", partial(_raw_rtt, plan)),
    ]
    if aes_gcm and "stcp" in schemes:
        steps.append(Step(f"openssl speed -evp {AES_GCM}: 16 KiB blocks", partial(_aes_gcm_speed, 1)))
    baselines: dict[str, str | tuple[str, ...]] = {}
    for scheme in schemes:
        plain = SECURE_SCHEMES.get(scheme)
        if plain is not None:
            baselines[scheme] = (plain,)
            steps += _sfm_steps(scheme, plan, pki)
            if plain == "tcp":
                n = _fanin_count(scheme, plan)
                assert pki is not None
                clients = partial(wl.tls_fanin, tls=pki.client)
                # One client certificate for all: the listener maps the fan-N names to its CN.
                identity = {"fan-": CLIENT_CN}
                measure = partial(_sfm_fanin, scheme, n, clients, pki, identity)
                steps.append(Step(f"sfm {scheme} (mTLS): fan-in of {n} endpoints", measure, False))
            continue
        base = _baseline_for(scheme)
        baselines[scheme] = "raw" if base is None else base.name
        if base is not None:
            steps += [
                Step(f"{base.name}: 100 B message rate", partial(_base_rate, base, plan)),
                Step(f"{base.name}: 1 MiB throughput", partial(_base_tput, base, MiB, plan.mib1_count)),
                Step(f"{base.name}: 64 MiB throughput", partial(_base_tput, base, 64 * MiB, plan.mib64_count)),
                Step(f"{base.name}: 100 B round trip", partial(_base_rtt, base, plan)),
            ]
        sfm = _sfm_steps(scheme, plan, None)
        if scheme in WRAPPED_SCHEMES:
            # Each wrapped step right after the step it is compared with: the least drift between them.
            baselines[wrapped(scheme)] = (scheme,)
            rate, tput = _wrapped_steps(scheme, plan)
            sfm = [sfm[0], rate, sfm[1], tput, *sfm[2:]]
        steps += sfm
        clients = wl.tcp_fanin if scheme == "tcp" else getattr(base, "fanin", None)
        if clients is not None:
            n = _fanin_count(scheme, plan)
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

    Secure schemes use one throwaway PKI (:mod:`sfm_core.pki`, needs trustme) made for this
    run in a temporary directory and removed at the end.
    """
    from sfm_core import get_registry

    registry = get_registry()
    schemes = with_plain(schemes)
    for scheme in schemes:
        registry.get_driver_class(scheme)  # loads the driver module, which may add a baseline hook
    secure = [s for s in schemes if s in SECURE_SCHEMES]
    with tempfile.TemporaryDirectory(prefix="sfm-bench-pki-") as directory:
        pki = None
        if secure:
            from sfm_core.pki import make_pki

            pki = make_pki(directory, SERVER_CN, CLIENT_CN)
        aes = "stcp" in schemes and shutil.which("openssl") is not None
        steps, baselines = plan_steps(schemes, plan, pki, aes_gcm=aes)
        results = by_scheme(_run_steps(steps, plan, progress))
    return add_aes_gcm_row(add_ratios(results, baselines))


def by_scheme(results: list[Result]) -> list[Result]:
    """The rows of each scheme together, schemes in the order they first appear (a step may
    run between two of another scheme's, as the wrapped-receiver steps do)."""
    order = {scheme: i for i, scheme in reversed(list(enumerate(r.scheme for r in results)))}
    return sorted(results, key=lambda r: order[r.scheme])


def _run_steps(steps: list[Step], plan: Plan, progress: Callable[[str], None]) -> list[Result]:
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
    return [row for rounds in samples if rounds for row in best_rows(rounds)]


LOWER_IS_BETTER = frozenset({"us", "s", "MiB", "threads"})


def best_rows(rounds: list[list[Result]]) -> list[Result]:
    """Row by row, the best value of the rounds of one step (lowest for times, else highest)."""
    best = []
    for rows in zip(*rounds, strict=True):
        pick = min if rows[0].unit in LOWER_IS_BETTER else max
        best.append(replace(rows[0], value=pick(r.value for r in rows)))
    return best


def add_ratios(results: list[Result], baselines: dict[str, str | tuple[str, ...]]) -> list[Result]:
    """Give each scheme's row the value of its baseline's matching row.

    A baseline given as a name is tried first, then raw; given as a tuple, only those names
    are tried (a secure scheme's rows compare with its plain scheme's, never with raw)."""
    index = {(r.scheme, r.workload, r.size): r.value for r in results}
    for r in results:
        if r.scheme not in baselines:
            continue  # a baseline row itself
        base = baselines[r.scheme]
        for name in base if isinstance(base, tuple) else dict.fromkeys((base, "raw")):
            value = index.get((name, r.workload, r.size))
            if value:
                r.baseline, r.baseline_name, r.ratio = value, name, r.value / value
                break
    return results


def add_aes_gcm_row(results: list[Result]) -> list[Result]:
    """After stcp's 1 MiB throughput row, the same figure against one core's AES-GCM speed
    (row ``vs_aes_gcm``): how close TLS over sfm gets to the cipher alone. Only when both
    were measured."""
    aes = next((r for r in results if r.scheme == AES_SCHEME), None)
    for i, r in enumerate(results):
        if aes is not None and aes.value and (r.scheme, r.workload, r.size) == ("stcp", "throughput", MiB):
            row = Result("stcp", VS_AES, MiB, r.value, r.unit, aes.value, r.value / aes.value, AES_SCHEME)
            return [*results[: i + 1], row, *results[i + 1 :]]
    return results


def _brief(rows: list[Result]) -> str:
    return ", ".join(f"{r.workload} {r.value:,.1f} {r.unit}" for r in rows)


def format_size(size: int, workload: str) -> str:
    if workload.startswith("fanin"):
        return f"{size:,} eps"
    if size >= MiB:
        return f"{size // MiB} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
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
