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

from . import baselines as bl
from . import fanin, stats
from . import workloads as wl
from .baselines import Baseline

log = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass
class Result:
    """One row: ``value`` in ``unit`` of ``workload`` at ``size`` for ``scheme`` (a row name)."""

    scheme: str
    workload: str
    size: int
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    baseline_name: str | None = None
    #: CPU microseconds per message (user+sys, all threads) of the sending and the receiving
    #: process over the timed window; None where not measured (fan-in, derived rows).
    cpu_tx_us: float | None = None
    cpu_rx_us: float | None = None
    note: str = ""


@dataclass
class Plan:
    """How many messages each workload sends, and how many rounds."""

    rate_count: int
    mib1_count: int
    mib64_count: int
    mib256_count: int
    rtt_count: int
    fanin: dict[str, int]
    #: Rounds of the comparative workloads; each row shows the best of its rounds.
    repeat: int = 1


FULL = Plan(
    rate_count=200_000,
    mib1_count=1_000,
    mib64_count=12,
    mib256_count=3,
    rtt_count=5_000,
    fanin={"tcp": 10_000},
    repeat=3,
)
QUICK = Plan(rate_count=20_000, mib1_count=50, mib64_count=2, mib256_count=1, rtt_count=500, fanin={"tcp": 500})
DEFAULT_FANIN = 1_000
#: The batch size of the ``send_messages`` row, and the number of sender threads of ``msg_rate_4s``.
BATCH = 64
SENDERS = 4
#: The rows a batch row is compared with: the baseline's one-send-per-message rate.
BASE_WORKLOAD = {f"msg_rate_b{BATCH}": "msg_rate"}


@dataclass
class Step:
    """One measurement: ``measure()`` gives rows without ratios; ``repeat`` if it joins rounds."""

    label: str
    measure: Callable[[], list[Result]]
    repeat: bool = True


# -- the measurements: each returns its rows, named after who was measured -----------------


def _cpu(m: wl.Measurement) -> dict[str, float]:
    return {
        "cpu_tx_us": stats.per_message_us(m.cpu_sender, m.count),
        "cpu_rx_us": stats.per_message_us(m.cpu_receiver, m.count),
    }


def _rate(subject: wl.Subject, plan: Plan, senders: int = 1, batch: int = 0) -> list[Result]:
    m = wl.oneway(subject, 100, plan.rate_count, senders=senders, batch=batch)
    workload = f"msg_rate_b{batch}" if batch else f"msg_rate_{senders}s" if senders > 1 else "msg_rate"
    note = f"send_messages, lists of {batch}" if batch else f"{senders} sender threads" if senders > 1 else ""
    return [Result(subject.name, workload, 100, stats.rate(m.count, m.elapsed), "msg/s", **_cpu(m), note=note)]


def _tput(subject: wl.Subject, size: int, count: int, rss: bool = False) -> list[Result]:
    m = wl.oneway(subject, size, count)
    rows = [Result(subject.name, "throughput", size, stats.mb_per_s(m.count, size, m.elapsed), "MB/s", **_cpu(m))]
    if rss:  # peak RSS against the message size: how many copies each side holds at once
        for workload, peak in (("peak_rss_tx", m.peak_rss_sender), ("peak_rss_rx", m.peak_rss_receiver)):
            rows.append(Result(subject.name, workload, size, peak / MiB, "MiB", note=f"{peak / size:.2f} x message"))
    return rows


def _rtt(subject: wl.Subject, plan: Plan) -> list[Result]:
    m = wl.round_trip(subject, 100, plan.rtt_count)
    assert m.samples is not None
    samples = stats.warm(m.samples)
    cpu = _cpu(m)
    return [
        Result(subject.name, "rtt_p50", 100, stats.percentile(samples, 50) * 1e6, "us", **cpu),
        Result(subject.name, "rtt_p99", 100, stats.percentile(samples, 99) * 1e6, "us"),
    ]


