"""The statistics of ``loopcpp bench``: per-variant speeds and paired time ratios.

Target ratios are *paired*: taken round by round between runs that sat next
to each other, so slow drifts in machine load cancel, and reported as their
median with a distribution-free 95 % interval (:func:`ratio_interval`), which
narrows as rounds are added; :func:`verdict` judges an interval against a limit.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

# the per-run speeds a Result keeps, one list each
SPEEDS = ("prefill_tps", "decode_tps", "prefill_cpu_tps", "decode_cpu_tps")


@dataclass
class Result:
    name: str
    prefill_tps: list[float] = field(default_factory=list)  # tokens per wall-clock second
    decode_tps: list[float] = field(default_factory=list)
    prefill_cpu_tps: list[float] = field(default_factory=list)  # per CPU second of the process
    decode_cpu_tps: list[float] = field(default_factory=list)
    state_bytes: int = 0
    rss_mib: float = 0.0
    logits_sha: str = ""
    weight_bytes: int = 0
    huge_mib: float | None = None  # least MiB in transparent huge pages of any of its processes
    model_mapped: bool | None = None  # whether a process mapped the model file

    @property
    def prefill(self) -> float:
        return statistics.median(self.prefill_tps)

    @property
    def decode(self) -> float:
        return statistics.median(self.decode_tps)


def median_ratio(base: Result, r: Result, phase: str) -> float:
    """Time ratio r / base from the medians of ``phase`` (prefill, decode, *_cpu)."""
    return statistics.median(getattr(base, f"{phase}_tps")) / statistics.median(
        getattr(r, f"{phase}_tps")
    )


CLOCKS = ("wall", "cpu")


def paired_ratios(a: Result, b: Result, phase: str) -> list[float]:
    """Round-by-round time ratios of ``a`` over ``b`` for ``phase``.

    ``phase``: prefill or decode (wall clock), prefill_cpu or decode_cpu (CPU time).
    """
    speed_a, speed_b = getattr(a, f"{phase}_tps"), getattr(b, f"{phase}_tps")
    return [vb / va for va, vb in zip(speed_a, speed_b, strict=True)]


def ratio_interval(ratios: Sequence[float]) -> tuple[float, float, float]:
    """(low, median, high): the median of ``ratios`` with a distribution-free interval.

    The interval runs between order statistics chosen so that it holds the true
    median with at least 95 % probability (binomial, no assumption about the
    noise, so a few runs slowed by other work cannot pull it). With fewer than
    6 ratios no such pair exists and the interval is min..max, whose coverage
    is lower; :func:`verdict` then calls nothing met.
    """
    xs = sorted(ratios)
    n = len(xs)
    j = 0  # 0-based index of the lower end: (x[j], x[n-1-j]) misses the median with
    # probability 2 * P(X <= j), X ~ Binomial(n, 1/2); widen no further than 95 % allows
    while j + 1 < n - 2 - j and _binom_tail(n, j + 2) <= 0.025:
        j += 1
    return xs[j], statistics.median(xs), xs[n - 1 - j]


def _binom_tail(n: int, k: int) -> float:
    """P(X < k) for X ~ Binomial(n, 1/2): the chance the median lies below x(k+1)."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


MIN_ROUNDS = 6  # the fewest ratios whose min..max holds the median with >= 95 %


def verdict(low: float, high: float, limit: float | None, n: int = MIN_ROUNDS) -> str:
    """met: the whole interval is at or below ``limit``; not met: all of it above;
    else "inside the noise". Without a limit the target is "no slower than the
    reference": met when 1.0 lies inside the interval, "met: faster" when the
    whole interval is below 1, not met when it is above. Fewer than
    MIN_ROUNDS ratios prove nothing either way.
    """
    if n < MIN_ROUNDS:
        return "inside the noise"
    if limit is None:
        if high < 1.0:
            return "met: faster"
        return "met" if low <= 1.0 else "not met"
    if high <= limit:
        return "met"
    return "not met" if low > limit else "inside the noise"


