"""Reading producer input: CSV and JSON lines, with line-numbered errors and nothing else escaping."""

from __future__ import annotations

import pytest

from sealedsum.producers.inputs import InputLine, parse_line, read_records


@pytest.mark.parametrize("text,expected", [
    ("1.5", [1.5]),
    ("1.5,2", [1.5, 2.0]),
    (" 1.5 , -2e3 ,0 \n", [1.5, -2000.0, 0.0]),
    ("-0", [-0.0]),
    ("[1.5, 2]", [1.5, 2.0]),
    ("[3]", [3.0]),
    ('{"values": [1, 2.5]}', [1.0, 2.5]),
    ('{"value": -4}', [-4.0]),
    ('{"values": 7}', [7.0]),
    ("  [1, 2]  ", [1.0, 2.0]),
])
def test_parse_line_auto(text, expected):
    out = parse_line(text)
    assert out == expected
    assert all(type(v) is float for v in out)


def test_json_number_line():
    assert parse_line("1.5", "jsonl") == [1.5]
    assert parse_line("2", "jsonl") == [2.0]


def test_explicit_csv_format_refuses_json():
    with pytest.raises(ValueError):
        parse_line("[1, 2]", "csv")


def test_explicit_jsonl_format_refuses_csv():
    with pytest.raises(ValueError):
        parse_line("1,2", "jsonl")


@pytest.mark.parametrize("text", [
    "nan", "NaN", "inf", "-inf", "Infinity", "1,nan", "1e999",
    "[NaN]", "[Infinity]", "[1, -Infinity]", '{"value": NaN}', "[1e999]",
])
def test_non_finite_values_are_refused(text):
    with pytest.raises(ValueError, match="not a finite number|finite"):
        parse_line(text)


@pytest.mark.parametrize("text", [
    "abc", "1,,2", "1;2", "", ",",
    "[]", '{"values": []}', "[true]", '["1"]', "[[1]]", "[null]", "{}",
    '{"values": [1], "value": 2}', '{"vals": [1]}', '{"value": [1, 2]}',
    "[1, 2", '{"values": [1}', "true",
])
def test_malformed_lines_raise_value_error(text):
    with pytest.raises(ValueError):
        parse_line(text)


@pytest.mark.parametrize("text", ["[" * 100_000, "[1" + "0" * 400 + "]", '{"value": 1' + "0" * 400 + "}"],
                         ids=["deep-nesting", "huge-int-list", "huge-int-value"])
def test_hostile_json_is_a_value_error(text):
    """Deeply nested JSON and integers beyond float range are bad lines, not crashes."""
    with pytest.raises(ValueError):
        parse_line(text)


def test_read_records_numbers_lines_and_skips_blanks_and_comments():
    lines = [
        "# header comment\n",
        "1.5\n",
        "\n",
        "   \n",
        "2,3\n",
        "  # indented comment\n",
        "oops\n",
        "[4, 5]\n",
        "nan\n",
        '{"value": 6}\n',
        '{"nope": 1}\n',
        "[" * 5000 + "\n",
    ]
    out = list(read_records(lines))
    assert [r.number for r in out] == [2, 5, 7, 8, 9, 10, 11, 12]
    assert out[0] == InputLine(2, [1.5])
    assert out[1] == InputLine(5, [2.0, 3.0])
    assert out[2].number == 7 and out[2].values is None and out[2].error
    assert out[3] == InputLine(8, [4.0, 5.0])
    assert out[4].values is None and "finite" in out[4].error
    assert out[5] == InputLine(10, [6.0])
    assert out[6].values is None and "value" in out[6].error
    assert out[7].values is None and out[7].error
    assert all((r.values is None) == (r.error is not None) for r in out)


def test_read_records_keeps_going_after_errors():
    out = list(read_records(["x", "1", "[", "2"]))
    assert [(r.number, r.values) for r in out] == [(1, None), (2, [1.0]), (3, None), (4, [2.0])]


def test_read_records_with_explicit_format():
    out = list(read_records(["1,2", "[1, 2]"], fmt="jsonl"))
    assert out[0].values is None and out[0].error
    assert out[1].values == [1.0, 2.0]


def test_read_records_on_nothing():
    assert list(read_records([])) == []
    assert list(read_records(["", "#", "  "])) == []