def wrapped(scheme: str) -> str:
    """The name of ``scheme``'s rows measured with the pass-through ``sfm_wrap_frame_receiver``
    plugin (:mod:`.wrapper`) on the receiving side: ``tcp (wrapped receiver)``."""
    return f"{scheme} (wrapped receiver)"


#: The schemes whose sfm rows are also measured with a receiver wrapper (the cost of a plugin
#: on the frame path; once is enough: the hook is the core's, not the driver's).
WRAPPED_SCHEMES = ("tcp",)
#: The schemes with a row for ``ConnManager.send_messages`` (the TCP driver packs a batch
#: into one ``sendmsg``; the others send it frame by frame).
BATCH_SCHEMES = ("tcp",)


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


def _steps(subject: wl.Subject, plan: Plan, label: str, batch: bool = False) -> list[Step]:
    """Every comparative workload of ``subject`` (the same for sfm and every baseline)."""
    steps = [
        Step(f"{label}: 100 B message rate", partial(_rate, subject, plan)),
        Step(f"{label}: 100 B message rate, {SENDERS} sender threads", partial(_rate, subject, plan, SENDERS)),
    ]
    if batch:
        steps.append(
            Step(f"{label}: 100 B message rate, send_messages x{BATCH}", partial(_rate, subject, plan, 1, BATCH))
        )
    return [
        *steps,
        Step(f"{label}: 1 MiB throughput", partial(_tput, subject, MiB, plan.mib1_count)),
        Step(f"{label}: 64 MiB throughput", partial(_tput, subject, 64 * MiB, plan.mib64_count)),
        Step(f"{label}: 256 MiB throughput, peak RSS", partial(_tput, subject, 256 * MiB, plan.mib256_count, True)),
        Step(f"{label}: 100 B round trip", partial(_rtt, subject, plan)),
    ]


def _wrapped_steps(scheme: str, plan: Plan) -> list[Step]:
    """100 B rate (the workload most sensitive to per-frame cost) and 1 MiB throughput with a
    pass-through receiver wrapper on the receiving side, compared with ``scheme``'s own rows."""
    subject = wl.SfmSubject(scheme, wrap_receiver=True, name=wrapped(scheme))
    label = f"sfm {scheme}, receiver wrapped by a plugin"
    return [
        Step(f"{label}: 100 B message rate", partial(_rate, subject, plan)),
        Step(f"{label}: 1 MiB throughput", partial(_tput, subject, MiB, plan.mib1_count)),
    ]


def _fanin_count(scheme: str, plan: Plan) -> int:
    return plan.fanin.get(scheme, min(DEFAULT_FANIN, plan.fanin.get("tcp", DEFAULT_FANIN)))


def _baseline_steps(key: str, base: Baseline, plan: Plan, progress: Callable[[str], None]) -> list[Step]:
    reason = base.available()
    if reason is not None:
        progress(f"baseline {base.name} skipped: {reason}")
        return []
    return _steps(wl.BaselineSubject(key, base), plan, base.name)


