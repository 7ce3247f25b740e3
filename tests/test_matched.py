"""The rule shared by the dial's recommendation and the benchmark's picks: among candidates at
matched speciality the most versatile, never a more versatile one that learned less."""

from cofitune_plugin.matched import (
    SPEC_MATCH,
    best_at_matched_speciality,
    rank_at_matched_speciality,
)

# (name, speciality, versatility)
CANDIDATES = [("a", 1.0, 0.90), ("b", 0.97, 0.95), ("c", 0.94, 0.99), ("d", 0.50, 1.00)]


def _rank(candidates, match=SPEC_MATCH):
    ranked = rank_at_matched_speciality(candidates, lambda c: c[1], lambda c: c[2], match)
    return [c[0] for c in ranked]


def test_matched_candidates_come_first_by_versatility_then_the_rest_by_speciality():
    assert SPEC_MATCH == 0.95
    assert _rank(CANDIDATES) == ["b", "a", "c", "d"]  # c keeps more, but learned less
    assert _rank(CANDIDATES, match=0.9) == ["c", "b", "a", "d"]


def test_ties_keep_the_callers_order_and_no_match_gives_none():
    tied = [("x", 1.0, 0.9), ("y", 0.96, 0.9)]
    assert _rank(tied) == ["x", "y"] and _rank(tied[::-1]) == ["y", "x"]
    unmatched = [("p", 0.5, 1.0), ("q", 0.8, 0.9)]
    assert _rank(unmatched) == ["q", "p"]
    assert best_at_matched_speciality(unmatched, lambda c: c[1], lambda c: c[2]) is None
    assert best_at_matched_speciality(CANDIDATES, lambda c: c[1], lambda c: c[2])[0] == "b"
