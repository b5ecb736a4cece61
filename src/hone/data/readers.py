"""Read training data files into plain rows: one `(line, row)` pair per record.

`read_rows(path)` understands JSON Lines (.jsonl, and .json holding JSON Lines or one JSON array), CSV
(.csv, header on the first line) and Parquet (.parquet). It yields `(line, dict)` for every record it can
read and `(line, Problem)` for one it cannot. `line` is the 1-based *physical* line where the record starts,
the number a user types into an editor (for Parquet: the 1-based row number), so every later error can say
exactly where to look.

A bad record never costs its neighbours: JSON Lines are decoded and parsed line by line, CSV records are
checked one by one. Problems with the file as a whole (missing, unsupported type, empty, no header) raise
`DataError`, whose message names the file.

This module only reads. Whether a row is a chat, a prompt/completion pair, ... is validate.py's business.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from hone.records import Problem

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Longest raw text kept on a Problem: enough to recognise the record in the rejects file, bounded in size.
RAW_LIMIT = 2000
_BOM = b"\xef\xbb\xbf"
_PARQUET_BATCH_ROWS = 1024
# csv's default cell limit (128 KiB) is smaller than a long document; raise it rather than fail on one.
_CSV_FIELD_LIMIT = 1 << 30


class DataError(ValueError):
    """The whole data file cannot be used (missing, unsupported, empty, no header); names the file."""


def read_rows(path: str | Path) -> Iterator[tuple[int, dict | Problem]]:
    """Yield `(line, row)` per record of a .jsonl/.json/.csv/.parquet file; see the module docstring.

    Raises DataError at once for a missing, unsupported or empty file, and while iterating for a file
    that turns out to hold no records (only blank lines, or a CSV header and nothing else).
    """
    p = Path(path)
    suffix = _check_file(p)
    if suffix == ".csv":
        return _csv_rows(p)
    if suffix == ".parquet":
        return _parquet_rows(p)
    if suffix == ".json":
        return _json_rows(p)
    return _jsonl_rows(p)


def json_type(value: Any) -> str:
    """The JSON name of a value's type ("string", "array", ...): the words users see in their files."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def clip_raw(text: str) -> str:
    """Bound the raw text stored on a Problem (a rejects file must not balloon on one huge line)."""
    return text if len(text) <= RAW_LIMIT else text[:RAW_LIMIT]


def _check_file(p: Path) -> str:
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if p.is_dir():
        raise DataError(f"{p}: is a directory; expected a data file ({', '.join(SUPPORTED_SUFFIXES)})")
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        found = repr(suffix) if suffix else "no extension"
        raise DataError(f"{p}: unsupported file type ({found}); supported: {', '.join(SUPPORTED_SUFFIXES)}")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    return suffix


# --- JSON Lines ------------------------------------------------------------------------------------------

def _decode_lines(f: BinaryIO) -> Iterator[tuple[int, str, str | None]]:
    """Yield `(line number, text, error)` per physical line, line ending included in `text`.

    Lines are split on b"\\n" only (as editors number them) and decoded one at a time, so one bad byte
    costs only its own line. For such a line `error` says where the byte is, and `text` holds U+FFFD
    in its place so the line can still be shown.
    """
    offset = 0
    for lineno, data in enumerate(f, 1):
        start = 0
        if lineno == 1 and data.startswith(_BOM):
            start = len(_BOM)
        try:
            text, error = data[start:].decode("utf-8"), None
        except UnicodeDecodeError as e:
            text = data[start:].decode("utf-8", errors="replace")
            at = start + e.start
            error = (f"line is not valid UTF-8: byte 0x{data[at]:02x} at byte offset {offset + at} of the file "
                     f"(byte {at} of this line); re-save the file as UTF-8")
        yield lineno, text, error
        offset += len(data)


def _jsonl_rows(p: Path) -> Iterator[tuple[int, dict | Problem]]:
    source, found = str(p), False
    with p.open("rb") as f:
        for lineno, text, error in _decode_lines(f):
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            found = True
            if error:
                yield lineno, Problem(source, lineno, "not_utf8", error, raw=clip_raw(text))
            else:
                yield lineno, _parse_json_line(text, lineno, source)
    if not found:
        raise DataError(f"{p}: no records (the file holds only blank lines)")