def plan_steps(
    schemes: list[str],
    plan: Plan,
    pki: Pki | None = None,
    aes_gcm: bool = False,
    baselines: bl.Baselines | None = None,
    progress: Callable[[str], None] = log.info,
) -> tuple[list[Step], dict[str, str | tuple[str, ...]]]:
    """The steps of a run, and for each row name the name of its baseline (see :func:`add_ratios`).

    Raw sockets always run, pyzmq (the reference row) whenever installed. A plain scheme's
    baseline is its own (``baselines``: built in, or a ``sfm.bench_baselines`` entry point;
    ``raw`` if it has none or it is not available). A secure scheme (stcp, grpcs, wss) is
    measured with ``pki``'s certificates (mutual TLS) and compared with its plain scheme's sfm
    rows only (stcp with tcp), which :func:`with_plain` adds if missing: the ratio is the cost
    of TLS in this run. ``aes_gcm`` adds one core's AES-GCM speed (``openssl speed``) to
    compare stcp's 1 MiB throughput with. tcp's 100 B rate and 1 MiB throughput are measured
    again with a pass-through ``sfm_wrap_frame_receiver`` plugin on the receiving side (rows
    ``tcp (wrapped receiver)``, baseline tcp's sfm rows): what a plugin on the frame path costs.
    """
    schemes = with_plain(schemes)
    if pki is None and any(s in SECURE_SCHEMES for s in schemes):
        raise ValueError(f"secure schemes need a PKI: {', '.join(s for s in schemes if s in SECURE_SCHEMES)}")
    baselines = baselines if baselines is not None else bl.load()
    raw = baselines.by_key["raw"]
    steps = _steps(wl.BaselineSubject("raw", raw), plan, "raw sockets")
    steps += _baseline_steps(bl.REFERENCE, baselines.by_key[bl.REFERENCE], plan, progress)
    if aes_gcm and "stcp" in schemes:
        steps.append(Step(f"openssl speed -evp {AES_GCM}: 16 KiB blocks", partial(_aes_gcm_speed, 1)))
    names: dict[str, str | tuple[str, ...]] = {}
    measured = {"raw"}
    for scheme in schemes:
        plain = SECURE_SCHEMES.get(scheme)
        if plain is not None:
            names[scheme] = (plain,)
            steps += _steps(wl.SfmSubject(scheme, pki), plan, f"sfm {scheme} (mTLS)")
            if plain == "tcp":
                n = _fanin_count(scheme, plan)
                assert pki is not None
                clients = partial(fanin.tls_fanin, tls=pki.client)
                # One client certificate for all: the listener maps the fan-N names to its CN.
                identity = {"fan-": CLIENT_CN}
                measure = partial(_sfm_fanin, scheme, n, clients, pki, identity)
                steps.append(Step(f"sfm {scheme} (mTLS): fan-in of {n} endpoints", measure, False))
            continue
        own = baselines.for_(scheme)
        names[scheme] = "raw"  # unless it has a baseline of its own that can run here
        if own is not None:
            key, base = own
            if key not in measured:
                measured.add(key)
                steps += _baseline_steps(key, base, plan, progress)
            if base.available() is None:
                names[scheme] = base.name
        sfm = _steps(wl.SfmSubject(scheme), plan, f"sfm {scheme}", batch=scheme in BATCH_SCHEMES)
        if scheme in WRAPPED_SCHEMES:
            # Each wrapped step right after the step it is compared with: the least drift between them.
            names[wrapped(scheme)] = (scheme,)
            rate, tput = _wrapped_steps(scheme, plan)
            i = next(i for i, s in enumerate(sfm) if s.label.endswith("1 MiB throughput"))
            sfm = [sfm[0], rate, *sfm[1 : i + 1], tput, *sfm[i + 1 :]]
        steps += sfm
        clients = fanin.client_for(scheme)
        if clients is None:
            progress(f"sfm {scheme}: no fan-in client for this scheme, fan-in not measured")
            continue
        n = _fanin_count(scheme, plan)
        # Fan-in is a capacity check, not a ratio: once is enough (and it is the slow one).
        steps.append(Step(f"sfm {scheme}: fan-in of {n} endpoints", partial(_sfm_fanin, scheme, n, clients), False))
    return steps, names


