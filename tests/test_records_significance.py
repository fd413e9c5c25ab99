"""records/significance.py against t-test values computed by hand and read from t tables."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from scipy.special import betainc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "records"))

from significance import NEEDS_TWO_SEEDS, NO_SPREAD, mean_difference  # noqa: E402

T_TABLE_975 = {2: 4.303, 4: 2.776}  # two-sided 95% critical values of Student's t (printed tables, 3 decimals)


def mean_sd(xs):
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def t_sf_df2(t):
    """P(T > t) for 2 degrees of freedom, in closed form."""
    return 0.5 - t / (2 * math.sqrt(2 + t * t))


def t_sf(t, df):
    """P(T > t) for any degrees of freedom, through the regularized incomplete beta function."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1 - tail


def welch(a, b):
    """(t of mean(a) - mean(b), Welch-Satterthwaite degrees of freedom)."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    va, vb = sa ** 2 / len(a), sb ** 2 / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return (ma - mb) / math.sqrt(va + vb), df


def test_exact_baseline_uses_a_one_sample_t_test_of_the_improvements():
    baseline, candidate = 2.0727, [2.0600, 2.0632, 2.0611]
    improvements = [baseline - c for c in candidate]
    mean, sd = mean_sd(improvements)
    se = sd / math.sqrt(3)
    result = mean_difference(baseline, candidate, margin=0.005)
    assert result.test == "one-sample"
    assert result.mean == pytest.approx(mean, rel=1e-12)
    assert result.p_beats_margin == pytest.approx(t_sf_df2((mean - 0.005) / se), rel=1e-9)
    assert result.p_two_sided == pytest.approx(2 * t_sf_df2(mean / se), rel=1e-9)
    assert result.ci95 == pytest.approx((mean - T_TABLE_975[2] * se, mean + T_TABLE_975[2] * se), abs=1e-3 * se)


def test_t_of_6_965_with_two_degrees_of_freedom_is_p_0_01():
    # the t table's one-sided 1% critical value for 2 degrees of freedom
    sd = 0.003
    candidate = [1.0 - 0.05 - sd, 1.0 - 0.05, 1.0 - 0.05 + sd]  # improvements 0.05 -+ sd
    margin = 0.05 - 6.965 * sd / math.sqrt(3)
    assert mean_difference(1.0, candidate, margin=margin).p_beats_margin == pytest.approx(0.01, abs=1e-4)


def test_per_seed_baseline_uses_welch_with_unequal_variances():
    baseline, candidate = [2.0727, 2.0790, 2.0701, 2.0755], [2.0600, 2.0612, 2.0605]
    t, df = welch(baseline, candidate)
    t_margin, _ = welch([b - 0.005 for b in baseline], candidate)
    result = mean_difference(baseline, candidate, margin=0.005)
    assert result.test == "welch"
    assert result.mean == pytest.approx(sum(baseline) / 4 - sum(candidate) / 3, rel=1e-12)
    assert result.p_beats_margin == pytest.approx(t_sf(t_margin, df), rel=1e-9)
    assert result.p_two_sided == pytest.approx(2 * t_sf(abs(t), df), rel=1e-9)


def test_welch_interval_with_equal_spreads_has_four_degrees_of_freedom():
    baseline, candidate = [2.10, 2.11, 2.12], [2.08, 2.09, 2.10]
    se = math.sqrt(2 * 0.01 ** 2 / 3)
    result = mean_difference(baseline, candidate)
    assert result.ci95 == pytest.approx((0.02 - T_TABLE_975[4] * se, 0.02 + T_TABLE_975[4] * se), abs=1e-3 * se)


def test_one_candidate_seed_has_no_test():
    result = mean_difference(2.07, [2.05], margin=0.005)
    assert result.mean == pytest.approx(0.02)
    assert (result.p_beats_margin, result.p_two_sided, result.ci95) == (None, None, None)
    assert result.test == NEEDS_TWO_SEEDS == "not significant: needs >= 2 seeds"


def test_a_baseline_sample_of_one_seed_is_not_taken_as_exact():
    # a list is a sample of seeds, and one seed has no spread; a float is a published number
    assert mean_difference([2.07], [2.05, 2.06]).p_two_sided is None
    assert mean_difference(2.07, [2.05, 2.06]).p_two_sided is not None


def test_scaling_changes_the_unit_not_the_p_values():
    nats = mean_difference([2.10, 2.11, 2.12], [2.08, 2.09, 2.11], margin=0.005)
    bpb = nats.scaled(0.5)
    assert bpb.mean == pytest.approx(nats.mean / 2)
    assert bpb.ci95 == pytest.approx((nats.ci95[0] / 2, nats.ci95[1] / 2))
    assert bpb.margin == pytest.approx(0.0025)
    assert (bpb.p_two_sided, bpb.p_beats_margin) == (nats.p_two_sided, nats.p_beats_margin)


@pytest.mark.parametrize("baseline", [2.10, [2.10, 2.10]])  # one-sample and Welch: a standard error of 0
def test_seeds_whose_scores_do_not_vary_get_no_p_value(baseline):
    result = mean_difference(baseline, [2.05, 2.05], margin=0.005)
    assert result.mean == pytest.approx(0.05)
    assert (result.p_two_sided, result.p_beats_margin, result.ci95, result.t) == (None, None, None, None)
    assert result.test == NO_SPREAD


def test_a_baseline_without_spread_against_candidates_with_some_is_still_welch():
    result = mean_difference([2.10, 2.10], [2.04, 2.06])
    t, df = welch([2.10, 2.10], [2.04, 2.06])
    assert result.test == "welch" and result.p_two_sided == pytest.approx(2 * t_sf(abs(t), df), rel=1e-9)
