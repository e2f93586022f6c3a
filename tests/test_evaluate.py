"""The evaluation's statistics against hand-computed values."""

import math

import pytest

from chatforge.evaluate import clustered_se, mean_se, win_rate


def test_mean_se_known_values():
    m, se = mean_se([1.0, 0.0, 1.0, 0.0])
    assert m == 0.5
    assert se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))  # sample variance 1/3, n = 4
    assert mean_se([3.0]) == (3.0, 0.0)


def test_clustered_se_reduces_to_mean_se_and_to_the_group_means():
    xs = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    # one value per group: the ordinary standard error
    assert clustered_se(xs, range(len(xs))) == pytest.approx(mean_se(xs))
    # identical values within equally large groups: the standard error of the group means (G = 3 here)
    ys = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    m, se = clustered_se(ys, ["a", "a", "b", "b", "c", "c"])
    assert m == pytest.approx(4 / 6)
    assert se == pytest.approx(mean_se([1.0, 0.0, 1.0])[1])
    # by hand: m = 0.5, residual sums per group +1, -1, 0 -> sqrt(3/2 * 2) / 6
    assert clustered_se([1.0, 1.0, 0.0, 0.0, 1.0, 0.0], [0, 0, 1, 1, 2, 2])[1] == pytest.approx(math.sqrt(3.0) / 6)
    assert clustered_se([1.0, 0.0], ["p", "p"]) == (0.5, 0.0)  # one group: no spread to measure
    with pytest.raises(ValueError):
        clustered_se([1.0, 0.0], ["p"])


def test_win_rate_counts_ties_half():
    r = win_rate([0.9, 0.5, 0.2, 0.7], [0.1, 0.5, 0.3, 0.7])
    assert r["win_rate"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (1, 2, 1, 4)
    assert r["win_rate_lo"] == pytest.approx(max(0.0, 0.5 - 1.96 * r["win_rate_se"]))
    with pytest.raises(ValueError, match="equally long"):
        win_rate([0.1], [0.1, 0.2])
