"""Is one set of seeds better than another, and by how much? One function answers both the
record rule (beat a baseline by at least a margin: one-sided) and ablations (two-sided, with a
confidence interval).

A baseline given as one number (a published mean) is taken as exact: the test is a one-sample
t-test of the candidate's per-seed improvements. A baseline given as per-seed values gets
Welch's two-sample t-test (no equal-variance assumption). A group needs at least two seeds:
one seed has no spread to test against, and neither have seeds that all scored the same: the t
statistic is then infinite or undefined, so no p-value is given (NO_SPREAD).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

NEEDS_TWO_SEEDS = "not significant: needs >= 2 seeds"
NO_SPREAD = "not significant: the seeds' scores do not vary (all equal), so the t-test is undefined"


@dataclass(frozen=True)
class Difference:
    """mean(baseline) - mean(candidate) of a loss: positive when the candidate is better."""
    mean: float
    ci95: tuple[float, float] | None  # two-sided 95% confidence interval of `mean`
    p_two_sided: float | None         # H0: mean == 0
    p_beats_margin: float | None      # H0: mean <= margin, H1: mean > margin
    margin: float
    test: str                         # "welch", "one-sample", or why there is no test
    t: float | None = None            # t statistic of H0 mean == 0 ...
    t_beats_margin: float | None = None  # ... and of H0 mean <= margin
    df: float | None = None           # degrees of freedom (Welch-Satterthwaite for "welch")

    def scaled(self, factor: float) -> "Difference":
        """The same difference in another unit (nats per token -> bits per byte); p-values keep."""
        ci = None if self.ci95 is None else (self.ci95[0] * factor, self.ci95[1] * factor)
        return Difference(self.mean * factor, ci, self.p_two_sided, self.p_beats_margin,
                          self.margin * factor, self.test, self.t, self.t_beats_margin, self.df)


def finite_or_none(value: float) -> float | None:
    # zero spread across seeds makes the t statistic infinite or undefined: report no p-value
    return float(value) if math.isfinite(value) else None


def mean_difference(baseline: float | Sequence[float], candidate: Sequence[float],
                    margin: float = 0.0) -> Difference:
    """mean(baseline) - mean(candidate); a float baseline is exact, a sequence is a sample of seeds."""
    exact_baseline = isinstance(baseline, (int, float))
    baseline, candidate = np.atleast_1d(np.asarray(baseline, float)), np.asarray(candidate, float)
    mean = float(baseline.mean() - candidate.mean())
    if len(candidate) < 2 or (not exact_baseline and len(baseline) < 2):
        return Difference(mean, None, None, None, margin, NEEDS_TWO_SEEDS)
    if np.ptp(candidate) == 0 and (exact_baseline or np.ptp(baseline) == 0):  # a standard error of 0
        return Difference(mean, None, None, None, margin, NO_SPREAD)
    if exact_baseline:
        improvements = baseline[0] - candidate
        test = "one-sample"
        two_sided = stats.ttest_1samp(improvements, 0.0)
        beats_margin = stats.ttest_1samp(improvements, margin, alternative="greater")
    else:
        test = "welch"
        two_sided = stats.ttest_ind(baseline, candidate, equal_var=False)
        beats_margin = stats.ttest_ind(baseline - margin, candidate, equal_var=False, alternative="greater")
    ci = two_sided.confidence_interval(0.95)
    ci95 = (finite_or_none(ci.low), finite_or_none(ci.high))
    return Difference(mean, None if None in ci95 else ci95, finite_or_none(two_sided.pvalue),
                      finite_or_none(beats_margin.pvalue), margin, test, finite_or_none(two_sided.statistic),
                      finite_or_none(beats_margin.statistic), float(two_sided.df))