def run(schemes: list[str], plan: Plan, progress: Callable[[str], None]) -> list[Result]:
    """Measure the baselines and sfm over each scheme; return rows with ratios.

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
        registry.get_driver_class(scheme)
    baselines = bl.load()
    for name, error in baselines.errors:
        progress(f"baseline entry point {name!r} ({bl.GROUP}) skipped: {error}")
    secure = [s for s in schemes if s in SECURE_SCHEMES]
    with tempfile.TemporaryDirectory(prefix="sfm-bench-pki-") as directory:
        pki = None
        if secure:
            from sfm_core.pki import make_pki

            pki = make_pki(directory, SERVER_CN, CLIENT_CN)
        aes = "stcp" in schemes and shutil.which("openssl") is not None
        steps, names = plan_steps(schemes, plan, pki, aes_gcm=aes, baselines=baselines, progress=progress)
        results = by_scheme(_run_steps(steps, plan, progress))
    reference = baselines.by_key[bl.REFERENCE].name
    return add_reference_rows(add_aes_gcm_row(add_ratios(results, names)), "tcp", reference)


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
            log.debug("bench step %s failed", label, exc_info=True)
            progress(f"[{n}/{len(todo)}] {label}: FAILED: {type(e).__name__}: {e}")
            continue
        samples[i].append(rows)
        progress(f"[{n}/{len(todo)}] {label}: {_brief(rows)} ({time.perf_counter() - t0:.1f} s)")
    return [row for rounds in samples if rounds for row in best_rows(rounds)]


LOWER_IS_BETTER = frozenset({"us", "s", "MiB", "threads"})


def lower_is_better(unit: str) -> bool:
    """Whether a smaller value in ``unit`` is the better one (times, memory, threads)."""
    return unit in LOWER_IS_BETTER


def _least(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def best_rows(rounds: list[list[Result]]) -> list[Result]:
    """Row by row, the best value of the rounds of one step (lowest for times, else highest),
    and each CPU column's lowest (interference only ever adds CPU time: cache misses, and
    the note of the best value's round)."""
    best = []
    for rows in zip(*rounds, strict=True):
        pick = min if lower_is_better(rows[0].unit) else max
        top = pick(rows, key=lambda r: r.value)
        cpu_tx, cpu_rx = _least([r.cpu_tx_us for r in rows]), _least([r.cpu_rx_us for r in rows])
        best.append(replace(top, cpu_tx_us=cpu_tx, cpu_rx_us=cpu_rx))
    return best


def add_ratios(results: list[Result], baselines: dict[str, str | tuple[str, ...]]) -> list[Result]:
    """Give each scheme's row the value of its baseline's matching row.

    A baseline given as a name is tried first, then raw; given as a tuple, only those names
    are tried (a secure scheme's rows compare with its plain scheme's, never with raw). A
    batch row compares with the baseline's one-send-per-message rate (:data:`BASE_WORKLOAD`)."""
    index = {(r.scheme, r.workload, r.size): r.value for r in results}
    for r in results:
        if r.scheme not in baselines:
            continue  # a baseline row itself
        base = baselines[r.scheme]
        workload = BASE_WORKLOAD.get(r.workload, r.workload)
        for name in base if isinstance(base, tuple) else dict.fromkeys((base, "raw")):
            value = index.get((name, workload, r.size))
            if value:
                r.baseline, r.baseline_name, r.ratio = value, name, r.value / value
                break
    return results


def add_reference_rows(results: list[Result], scheme: str, reference: str) -> list[Result]:
    """After ``scheme``'s rate rows, the same rates against the reference row's one-sender
    rate (``reference``: pyzmq), workload ``<rate>_vs_pyzmq``. Only when both were measured."""
    ref = next((r for r in results if (r.scheme, r.workload) == (reference, "msg_rate")), None)
    if ref is None or not ref.value:
        return results
    out = []
    for r in results:
        out.append(r)
        if r.scheme == scheme and r.workload.startswith("msg_rate"):
            out.append(
                Result(
                    scheme,
                    f"{r.workload}_vs_pyzmq",
                    r.size,
                    r.value,
                    r.unit,
                    ref.value,
                    r.value / ref.value,
                    reference,
                    note=r.note,
                )
            )
    return out


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


#: The table's columns, and the order they are dropped in when the terminal is too narrow.
COLUMNS = ("scheme", "workload", "size", "value", "unit", "baseline", "ratio", "cpu tx us", "cpu rx us", "note")
DROP_ORDER = ("note", "baseline", "cpu rx us", "cpu tx us", "unit")


def _num(v: float | None, fmt: str = ",.1f") -> str:
    return "" if v is None else format(v, fmt)


