"""A seeded short-answer speciality: dates written the ways documents write them, to ISO 8601.

The forgetting benchmark's domain on a CPU. Each answer is one short line ("#### 2021-03-05"), so
150 steps of batch 8 fit a 2-core CPU while exact match on held-out dates resolves a few points;
the rule (month names and numbers, day-first and month-first orders, ordinals) is learnable by a
135M model, and the answer format leaking into general answers is a plain sign of forgetting.
"""

from __future__ import annotations

import datetime
import random

ANSWER_REGEX = r"####\s*(\d{4}-\d{2}-\d{2})"
ORDINALS = [
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
    "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
    "seventeenth", "eighteenth", "nineteenth", "twentieth", "twenty-first", "twenty-second",
    "twenty-third", "twenty-fourth", "twenty-fifth", "twenty-sixth", "twenty-seventh",
    "twenty-eighth", "twenty-ninth", "thirtieth", "thirty-first",
]  # fmt: skip
DOCUMENTS = ["invoice", "contract", "lease", "purchase order", "court filing", "bank statement"]
EVENTS = ["was signed on", "is dated", "was issued on", "takes effect on", "was received on"]


def _suffix(day: int) -> str:
    if day in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def written_forms(date: datetime.date) -> list[str]:
    """The ways a document may write `date`."""
    month, day, year = date.strftime("%B"), date.day, date.year
    return [
        f"{month} {day}, {year}",
        f"{day} {month} {year}",
        f"{month} {day}{_suffix(day)}, {year}",
        f"the {ORDINALS[day - 1]} of {month}, {year}",
        f"{date.strftime('%b')}. {day}, {year}",
        f"{date.month:02d}/{day:02d}/{year} (US format)",
        f"{day:02d}.{date.month:02d}.{year} (European format)",
    ]


def make_example(rng: random.Random) -> tuple[str, str]:
    """A question and its answer, "#### YYYY-MM-DD"."""
    start = datetime.date(1950, 1, 1).toordinal()
    date = datetime.date.fromordinal(rng.randrange(start, start + 100 * 365))
    form = rng.choice(written_forms(date))
    document, event = rng.choice(DOCUMENTS), rng.choice(EVENTS)
    question = f"The {document} {event} {form}. Write that date in ISO 8601 form."
    return question, f"#### {date.isoformat()}"
