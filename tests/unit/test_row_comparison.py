"""The end checks' row comparison (tests.support.unmatched_rows): floats that two summation
orders round to either side of a 9th digit match; any other difference is reported."""

from collections import Counter

from tests.support import rounded_rows, unmatched_rows

COLUMNS = ["entity", "avg_amount", "n"]


def rows(*values):
    return rounded_rows([dict(zip(COLUMNS, v)) for v in values], COLUMNS)


def test_a_rounding_tie_at_the_ninth_digit_matches():
    # 68.18578125 summed in two orders: one side of the boundary rounds up, the other down.
    assert unmatched_rows(rows(("a", 68.18578125000001, 4)), rows(("a", 68.18578124999999, 4))) == ([], [])


def test_a_value_off_by_more_than_the_tolerance_is_reported_on_both_sides():
    assert unmatched_rows(rows(("a", 68.1857, 4)), rows(("a", 68.1858, 4))) == (
        [("a", 68.1857, 4)], [("a", 68.1858, 4)])


def test_a_different_count_is_reported_even_with_equal_floats():
    assert unmatched_rows(rows(("a", 10.0, 4)), rows(("a", 10.0, 5))) == ([("a", 10.0, 4)], [("a", 10.0, 5)])


def test_a_missing_duplicate_row_is_reported():
    assert unmatched_rows(rows(("a", 1.5, 1)), rows(("a", 1.5, 1), ("a", 1.5, 1))) == ([], [("a", 1.5, 1)])


def test_each_row_matches_one_twin_only():
    # Two streamed rows near one expected row: one pairs, the other is left over.
    actual = Counter({("a", 2.000000001, 1): 1, ("a", 2.0000000011, 1): 1})
    assert len(unmatched_rows(actual, Counter({("a", 2.0, 1): 1}))[0]) == 1