def fit(
    head: tuple[str, ...], rows: list[tuple[str, ...]], width: int | None = None, drop: tuple[str, ...] = ()
) -> str:
    """``rows`` under ``head`` as an aligned text table no wider than ``width`` (default: the
    terminal's), dropping the columns named in ``drop`` in that order until it fits."""
    width = width if width is not None else shutil.get_terminal_size().columns
    keep = list(range(len(head)))
    dropped = []
    for name in (None, *drop):
        if name is not None and name in head:
            keep.remove(head.index(name))
            dropped.append(name)
        cells = [[row[i] for i in keep] for row in [head, *rows]]
        widths = [max(len(c[j]) for c in cells) for j in range(len(keep))]
        if sum(widths) + 2 * (len(widths) - 1) <= width:
            break
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if dropped:
        lines.append(f"(left out to fit {width} columns: {', '.join(dropped)}; all of them are in --json)")
    return "\n".join(lines)


def table(results: list[Result], width: int | None = None) -> str:
    """Results as an aligned text table that fits ``width`` (default: the terminal)."""
    rows = [
        (
            r.scheme,
            r.workload,
            format_size(r.size, r.workload),
            _num(r.value),
            r.unit,
            r.baseline_name or "",
            _num(r.ratio, ".2f"),
            _num(r.cpu_tx_us, ".2f"),
            _num(r.cpu_rx_us, ".2f"),
            r.note,
        )
        for r in results
    ]
    return fit(COLUMNS, rows, width, DROP_ORDER)


#: The version of the JSON ``--json`` writes (rows of version 1 have no CPU, note, machine).
JSON_VERSION = 2
_KEYS = (
    "scheme",
    "workload",
    "size",
    "value",
    "unit",
    "baseline",
    "ratio",
    "baseline_name",
    "cpu_tx_us",
    "cpu_rx_us",
    "note",
)


def machine() -> dict[str, Any]:
    """What the run ran on: cores, CPU model, Python, platform, date (UTC)."""
    import datetime
    import os
    import platform

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_json(results: list[Result], path: str) -> None:
    """The results as JSON (documented in docs/benchmarks.md)."""
    rows = [{k: asdict(r)[k] for k in _KEYS} for r in results]
    with open(path, "w") as f:
        json.dump({"version": JSON_VERSION, "machine": machine(), "results": rows}, f, indent=2)


def read_json(path: str) -> list[Result]:
    """The rows of a ``--json`` file (version 1 or 2)."""
    with open(path) as f:
        data = json.load(f)
    fields = set(_KEYS)
    return [Result(**{k: v for k, v in row.items() if k in fields}) for row in data["results"]]


def compare(results: list[Result], base: list[Result], base_name: str = "BASE", width: int | None = None) -> str:
    """This run against an earlier one, row by row: ``now / base`` of each value and CPU
    column, marked better or worse by the unit's direction (CPU time: lower is better);
    rows on one side only are said so."""
    old = {(r.scheme, r.workload, r.size): r for r in base}
    new = {(r.scheme, r.workload, r.size): r for r in results}
    rows = []

    def line(r: Result, what: str, now: float | None, then: float | None, lower: bool) -> None:
        if now is None or then is None:
            return
        ratio = now / then if then else float("inf")
        verdict = "same" if ratio == 1 else "better" if (ratio < 1) == lower else "worse"
        name = r.workload if what == "value" else f"{r.workload} ({what})"
        rows.append((r.scheme, name, format_size(r.size, r.workload), _num(now), _num(then), f"{ratio:.2f}", verdict))

    for key, r in new.items():
        b = old.get(key)
        if b is None:
            rows.append(
                (r.scheme, r.workload, format_size(r.size, r.workload), _num(r.value), "", "", "only in this run")
            )
            continue
        line(r, "value", r.value, b.value, lower_is_better(r.unit))
        line(r, "cpu tx us", r.cpu_tx_us, b.cpu_tx_us, True)
        line(r, "cpu rx us", r.cpu_rx_us, b.cpu_rx_us, True)
    for key, b in old.items():
        if key not in new:
            rows.append(
                (b.scheme, b.workload, format_size(b.size, b.workload), "", _num(b.value), "", f"only in {base_name}")
            )
    head = ("scheme", "workload", "size", "now", "base", "now/base", "")
    return fit(head, rows, width)


def stderr_progress(line: str) -> None:
    """A progress line on stderr."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
