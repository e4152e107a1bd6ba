"""minispin.stats against known values: Wilson intervals, t quantiles, and paired bootstraps whose answer is
known exactly (identical stages, every question flipped) or analytically (the SE of a paired difference)."""
import math

import numpy as np
import pytest

from minispin.stats import (format_mean_se, format_stage_table, mean_interval, mean_se, paired_bootstrap,
                            stage_table, t_quantile, wilson_interval)


@pytest.mark.parametrize("k, n, low, high", [
    # values from scipy.stats.binomtest(k, n).proportion_ci(method="wilson") (SciPy 1.17), printed to 10 digits
    (5, 10, 0.2365930905, 0.7634069095),
    (0, 10, 0.0, 0.2775327999),
    (10, 10, 0.7224672001, 1.0),
    (81, 263, 0.2552885199, 0.3662095770),
    (1, 600, 0.0002942682, 0.0093795605),
])
def test_wilson_known_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(low, abs=1e-9) and got[1] == pytest.approx(high, abs=1e-9)


def test_wilson_matches_scipy_on_random_cases():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 2000))
        k = int(rng.integers(0, n + 1))
        ci = stats.binomtest(k, n).proportion_ci(method="wilson", confidence_level=0.9)
        assert wilson_interval(k, n, 0.9) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))


def test_wilson_formula_and_bad_input():
    # the defining property: p_hat is at z standard errors (taken at the bound) from each bound
    k, n, z = 37, 120, 1.959963984540054
    for bound in wilson_interval(k, n):
        assert abs(k / n - bound) == pytest.approx(z * math.sqrt(bound * (1 - bound) / n), rel=1e-9)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


@pytest.mark.parametrize("df, q", [  # scipy.stats.t.ppf(0.975, df)(1, 12.706204736), (2, 4.302652730), (4, 2.776445105), (29, 2.045229642),
                                   (1000, 1.962339081)])
def test_t_quantile_known_values(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, rel=1e-8)
    assert t_quantile(0.025, df) == pytest.approx(-q, rel=1e-8)


def test_mean_interval_and_seeds():
    mean, low, high = mean_interval([1, 2, 3, 4, 5])
    se = math.sqrt(2.5) / math.sqrt(5)
    assert mean == 3 and low == pytest.approx(3 - 2.776445105 * se) and high == pytest.approx(3 + 2.776445105 * se)
    _, low_n, high_n = mean_interval([1, 2, 3, 4, 5], normal=True)
    assert high_n - 3 == pytest.approx(1.959963985 * se)
    assert mean_se([0.30, 0.34, 0.32]) == (pytest.approx(0.32), pytest.approx(0.02 / math.sqrt(3)))
    assert format_mean_se([0.30, 0.34, 0.32]) == "0.320 ± 0.012"
    assert format_mean_se([0.5]) == "0.500 ± n/a"


def test_paired_bootstrap_identical_stages_is_exactly_zero():
    rng = np.random.default_rng(1)
    hits = rng.random(600) < 0.4
    r = paired_bootstrap(hits, hits, resamples=2000, seed=3)
    assert (r.difference, r.low, r.high, r.se) == (0.0, 0.0, 0.0, 0.0)


def test_paired_bootstrap_every_question_flips_is_exactly_one():
    r = paired_bootstrap([False] * 50, [True] * 50, resamples=500)
    assert (r.difference, r.low, r.high) == (1.0, 1.0, 1.0)
    r = paired_bootstrap([True] * 50, [False] * 50, resamples=500)
    assert (r.difference, r.low, r.high) == (-1.0, -1.0, -1.0)


def test_paired_bootstrap_matches_the_analytic_se_of_a_paired_difference():
    """n = 4000 questions; stage B fixes 15% of A's wrong answers and breaks 5% of its right ones. The
    paired difference d_i in {-1, 0, 1} has SE sd(d) / sqrt(n); an unpaired SE would be ~2x larger here."""
    rng = np.random.default_rng(0)
    n = 4000
    a = rng.random(n) < 0.5
    flip_up, flip_down = rng.random(n) < 0.15, rng.random(n) < 0.05
    b = np.where(a, ~flip_down, flip_up)
    d = b.astype(float) - a.astype(float)
    analytic = d.std(ddof=1) / math.sqrt(n)
    r = paired_bootstrap(a, b, resamples=4000, seed=7)
    assert r.difference == pytest.approx(d.mean(), abs=1e-12)
    assert r.se == pytest.approx(analytic, rel=0.05)
    assert r.low == pytest.approx(d.mean() - 1.96 * analytic, abs=0.25 * analytic)
    assert r.high == pytest.approx(d.mean() + 1.96 * analytic, abs=0.25 * analytic)
    unpaired = math.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
    assert r.se < 0.7 * unpaired


def test_paired_bootstrap_is_seeded_and_checks_lengths():
    rng = np.random.default_rng(2)
    a, b = rng.random(300) < 0.3, rng.random(300) < 0.35
    assert paired_bootstrap(a, b, resamples=300, seed=5) == paired_bootstrap(a, b, resamples=300, seed=5)
    assert paired_bootstrap(a, b, resamples=300, seed=5) != paired_bootstrap(a, b, resamples=300, seed=6)
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap(a, b[:-1])


def test_stage_table_and_its_text():
    base = [True] * 30 + [False] * 70
    better = [True] * 40 + [False] * 60  # 10 more right, none lost
    rows = stage_table({"SFT": base, "SPIN iter 0": better, "same": list(base)}, "SFT", resamples=1000)
    assert [r["stage"] for r in rows] == ["SFT", "SPIN iter 0", "same"]
    assert rows[0]["accuracy"] == 0.3 and (rows[0]["low"], rows[0]["high"]) == wilson_interval(30, 100)
    assert "vs_baseline" not in rows[0]
    v = rows[1]["vs_baseline"]
    assert v["difference"] == pytest.approx(0.1) and 0 < v["low"] < 0.1 < v["high"]
    assert rows[2]["vs_baseline"]["low"] == rows[2]["vs_baseline"]["high"] == 0.0
    text = format_stage_table(rows, "SFT")
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["stage", "accuracy", "[95%"] and "vs SFT" in lines[0]
    assert lines[2].startswith("SFT") and lines[2].rstrip().endswith("-")
    assert "0.400 [0.309, 0.498]" in lines[3] and "+0.100 [" in lines[3]
    with pytest.raises(ValueError, match="same questions"):
        stage_table({"SFT": base, "short": base[:10]}, "SFT")
