"""Percentiles and small summaries, in plain Python (inputs are at most a few hundred thousand numbers)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summarize_ms(values_s: Iterable[float], quantiles: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    """Seconds in, milliseconds out: p50/p95/p99 (as asked), max and count."""
    ordered = sorted(values_s)
    summary: dict[str, float | None] = {}
    for q in quantiles:
        value = percentile(ordered, q)
        summary[f"p{q:g}"] = None if value is None else round(value * 1000, 3)
    summary["max"] = round(ordered[-1] * 1000, 3) if ordered else None
    summary["n"] = len(ordered)
    return summary


def ratio(value: float | None, baseline: float | None, digits: int = 2) -> float | None:
    """value / baseline, or None when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return round(value / baseline, digits)


def minus(value: float | None, baseline: float | None, digits: int = 3) -> float | None:
    """value - baseline, or None when either is missing."""
    if value is None or baseline is None:
        return None
    return round(value - baseline, digits)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """Median, min, max and (max - min) / median in % of repeated measurements of one figure."""
    mid = median(values)
    low, high = (min(values), max(values)) if values else (None, None)
    relative = None if mid in (None, 0) or low is None or high is None else round((high - low) / mid * 100, 1)
    return {"median": mid, "min": low, "max": high, "spread_pct": relative, "n": len(values)}
