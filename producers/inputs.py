"""Reading records from CSV or JSON lines: one record per line.

A bad line is not fatal: it comes back as an :class:`InputLine` with the reason, and the
caller (``sealedsum produce``) reports it by line number and goes on. What is fatal is an
input that does not fit the options at all (``--column amount`` with no such column in the
header): :class:`~sealedsum.common.errors.InputError`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from sealedsum.common.errors import InputError


@dataclass(frozen=True, slots=True)
class InputLine:
    number: int
    values: list[float] | None
    error: str | None = None


# float() also takes "1_000", "nan", "infinity" and non-ASCII digits ("١٢"); a number in
# a data file is none of these.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def parse_number(text: str) -> float:
    """One CSV cell as a finite float: digits, an optional sign, point and exponent, nothing else."""
    cell = text.strip()
    if not _NUMBER.fullmatch(cell):
        if cell.lower() in _NON_FINITE:
            raise ValueError(f"{cell!r} is not a finite number")
        raise ValueError(f"{cell!r} is not a number" if cell else "an empty value")
    v = float(cell)
    if not math.isfinite(v):
        raise ValueError(f"{cell!r} is not a finite number")
    return v


def _is_number(text: str) -> bool:
    try:
        parse_number(text)
    except ValueError:
        return False
    return True


def _numbers(raw, what: str = "") -> list[float]:
    if not isinstance(raw, list):
        raw = [raw]
    out = []
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{what}{v!r} is not a finite number")
        try:
            v = float(v)  # a JSON integer beyond float range raises OverflowError here
        except OverflowError:
            raise ValueError(f"{what}an integer too large to be a finite number") from None
        if not math.isfinite(v):
            raise ValueError(f"{what}{v!r} is not a finite number")
        out.append(v)
    if not out:
        raise ValueError(f"{what}no values")
    return out


def _json(text: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _json_values(raw, field: str | None) -> list[float]:
    if field is not None:
        if not isinstance(raw, dict):
            raise ValueError(f"not a JSON object (--field {field} reads objects)")
        if field not in raw:
            raise ValueError(f"no field {field!r} (fields: {', '.join(map(str, raw)) or 'none'})")
        return _numbers(raw[field], f"field {field!r}: ")
    if isinstance(raw, dict):
        if set(raw) == {"values"}:
            raw = raw["values"]
        elif set(raw) == {"value"}:
            raw = [raw["value"]]
        else:
            raise ValueError('a JSON object needs exactly one key, "value" or "values" '
                             "(or pick a field with --field NAME)")
    return _numbers(raw)


def _cells(text: str) -> list[str]:
    # The csv module for quoted header names ("amount"); an empty line is one empty cell.
    try:
        rows = list(csv.reader([text]))
    except csv.Error as err:  # a cell over csv.field_size_limit()
        raise ValueError(f"not a CSV row: {err}") from None
    return rows[0] if rows and rows[0] else [""]


def _is_json(text: str, fmt: str) -> bool:
    return fmt == "jsonl" or (fmt == "auto" and text[:1] in "[{")


def parse_line(text: str, fmt: str = "auto", *, field: str | None = None,
               columns: Sequence[int] | None = None) -> list[float]:
    """Parse one line: ``1.5,2`` (CSV) or ``[1.5, 2]``, ``1.5``, ``{"values": [...]}`` (JSON).

    :param field: read this field of a JSON object (a number, or a list of numbers).
    :param columns: read these CSV columns (0-based), in this order.
    """
    text = text.strip()
    if _is_json(text, fmt):
        return _json_values(_json(text), field)
    cells = _cells(text)
    if columns is not None:
        if max(columns) >= len(cells):
            raise ValueError(f"{len(cells)} columns, column {max(columns) + 1} wanted")
        cells = [cells[i] for i in columns]
    return [parse_number(cell) for cell in cells]


class RecordReader:
    """Records from CSV or JSON lines, with the options of ``sealedsum produce``.

    :param fmt: ``auto`` (per line: JSON if it starts with ``[`` or ``{``, else CSV), ``csv``
        or ``jsonl``.
    :param columns: CSV columns to read, by header name or 1-based index (a name wins over an
        index that looks like one); default every column. A name needs a header row.
    :param field: the JSON object field to read (a number, or a list for a multi-value stream).
    :param header: ``True``: the first line is a CSV header; ``False``: it never is; ``None``
        (default): it is when none of its cells is a number and the next line has as many
        cells, some of them numbers.

    After reading, :attr:`header` holds the header's names and :attr:`header_line` its line
    number (both ``None`` without one).
    """

    def __init__(self, fmt: str = "auto", *, columns: Sequence[str] | None = None, field: str | None = None,
                 header: bool | None = None) -> None:
        if fmt not in ("auto", "csv", "jsonl"):
            raise InputError(f"unknown input format {fmt!r}")
        if columns and field is not None:
            raise InputError("--column reads CSV and --field reads JSON objects: give one of them")
        if fmt == "jsonl" and (columns or header):
            raise InputError("--column and --header are for CSV input, not --format jsonl")
        if fmt == "csv" and field is not None:
            raise InputError("--field is for JSON lines, not --format csv")
        self.fmt = "csv" if columns or header else "jsonl" if field is not None else fmt
        self.columns = list(columns) if columns else None
        self.field = field
        if self.columns and any(not c.isdigit() for c in self.columns) and header is None:
            header = True  # a column name only means something in a header
        self.want_header = header
        self.header: list[str] | None = None
        self.header_line: int | None = None
        self._indexes: list[int] | None = None

    def _resolve_columns(self) -> None:
        if self.columns is None:
            return
        out = []
        for c in self.columns:
            if self.header is not None and c in self.header:
                out.append(self.header.index(c))
            elif c.isdigit() and int(c) >= 1:
                out.append(int(c) - 1)
            elif self.header is None:
                raise InputError(f"--column {c}: not a column number (1 is the first), and the input has no header")
            else:
                raise InputError(f"--column {c}: no such column in the header (line {self.header_line}: "
                                 f"{', '.join(self.header)})")
        self._indexes = out

    def _could_be_header(self, first: str) -> bool:
        try:
            names = _cells(first)
        except ValueError:
            return False
        return not _is_json(first, self.fmt) and all(c.strip() for c in names) and not any(map(_is_number, names))

    def _looks_like_header(self, first: str, second: str | None) -> bool:
        if second is None or _is_json(second, self.fmt):
            return False
        try:
            row = _cells(second)
        except ValueError:
            return False
        return len(_cells(first)) == len(row) and any(_is_number(c) for c in row)

    def _parse(self, number: int, text: str) -> InputLine:
        try:
            return InputLine(number, parse_line(text, self.fmt, field=self.field, columns=self._indexes))
        except (ValueError, json.JSONDecodeError) as err:
            return InputLine(number, None, str(err))

    def read(self, lines: Iterable[str]) -> Iterator[InputLine]:
        """Yield every non-blank, non-comment line but the header, parsed or with the reason it is not."""
        numbered = ((n, line) for n, line in enumerate(lines, start=1)
                    if line.strip() and not line.lstrip().startswith("#"))
        first = next(numbered, None)
        if first is None:
            if self.want_header:
                self._no_header_for_names()
            return
        second = None
        # Only a first line that could be a header waits for the next: a record on a pipe
        # goes out before the line after it is written.
        if self.want_header is None and self.fmt != "jsonl" and self._could_be_header(first[1].strip()):
            second = next(numbered, None)
            is_header = self._looks_like_header(first[1].strip(), second[1].strip() if second else None)
        else:
            is_header = bool(self.want_header)
        if is_header:
            try:
                self.header = [c.strip() for c in _cells(first[1].strip())]
            except ValueError as err:
                raise InputError(f"line {first[0]}: the header is {err}") from None
            self.header_line = first[0]
        self._resolve_columns()
        if not is_header:
            yield self._parse(*first)
        if second is not None:
            yield self._parse(*second)
        for number, text in numbered:
            yield self._parse(number, text)

    def _no_header_for_names(self) -> None:
        if self.columns and any(not c.isdigit() for c in self.columns):
            raise InputError("the input is empty: no header to find --column in")


def read_records(lines: Iterable[str], fmt: str = "auto", **options) -> Iterator[InputLine]:
    """Yield every non-blank, non-comment line but a CSV header, parsed or with the reason it
    is not (options: those of :class:`RecordReader`)."""
    return RecordReader(fmt, **options).read(lines)