def _parse_json_line(text: str, lineno: int, source: str) -> dict | Problem:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if text.strip() in ("{", "[", "}", "]", "},"):
            hint = "; this looks like pretty-printed JSON, but JSON Lines needs one whole object per line"
        return Problem(source, lineno, "invalid_json", f"not valid JSON: {e.msg} (column {e.colno}){hint}",
                       raw=clip_raw(text))
    if not isinstance(value, dict):
        return Problem(source, lineno, "not_an_object",
                       f"expected one JSON object per line, found {json_type(value)}", raw=clip_raw(text))
    return value


def _json_rows(p: Path) -> Iterator[tuple[int, dict | Problem]]:
    """A .json file is either one JSON document (an array of records, or one record) or JSON Lines."""
    try:
        text = p.read_bytes().decode("utf-8-sig")
        whole = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        # JSON Lines (or broken): the line-by-line reader says precisely which lines are bad.
        yield from _jsonl_rows(p)
        return
    if isinstance(whole, list):
        if not whole:
            raise DataError(f"{p}: no records (the file holds an empty JSON array)")
        yield from _json_array_rows(text, str(p))
        return
    lineno = text.count("\n", 0, len(text) - len(text.lstrip())) + 1
    if isinstance(whole, dict):
        yield lineno, whole
    else:
        yield lineno, Problem(str(p), lineno, "not_an_object",
                              f"expected JSON objects, found {json_type(whole)}", raw=clip_raw(text.strip()))


def _json_array_rows(text: str, source: str) -> Iterator[tuple[int, dict | Problem]]:
    """Walk a JSON array element by element so each record gets the line its element starts on."""
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return
        value, end = decoder.raw_decode(text, pos)
        line += text.count("\n", counted, pos)
        counted = pos
        if isinstance(value, dict):
            yield line, value
        else:
            raw = clip_raw(json.dumps(value, ensure_ascii=False))
            yield line, Problem(source, line, "not_an_object",
                                f"expected an array of JSON objects, found {json_type(value)}", raw=raw)
        pos = end


# --- CSV -------------------------------------------------------------------------------------------------

class LineFeed:
    """Feeds decoded lines to csv.reader and remembers them, so each record can report the physical
    line it starts on, its raw text, and any non-UTF-8 line inside it (csv reads no further ahead
    than the record it is building, so "lines taken since the last record" is exactly that record)."""

    def __init__(self, lines: Iterator[tuple[int, str, str | None]]):
        self.lines = lines  # (line number, text, decode error) as _decode_lines yields them
        self.line = 0
        self._taken: list[str] = []
        self._errors: list[tuple[int, str]] = []

    def __iter__(self) -> LineFeed:
        return self

    def __next__(self) -> str:
        lineno, text, error = next(self.lines)
        self.line = lineno
        self._taken.append(text)
        if error:
            self._errors.append((lineno, error))
        return text

    def take(self) -> tuple[str, list[tuple[int, str]]]:
        raw, errors = "".join(self._taken).rstrip("\r\n"), self._errors
        self._taken, self._errors = [], []
        return raw, errors

    def records(self, reader) -> Iterator[tuple[int, list[str] | csv.Error, str, list[tuple[int, str]]]]:
        """`(first line, cells or the csv.Error, raw text, decode errors)` per non-blank record of `reader`
        (a csv.reader over this feed); blank lines and spreadsheet filler like ",,," are skipped."""
        while True:
            start = self.line + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raw, _ = self.take()
                yield start, e, raw, []
                continue
            raw, errors = self.take()
            if any(c.strip() for c in cells):
                yield start, cells, raw, errors


