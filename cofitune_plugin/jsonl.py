"""Append-only JSON Lines records that survive a crash: each record is flushed and fsynced
before the next work starts, so a killed run loses at most the record being written, and a
line cut by the crash is dropped on the next read (that piece of work simply runs again)."""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

Record = TypeVar("Record")


class RecordError(ValueError):
    """A records file with a bad line that is not the last one: not just a cut write."""


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it."""
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path, parse: Callable[[dict[str, Any]], Record]) -> list[Record]:
    """Every complete record in `path` (none when it does not exist). A last line that does not
    parse was cut by a crash mid-write: it is removed from the file so appends stay valid."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(parse(json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            if i == len(lines) - 1:
                path.write_text("".join(f"{x}\n" for x in lines[:-1]))
                break
            raise RecordError(f"{path}:{i + 1}: not a record of this file") from None
    return records
