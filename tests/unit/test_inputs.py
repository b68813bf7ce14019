"""Reading producer input: CSV and JSON lines, with line-numbered errors and nothing else escaping."""

from __future__ import annotations

import pytest

from sealedsum.common.errors import ConfigError, InputError
from sealedsum.producers.inputs import InputLine, RecordReader, parse_line, parse_number, read_records


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


@pytest.mark.parametrize("text", ["[" * 100_000, "[1" + "0" * 400 + "]", '{"value": 1' + "0" * 400 + "}",
                                  "1" * 200_000, '"' + "1" * 200_000, "1,\x00"],
                         ids=["deep-nesting", "huge-int-list", "huge-int-value", "huge-cell", "huge-quoted-cell",
                              "nul"])
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
    out = list(read_records(["1", "x", "[", "2"]))
    assert [(r.number, r.values) for r in out] == [(1, [1.0]), (2, None), (3, None), (4, [2.0])]


def test_a_bad_first_line_before_a_good_one_is_a_header_unless_told_otherwise():
    assert [(r.number, r.values) for r in read_records(["x", "1"])] == [(2, [1.0])]
    assert [(r.number, r.values) for r in read_records(["x", "1"], header=False)] == [(1, None), (2, [1.0])]


def test_read_records_with_explicit_format():
    out = list(read_records(["1,2", "[1, 2]"], fmt="jsonl"))
    assert out[0].values is None and out[0].error
    assert out[1].values == [1.0, 2.0]


def test_read_records_on_nothing():
    assert list(read_records([])) == []
    assert list(read_records(["", "#", "  "])) == []


@pytest.mark.parametrize("text", ["1_000", "1__0", "_1", "1_000.5", "1e1_0", "١٢", "0x10", "1.5.2", "--1", "1e", "e3"])
def test_numbers_python_would_take_but_a_data_file_does_not_hold(text):
    with pytest.raises(ValueError, match="is not a number"):
        parse_number(text)
    with pytest.raises(ValueError):
        parse_line(f"1,{text}")


@pytest.mark.parametrize("text,expected", [("+1.5", 1.5), ("1.", 1.0), (".5", 0.5), ("-2E-3", -0.002), (" 7 ", 7.0)])
def test_plain_numbers(text, expected):
    assert parse_number(text) == expected


def test_a_csv_header_is_detected_and_skipped():
    lines = ["# exported\n", "order_id,amount\n", "7,12.5\n", "8,3\n"]
    reader = RecordReader()
    out = list(reader.read(lines))
    assert [(r.number, r.values) for r in out] == [(3, [7.0, 12.5]), (4, [8.0, 3.0])]
    assert reader.header == ["order_id", "amount"] and reader.header_line == 2


def test_the_first_line_of_numbers_is_no_header():
    reader = RecordReader()
    assert [r.values for r in reader.read(["1,2", "3,4"])] == [[1.0, 2.0], [3.0, 4.0]]
    assert reader.header is None


def test_a_first_line_with_a_number_in_it_is_a_bad_line_not_a_header():
    out = list(read_records(["amount,5", "1,2"]))
    assert out[0].number == 1 and out[0].values is None and "'amount' is not a number" in out[0].error


def test_explicit_header():
    reader = RecordReader(header=True)
    assert [(r.number, r.values) for r in reader.read(["a", "b", "1"])] == [(2, None), (3, [1.0])]
    assert reader.header == ["a"]


@pytest.mark.parametrize("column", ["amount", "3"])
def test_column_by_name_or_1_based_index(column):
    lines = ["order_id,customer,amount", '7,"Smith, J.",12.5', "8,Li,x", "9,Ng", "10,Ng,1_000", "11,Ro,4"]
    out = list(read_records(lines, columns=[column]))
    assert [(r.number, r.values) for r in out] == [(2, [12.5]), (3, None), (4, None), (5, None), (6, [4.0])]
    assert "'x' is not a number" in out[1].error and "column 3" in out[2].error and "'1_000'" in out[3].error


def test_several_columns_make_a_multi_value_record_in_their_order():
    out = list(read_records(["a,b,c", "1,2,3"], columns=["c", "a"]))
    assert out == [InputLine(2, [3.0, 1.0])]


def test_a_column_index_without_header():
    assert [r.values for r in read_records(["1,2", "3,4"], columns=["2"])] == [[2.0], [4.0]]


def test_a_column_name_needs_a_header_holding_it():
    with pytest.raises(InputError, match="no such column in the header .*line 1: order_id, total"):
        list(read_records(["order_id,total", "1,2"], columns=["amount"]))
    with pytest.raises(InputError, match="empty"):
        list(read_records([], columns=["amount"]))
    assert issubclass(InputError, ConfigError)  # exit 2


def test_jsonl_field():
    lines = ['{"order_id": 7, "amount": 12.5}', '{"order_id": 8}', '{"amount": "3"}', "5",
             '{"amount": [1, 2]}', '{"amount": 1e999}']
    out = list(read_records(lines, field="amount"))
    assert [(r.number, r.values) for r in out] == [(1, [12.5]), (2, None), (3, None), (4, None), (5, [1.0, 2.0]),
                                                   (6, None)]
    assert "no field 'amount'" in out[1].error and "order_id" in out[1].error
    assert "not a JSON object" in out[3].error and "finite" in out[5].error


def test_objects_without_field_say_how_to_pick_one():
    (line,) = read_records(['{"order_id": 7, "amount": 12.5}'])
    assert line.values is None and "--field" in line.error


@pytest.mark.parametrize("options", [dict(columns=["a"], field="a"), dict(fmt="jsonl", columns=["1"]),
                                     dict(fmt="jsonl", header=True), dict(fmt="csv", field="a")])
def test_options_that_do_not_go_together(options):
    with pytest.raises(InputError):
        RecordReader(**options)


def test_csv_header_and_jsonl_objects_read_as_plain_numbers():
    plain = [r.values for r in read_records(["1.5", "2", "3.25"])]
    csv = [r.values for r in read_records(["id,amount", "1,1.5", "2,2", "3,3.25"], columns=["amount"])]
    jsonl = [r.values for r in read_records([f'{{"id": {i}, "amount": {v}}}' for i, v in enumerate((1.5, 2, 3.25))],
                                            field="amount")]
    assert plain == csv == jsonl


def test_a_first_line_of_numbers_goes_out_before_the_next_is_read():
    def lines():
        yield "1.5\n"
        raise AssertionError("read ahead")

    assert next(read_records(lines())) == InputLine(1, [1.5])


def test_a_huge_first_line_is_a_bad_line_or_a_bad_header():
    assert [r.number for r in read_records(["a" * 200_000, "1"])] == [1, 2]
    assert [r.values for r in read_records(["a", "1" * 200_000])][0] is None
    with pytest.raises(InputError, match="line 1: the header is not a CSV row"):
        list(read_records(["a" * 200_000, "1"], header=True))


@pytest.mark.parametrize("options", [{}, {"columns": ["2"]}, {"field": "a"}, {"fmt": "csv"}, {"fmt": "jsonl"}])
def test_any_text_is_records_or_bad_lines_never_an_exception(options):
    from hypothesis import given, settings, strategies as st

    alphabet = st.sampled_from(list('0123456789.,-+eE_ "[]{}:#anNifx\\\t') + ["\x00", "é", "١"])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.text(alphabet, max_size=30), max_size=6))
    def check(lines):
        out = list(read_records(lines, **options))
        assert all((r.values is None) == (r.error is not None) for r in out)
        assert all(all(type(v) is float and v == v and abs(v) != float("inf") for v in r.values)
                   for r in out if r.values is not None)

    check()
