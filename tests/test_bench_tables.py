"""benchmarks/common.py median_rows: the medians over rounds that `--repeats N` prints for the TRL comparisons."""

import math

import pytest

from benchmarks.common import median_rows

pytestmark = pytest.mark.timeout(30)


def test_median_rows_takes_each_numeric_column_over_the_rounds():
    nan = float("nan")
    rounds = [
        [{"loop": "trl", "s/step": 6.18, "time vs peer": nan, "note": "a"},
         {"loop": "cf", "s/step": 5.07, "time vs peer": 0.821, "note": "b"}],
        [{"loop": "trl", "s/step": 6.67, "time vs peer": nan, "note": "c"},
         {"loop": "cf", "s/step": 3.71, "time vs peer": 0.556, "note": "d"}],
        [{"loop": "cf", "s/step": 4.07, "time vs peer": 0.673, "note": "e"},  # another order; trl failed here
         {"loop": "late", "s/step": 1.0}],
    ]
    out = median_rows(rounds)
    assert [r["loop"] for r in out] == ["trl", "cf", "late"]  # first-seen order
    trl, cf, late = out
    assert trl["s/step"] == pytest.approx((6.18 + 6.67) / 2)  # median of the two rounds it ran in
    assert math.isnan(trl["time vs peer"])  # no finite value: NaN, not an error
    assert cf["s/step"] == 4.07 and cf["time vs peer"] == 0.673  # the middle of three, per column
    assert cf["note"] == "b" and trl["note"] == "a"  # text: as first seen
    assert late == {"loop": "late", "s/step": 1.0}


def test_median_rows_of_one_round_is_that_round():
    rows = [{"loop": "x", "a": 1, "b": 2.5, "ok": True}]
    assert median_rows([rows]) == rows
