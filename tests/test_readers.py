"""read_rows: physical line numbers, per-record problems, and file-level DataErrors for each format."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hone.data.readers import RAW_LIMIT, SUPPORTED_SUFFIXES, DataError, read_rows
from hone.records import Problem


def write(tmp_path, name, data: bytes | str):
    p = tmp_path / name
    p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return p


def problems(rows):
    return [(line, r.code) for line, r in rows if isinstance(r, Problem)]


def goods(rows):
    return [(line, r) for line, r in rows if not isinstance(r, Problem)]


# --- JSON Lines ------------------------------------------------------------------------------------------

def test_jsonl_rows_have_physical_line_numbers_and_blank_lines_are_skipped(tmp_path):
    p = write(tmp_path, "d.jsonl", '{"a": 1}\n\n   \n{"a": 2}\r\n{"a": 3}')
    assert list(read_rows(p)) == [(1, {"a": 1}), (4, {"a": 2}), (5, {"a": 3})]


def test_jsonl_non_utf8_line_between_good_lines_keeps_both_neighbours(tmp_path):
    p = write(tmp_path, "d.jsonl", b'{"a": 1}\n{"a": "caf\xe9"}\n{"a": 3}\n')
    rows = list(read_rows(p))
    assert goods(rows) == [(1, {"a": 1}), (3, {"a": 3})]
    assert problems(rows) == [(2, "not_utf8")]
    problem = rows[1][1]
    assert problem.source == str(p)
    # 0xe9 follows the 10 bytes {"a": "caf of line 2, which follows the 9 bytes of line 1
    assert "byte offset 19 of the file" in problem.message and "byte 10 of this line" in problem.message
    assert "0xe9" in problem.message
    assert problem.raw == '{"a": "caf\ufffd"}'


def test_jsonl_invalid_json_and_not_an_object(tmp_path):
    p = write(tmp_path, "d.jsonl", '{"a": 1}\n{"a": \n[1, 2]\n"text"\n{\n')
    rows = list(read_rows(p))
    assert problems(rows) == [(2, "invalid_json"), (3, "not_an_object"), (4, "not_an_object"), (5, "invalid_json")]
    assert "Expecting value" in rows[1][1].message and rows[1][1].raw == '{"a": '
    assert "found array" in rows[2][1].message and "found string" in rows[3][1].message
    assert "pretty-printed" in rows[4][1].message


def test_jsonl_raw_is_truncated(tmp_path):
    p = write(tmp_path, "d.jsonl", "{" + "x" * 5000 + "\n")
    [(line, problem)] = list(read_rows(p))
    assert problem.code == "invalid_json" and len(problem.raw) == RAW_LIMIT


def test_jsonl_bom_is_ignored(tmp_path):
    p = write(tmp_path, "d.jsonl", b'\xef\xbb\xbf{"a": 1}\n{"a": 2}\n')
    assert list(read_rows(p)) == [(1, {"a": 1}), (2, {"a": 2})]


def test_json_file_with_json_lines(tmp_path):
    p = write(tmp_path, "d.json", '{"a": 1}\n{"a": 2}\n')
    assert list(read_rows(p)) == [(1, {"a": 1}), (2, {"a": 2})]


def test_json_array_records_get_the_line_they_start_on(tmp_path):
    text = '[\n  {"a": 1},\n  {\n    "a": 2\n  },\n  3\n]\n'
    rows = list(read_rows(write(tmp_path, "d.json", text)))
    assert goods(rows) == [(2, {"a": 1}), (3, {"a": 2})]
    assert problems(rows) == [(6, "not_an_object")]


# --- CSV -------------------------------------------------------------------------------------------------

def test_csv_multiline_quoted_field_then_bad_record_has_its_start_line(tmp_path):
    text = ('text,label\n'
            '"first line\nsecond line\nthird",billing\n'        # lines 2-4
            'plain,refund\n'                                     # line 5
            'has, an unquoted comma,refund\n'                    # line 6: 3 cells
            '"quoted ""x""",billing\n')                          # line 7
    rows = list(read_rows(write(tmp_path, "d.csv", text)))
    assert goods(rows) == [(2, {"text": "first line\nsecond line\nthird", "label": "billing"}),
                           (5, {"text": "plain", "label": "refund"}),
                           (7, {"text": 'quoted "x"', "label": "billing"})]
    assert problems(rows) == [(6, "invalid_csv")]
    assert rows[2][1].raw == "has, an unquoted comma,refund"


def test_csv_empty_cells_are_absent_and_blank_rows_skipped(tmp_path):
    text = "prompt,completion,text,label,id\nhi,hello,,,\n\n,,,,\n,,a,b,7\n"
    rows = list(read_rows(write(tmp_path, "d.csv", text)))
    assert rows == [(2, {"prompt": "hi", "completion": "hello"}), (5, {"text": "a", "label": "b", "id": "7"})]


