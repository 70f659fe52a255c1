"""The statistics of ``sfm bench``, defined once for every row (sfm and baselines alike)."""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Round-trip samples dropped at the start of every RTT run (connection warm-up: caches,
#: the allocator, TCP's congestion window); the same share for every row.
WARMUP_SHARE = 0.10


def warm(samples: Sequence[float]) -> list[float]:
    """``samples`` without the first :data:`WARMUP_SHARE` of them (at least one kept)."""
    drop = min(int(len(samples) * WARMUP_SHARE), max(len(samples) - 1, 0))
    return list(samples[drop:])


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between the closest ranks
    (numpy's default, ``statistics.quantiles(method="inclusive")``): p50 is the median."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in 0..100")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def rate(count: int, elapsed: float) -> float:
    """Messages per second."""
    return count / elapsed


def mb_per_s(count: int, size: int, elapsed: float) -> float:
    """10**6 bytes per second."""
    return count * size / elapsed / 1e6


def per_message_us(cpu_seconds: float, count: int) -> float:
    """CPU microseconds per message."""
    return cpu_seconds / count * 1e6
