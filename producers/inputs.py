"""Reading records from CSV or JSON lines: one record per line."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, Iterator


@dataclass(frozen=True, slots=True)
class InputLine:
    number: int
    values: list[float] | None
    error: str | None = None


def _numbers(raw) -> list[float]:
    if isinstance(raw, dict):
        if set(raw) == {"values"}:
            raw = raw["values"]
        elif set(raw) == {"value"}:
            raw = [raw["value"]]
        else:
            raise ValueError('a JSON object needs exactly one key, "value" or "values"')
    if not isinstance(raw, list):
        raw = [raw]
    out = []
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{v!r} is not a finite number")
        try:
            v = float(v)  # a JSON integer beyond float range raises OverflowError here
        except OverflowError:
            raise ValueError("an integer too large to be a finite number") from None
        if not math.isfinite(v):
            raise ValueError(f"{v!r} is not a finite number")
        out.append(v)
    if not out:
        raise ValueError("no values")
    return out


def parse_line(text: str, fmt: str = "auto") -> list[float]:
    """Parse one line: ``1.5,2`` (CSV) or ``[1.5, 2]``, ``1.5``, ``{"values": [...]}`` (JSON)."""
    text = text.strip()
    if fmt == "jsonl" or (fmt == "auto" and text[:1] in "[{"):
        try:
            raw = json.loads(text)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        return _numbers(raw)
    values = []
    for cell in text.split(","):
        v = float(cell.strip())
        if not math.isfinite(v):
            raise ValueError(f"{cell.strip()!r} is not a finite number")
        values.append(v)
    return values


def read_records(lines: Iterable[str], fmt: str = "auto") -> Iterator[InputLine]:
    """Yield every non-blank, non-comment line, parsed or with the reason it is not."""
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            yield InputLine(number, parse_line(line, fmt))
        except (ValueError, json.JSONDecodeError) as err:
            yield InputLine(number, None, str(err))
