"""What counts as an answer in exact-match scoring, in plain Python.

`answer_regex` extracts the answer from a prediction (its first group, the last match). A reference
is whatever form users' held-out sets have: a bare answer (`960`, `1,200`, `12.5`, `Paris`), a
worked solution that contains the answer pattern, or the last assistant message holding either. So
the regex is applied to the reference too, and a reference it does not match is taken whole as the
answer. Both sides are then normalised alike: numbers as numbers (`1,200` and `1200.0` read
`1200`), text without case or surrounding space.
"""

import math
import re


def normalise_answer(text: str) -> str:
    """'1,200', ' 1200.0 ' -> '1200'; '12.50' -> '12.5'; ' Paris ' -> 'paris'."""
    text = text.strip()
    try:
        number = float(text.replace(",", ""))
    except ValueError:
        return text.casefold()
    return str(int(number)) if math.isfinite(number) and number.is_integer() else str(number)


def extract_answer(text: str, pattern: str) -> str | None:
    """The normalised first group of the regex's last match (the final answer follows any
    intermediate ones); None when the regex does not match."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    return normalise_answer(matches[-1][1] or "")


def reference_answer(reference: str, pattern: str) -> str:
    """The answer a reference holds: what the regex extracts, or else the whole reference."""
    extracted = extract_answer(reference, pattern)
    return normalise_answer(reference) if extracted is None else extracted


def exact_match_hits(predictions: list[str], references: list[str], pattern: str) -> list[bool]:
    """Per prediction: does its extracted answer equal the reference's answer? A prediction the
    regex does not match is a miss."""
    return [
        extract_answer(prediction, pattern) == reference_answer(reference, pattern)
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def exact_match(predictions: list[str], references: list[str], pattern: str) -> float:
    """Share of predictions whose extracted answer equals the reference's answer."""
    return sum(exact_match_hits(predictions, references, pattern)) / len(references)


def can_extract(reference: str, pattern: str) -> bool:
    """Whether some prediction could yield this reference's answer: the regex matches the
    reference, or the regex's first group can match the whole reference (as written or
    normalised). A group this reader cannot isolate counts as able, so that it never warns
    wrongly."""
    if re.search(pattern, reference):
        return True
    group = _first_group(pattern)
    if group is None:
        return True
    flags = re.compile(pattern).flags
    try:
        compiled = re.compile(group, flags)
    except re.error:  # e.g. a back reference that only resolves in the whole pattern
        return True
    forms = {reference.strip(), normalise_answer(reference)}
    return any(compiled.fullmatch(form) for form in forms)


def _first_group(pattern: str) -> str | None:
    """The source text of the pattern's first capturing group: `(...)` or `(?P<name>...)`,
    skipping escapes, character classes and non-capturing or look-around groups."""
    opened: list[bool] = []  # per open parenthesis: is it group 1
    start = None
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":
            i = _class_end(pattern, i)
            continue
        if char == "(":
            capturing = not pattern.startswith("?", i + 1) or pattern.startswith("?P<", i + 1)
            first = capturing and start is None
            if first:
                start = i + 1 + (pattern.index(">", i) - i if pattern[i + 1] == "?" else 0)
            opened.append(first)
        elif char == ")" and opened and opened.pop():
            return pattern[start:i]
        i += 1
    return None


def _class_end(pattern: str, i: int) -> int:
    """Index just past the character class opening at `i` (a `]` first in it is literal)."""
    j = i + 1
    if pattern.startswith("^", j):
        j += 1
    if pattern.startswith("]", j):
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1