def test_csv_messages_column_is_parsed_and_bad_json_is_a_problem(tmp_path):
    good = json.dumps([{"role": "user", "content": "a, b"}, {"role": "assistant", "content": "c"}])
    cell = '"' + good.replace('"', '""') + '"'
    text = f"messages,id\n{cell},1\n\"[{{oops\",2\n"
    rows = list(read_rows(write(tmp_path, "d.csv", text)))
    assert rows[0] == (2, {"messages": json.loads(good), "id": "1"})
    assert problems(rows) == [(3, "invalid_json")]
    assert "column 'messages'" in rows[1][1].message


def test_csv_bom_and_crlf(tmp_path):
    p = write(tmp_path, "d.csv", b'\xef\xbb\xbftext,label\r\n"a\r\nb",x\r\nc,y\r\n')
    assert list(read_rows(p)) == [(2, {"text": "a\r\nb", "label": "x"}), (4, {"text": "c", "label": "y"})]


def test_csv_non_utf8_record_is_one_problem_and_neighbours_survive(tmp_path):
    p = write(tmp_path, "d.csv", b'text,label\nok,a\n"multi\nbad \xff here",b\nfine,c\n')
    rows = list(read_rows(p))
    assert goods(rows) == [(2, {"text": "ok", "label": "a"}), (5, {"text": "fine", "label": "c"})]
    assert problems(rows) == [(3, "not_utf8")]
    assert "line 4" in rows[1][1].message and "byte offset" in rows[1][1].message


def test_csv_unclosed_quote_is_reported_at_the_record_start(tmp_path):
    rows = list(read_rows(write(tmp_path, "d.csv", 'text,label\nok,a\n"never closed,b\nmore,c\n')))
    assert goods(rows) == [(2, {"text": "ok", "label": "a"})]
    assert problems(rows) == [(3, "invalid_csv")]
    assert "unclosed quote" in rows[1][1].message


def test_csv_header_only_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"d\.csv.*no records"):
        list(read_rows(write(tmp_path, "d.csv", "text,label\n\n")))


def test_csv_without_a_usable_header_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"d\.csv:1: no CSV header: column 2"):
        list(read_rows(write(tmp_path, "d.csv", "hello,,world\n")))
    with pytest.raises(DataError, match=r"repeated"):
        list(read_rows(write(tmp_path, "e.csv", "text,text\na,b\n")))


# --- Parquet ---------------------------------------------------------------------------------------------

def test_parquet_round_trip_gives_plain_python(tmp_path):
    messages = [{"role": "user", "content": "q", "weight": None},
                {"role": "assistant", "content": "a", "weight": 1.0}]
    table = pa.table({"messages": [messages, None, None],
                      "text": [None, "t", None],
                      "label": [None, 3, None],
                      "prompt": [None, None, "p"]})
    p = tmp_path / "d.parquet"
    pq.write_table(table, p)
    rows = list(read_rows(p))
    assert rows == [(1, {"messages": messages}), (2, {"text": "t", "label": 3}), (3, {"prompt": "p"})]
    assert type(rows[0][1]["messages"]) is list and type(rows[0][1]["messages"][0]) is dict


def test_parquet_messages_as_json_string(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"messages": ['[{"role": "user", "content": "x"}]', "[bad"]}), p)
    rows = list(read_rows(p))
    assert rows[0] == (1, {"messages": [{"role": "user", "content": "x"}]})
    assert problems(rows) == [(2, "invalid_json")]


def test_parquet_errors(tmp_path):
    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match="0 rows"):
        list(read_rows(empty))
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        list(read_rows(write(tmp_path, "bad.parquet", "not parquet at all")))


# --- file-level errors -----------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_rows(tmp_path / "nope.jsonl")


def test_unsupported_extension_lists_supported_ones(tmp_path):
    with pytest.raises(DataError) as e:
        read_rows(write(tmp_path, "d.txt", "x"))
    assert "d.txt" in str(e.value) and all(s in str(e.value) for s in SUPPORTED_SUFFIXES)


def test_empty_and_blank_files(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl: file is empty"):
        read_rows(write(tmp_path, "d.jsonl", ""))
    with pytest.raises(DataError, match=r"b\.jsonl: no records"):
        list(read_rows(write(tmp_path, "b.jsonl", "\n  \n\n")))
    with pytest.raises(DataError, match=r"c\.csv: no header"):
        list(read_rows(write(tmp_path, "c.csv", "\n\n")))


def test_directory_is_a_data_error(tmp_path):
    d = tmp_path / "data.jsonl"
    d.mkdir()
    with pytest.raises(DataError, match="is a directory"):
        read_rows(d)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)
