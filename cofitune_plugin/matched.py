"""Choosing among models at matched speciality: the rule the dial's recommendation and the
forgetting benchmark's picks share.

A model that learned less keeps more of the base, so versatility alone would always prefer the
least-trained model. Compared only among models that reach a share of the best speciality
(`SPEC_MATCH` of it), the one that keeps the most general ability is the one to use.
"""

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

# The share of the best speciality gain a model must reach to count as matched.
SPEC_MATCH = 0.95


def rank_at_matched_speciality(
    candidates: Sequence[T],
    speciality: Callable[[T], float],
    versatility: Callable[[T], float],
    match: float = SPEC_MATCH,
) -> list[T]:
    """`candidates` best first: those whose speciality reaches `match`, most versatile first,
    then the others, most special first. Ties keep the candidates' order."""
    matched = [c for c in candidates if speciality(c) >= match]
    rest = [c for c in candidates if speciality(c) < match]
    return sorted(matched, key=lambda c: -versatility(c)) + sorted(
        rest, key=lambda c: -speciality(c)
    )


def best_at_matched_speciality(
    candidates: Sequence[T],
    speciality: Callable[[T], float],
    versatility: Callable[[T], float],
    match: float = SPEC_MATCH,
) -> T | None:
    """The most versatile candidate among those whose speciality reaches `match`; None when
    none does."""
    ranked = rank_at_matched_speciality(candidates, speciality, versatility, match)
    return ranked[0] if ranked and speciality(ranked[0]) >= match else None
