"""The statistics of `transferlab report`: summaries over seeds, paired differences and their verdicts.

An arm of an ablation runs once per seed; two arms run with the same seeds share the data split, the
initial weights' seed and the batch order, so they are compared seed by seed (a paired design): the
difference per seed, its mean, and a 95% confidence interval by Student's t with n - 1 degrees of
freedom (SciPy's ``ttest_rel``). The verdict reads the interval, never the mean alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

HELPS, HURTS, NO_EFFECT = "helps", "hurts", "no measurable effect at this sample size"


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # the sample standard deviation (n - 1); nan for one value


def summarise(values: Sequence[float]) -> Summary:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to summarise")
    return Summary(int(x.size), float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan)


@dataclass(frozen=True)
class PairedDifference:
    """``on - off``, seed by seed, over the seeds both arms ran."""
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    std: float
    low: float  # the confidence interval of the mean difference (nan with fewer than two seeds)
    high: float
    confidence: float


def paired_difference(on: Mapping[int, float], off: Mapping[int, float], *,
                      confidence: float = 0.95) -> PairedDifference:
    from scipy import stats

    seeds = tuple(sorted(set(on) & set(off)))
    if not seeds:
        raise ValueError("the two arms share no seed")
    a = np.array([on[s] for s in seeds], dtype=float)
    b = np.array([off[s] for s in seeds], dtype=float)
    d = a - b
    std = float(d.std(ddof=1)) if d.size > 1 else math.nan
    if d.size < 2:
        low = high = math.nan
    elif std == 0.0:
        low = high = float(d.mean())  # every seed moved by exactly the same amount: no spread to widen it
    else:
        interval = stats.ttest_rel(a, b).confidence_interval(confidence)
        low, high = float(interval.low), float(interval.high)
    return PairedDifference(seeds, tuple(float(x) for x in d), float(d.mean()), std, low, high, confidence)


def verdict(diff: PairedDifference, *, higher_is_better: bool = True) -> str:
    """"helps" when the whole interval lies on the better side of 0, "hurts" when it lies on the worse
    side, otherwise (0 inside it, or too few seeds for one) no measurable effect."""
    if math.isnan(diff.low):
        return NO_EFFECT
    sign = 1.0 if higher_is_better else -1.0
    low, high = sorted((sign * diff.low, sign * diff.high))
    if low > 0:
        return HELPS
    if high < 0:
        return HURTS
    return NO_EFFECT