def _csv_rows(p: Path) -> Iterator[tuple[int, dict | Problem]]:
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    source, found = str(p), False
    with p.open("rb") as f:
        feed = LineFeed(_decode_lines(f))
        # strict: a malformed quote becomes an error on that record instead of silently merged text.
        reader = csv.reader(feed, strict=True)
        header = _csv_header(reader, feed, p)
        for start, cells, raw, errors in feed.records(reader):
            if isinstance(cells, csv.Error):
                found = True
                yield start, Problem(source, start, "invalid_csv", _csv_error_message(cells), raw=clip_raw(raw))
                continue
            found = True
            if errors:
                where, message = errors[0]
                if where != start:
                    message += f" (line {where}, inside the record that starts on line {start})"
                yield start, Problem(source, start, "not_utf8", message, raw=clip_raw(raw))
                continue
            yield start, _csv_record(header, cells, start, source, raw)
    if not found:
        raise DataError(f"{p}: no records (the CSV has a header row but no data rows)")


def _csv_header(reader: Any, feed: LineFeed, p: Path) -> list[str]:
    """The column names; blank lines before the header are skipped, trailing unnamed columns dropped."""
    cells: list[str] = []
    while not any(c.strip() for c in cells):
        try:
            cells = next(reader)
        except StopIteration:
            raise DataError(f"{p}: no header row (the file holds only blank lines)") from None
        except csv.Error as e:
            raise DataError(f"{p}:{feed.line}: cannot read the CSV header: {e}") from None
        _, errors = feed.take()
        if errors:
            raise DataError(f"{p}:{errors[0][0]}: header {errors[0][1]}")
    names = [c.strip() for c in cells]
    while names and not names[-1]:
        names.pop()
    line = feed.line
    example = "the first line must name the columns, e.g. text,label or prompt,completion"
    for i, name in enumerate(names):
        if not name:
            raise DataError(f"{p}:{line}: no CSV header: column {i + 1} of the first row has no name; {example}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{p}:{line}: no usable CSV header: column name(s) {', '.join(dupes)} repeated; {example}")
    return names


def _csv_error_message(e: csv.Error) -> str:
    text = str(e)
    if "end of data" in text:
        return "unclosed quote: the quoted field that starts in this record runs to the end of the file"
    return f"malformed CSV: {text}; a field containing quotes must be quoted, with inner quotes doubled (\"\")"


def _csv_record(header: list[str], cells: list[str], line: int, source: str, raw: str) -> dict | Problem:
    extra = [c for c in cells[len(header):] if c.strip()]
    if extra:
        return Problem(source, line, "invalid_csv",
                       f"record has {len(cells)} cells but the header names {len(header)} columns; "
                       "a field containing commas must be quoted", raw=clip_raw(raw))
    # Empty cells mean "absent": a CSV cannot tell a missing value from an empty one, and a file that mixes
    # shapes (prompt,completion,text,label) leaves the other shape's cells empty.
    row = {name: cell for name, cell in zip(header, cells) if cell != ""}
    return _parse_messages_column(row, line, source, raw)


def _parse_messages_column(row: dict, line: int, source: str, raw: str | None = None) -> dict | Problem:
    """Tables store chat `messages` as a JSON string; turn it into the list the validator expects."""
    value = row.get("messages")
    if not isinstance(value, str):
        return row
    try:
        row["messages"] = json.loads(value)
    except json.JSONDecodeError as e:
        return Problem(source, line, "invalid_json",
                       f"column 'messages' is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno} of the cell)",
                       raw=clip_raw(raw if raw is not None else _row_text(row)))
    return row


# --- Parquet ---------------------------------------------------------------------------------------------

def _parquet_rows(p: Path) -> Iterator[tuple[int, dict | Problem]]:
    import pyarrow as pa  # imported here: pyarrow is slow to import and only Parquet needs it
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{p}: not a readable Parquet file: {e}") from None
    if pf.metadata.num_rows == 0:
        raise DataError(f"{p}: no records (the Parquet file has 0 rows)")
    line = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for values in batch.to_pylist():
            line += 1
            # Nulls mean "absent", as empty CSV cells do: a table mixing shapes leaves other columns null.
            row = {k: v for k, v in values.items() if v is not None}
            yield line, _parse_messages_column(row, line, str(p))


def _row_text(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)
