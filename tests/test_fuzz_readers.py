"""Fuzz the readers with hypothesis: malformed JSON, wrong types, huge lines, binary junk, odd encodings.

The promise under test: a reader never crashes (a file-level problem is a DataError, nothing else), every
bad line comes back as a Problem carrying its line, and nothing is silently dropped: records + problems ==
the records the file holds (its non-blank lines, its data rows, its messages).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hone.data.readers import RAW_LIMIT, DataError, read_rows
from hone.data.sources.mail import read_eml, read_mbox
from hone.data.sources.slack import read_day
from hone.data.sources.tickets import read_tickets
from hone.records import Problem

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
                           max_leaves=8)
MALFORMED = st.sampled_from(["{", "}", "{\"a\": }", "[1,", "nul", "{'a': 1}", "{\"a\": 1}}", "\"open", "{\"a\" 1}",
                             "[", "},", "\x00{}", "{\"text\": \"x\"} trailing"])


def _tmp(name: str, data: bytes) -> Path:
    path = Path(tempfile.mkdtemp(prefix="hone-fuzz-")) / name
    path.write_bytes(data)
    return path


def _read_all(path: Path, reader=read_rows) -> list | None:
    """Everything a reader yields, or None when it raised DataError (the only exception allowed)."""
    try:
        return list(reader(path))
    except DataError as e:
        assert str(path) in str(e)  # a file-level error names the file
        return None


# --- readers.read_rows -----------------------------------------------------------------------------------

JSONL_LINE = st.one_of(
    st.dictionaries(TEXT, JSON_VALUES, max_size=4).map(lambda d: json.dumps(d).encode()),
    st.dictionaries(TEXT, JSON_VALUES, max_size=4).map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8")),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),  # valid JSON of the wrong type
    MALFORMED.map(str.encode),
    TEXT.map(lambda t: t.encode("utf-8")),
    st.binary(max_size=60),  # binary junk, maybe not UTF-8
    st.sampled_from([b"", b"   ", b"\r", b"\t \r"]),
    st.integers(50_000, 150_000).map(lambda n: b'{"text": "' + b"x" * n + b'"}'),  # a huge line
    st.integers(50_000, 150_000).map(lambda n: b'{"text": "' + b"y" * n),  # a huge broken line
).map(lambda b: b.replace(b"\n", b" "))


def _jsonl_oracle(lines: list[bytes]) -> dict[int, object]:
    """line -> the dict read_rows must yield there, or the Problem code; blank lines are absent."""
    expected: dict[int, object] = {}
    for n, data in enumerate(lines, 1):
        if n == 1 and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if data.decode("utf-8", errors="replace").strip():
                expected[n] = "not_utf8"
            continue
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            expected[n] = "invalid_json"
            continue
        expected[n] = value if isinstance(value, dict) else "not_an_object"
    return expected


@FUZZ
@given(st.lists(JSONL_LINE, max_size=12), st.booleans())
def test_jsonl_every_line_is_a_record_or_a_problem(lines, final_newline):
    data = b"\n".join(lines) + (b"\n" if final_newline else b"")
    expected = _jsonl_oracle(data.split(b"\n"))
    if not data:
        return  # an empty file is a DataError before reading; covered by test_readers
    got = _read_all(_tmp("x.jsonl", data))
    if got is None:
        assert not expected  # DataError only for a file without records
        return
    assert [line for line, _ in got] == sorted(expected)  # count invariant, in file order
    for line, item in got:
        want = expected[line]
        if isinstance(item, Problem):
            assert (item.code, item.line) == (want, line)
            assert item.raw is None or len(item.raw) <= RAW_LIMIT
        else:
            assert json.dumps(item, sort_keys=True) == json.dumps(want, sort_keys=True)


@FUZZ
@given(st.sampled_from([".jsonl", ".json", ".csv"]),
       st.one_of(st.binary(min_size=1, max_size=400),
                 JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                 st.lists(JSON_VALUES, min_size=1, max_size=5).map(lambda v: json.dumps(v, indent=2).encode())))
def test_random_bytes_never_crash(suffix, data):
    got = _read_all(_tmp("x" + suffix, data))
    for line, item in got or []:
        assert isinstance(line, int) and line >= 1
        assert isinstance(item, (dict, Problem))
        if isinstance(item, Problem):
            assert item.line == line and item.code


CELL = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)


@FUZZ
@given(st.lists(st.lists(CELL, min_size=3, max_size=3), min_size=1, max_size=8),
       st.lists(st.tuples(st.integers(0, 8), st.sampled_from(['"unclosed, x', 'a,b,c,d,e', '"a"b,c,d',
                                                               '\x00BIN\x00,1,2'])), max_size=2))
def test_csv_rows_and_injected_bad_rows(rows, bad):
    buf = io.StringIO()
    # "\r\n" rows: csv.writer then quotes every cell holding "\r" (with "\n" it would not, making "x\r" ambiguous)
    csv.writer(buf, lineterminator="\r\n").writerows([["a", "b", "c"]] + rows)
    lines = [line + "\n" for line in buf.getvalue().split("\n")[:-1]]
    starts = _record_starts(lines)
    for at, junk in sorted(bad, reverse=True):  # bad rows between whole records, after the header
        lines.insert(starts[at] if at < len(starts) else len(lines), junk + "\n")
    # CELL never holds NUL, so the marker stands only for the injected non-UTF-8 bytes.
    data = "".join(lines).encode("utf-8").replace(b"\x00BIN\x00", b"\xff\xfe")
    got = _read_all(_tmp("x.csv", data))
    good = [{k: v for k, v in zip("abc", r) if v != ""} for r in rows if any(c.strip() for c in r)]
    if got is None:
        assert not good and not bad
        return
    records = [item for _, item in got if not isinstance(item, Problem)]
    problems = [item for _, item in got if isinstance(item, Problem)]
    # An unclosed quote swallows what follows it: then only "no crash, reported" holds.
    if not any(j.startswith('"unclosed') for _, j in bad):
        assert records == good
        assert len(problems) == len(bad)
    assert all(p.code in ("invalid_csv", "not_utf8") and p.line >= 2 for p in problems)


def _record_starts(lines: list[str]) -> list[int]:
    """Index in `lines` where each data record starts (records may span lines inside quotes)."""
    starts, i, text = [], 1, ""
    while i < len(lines):
        if not text:
            starts.append(i)
        text += lines[i]
        if text.count('"') % 2 == 0:
            text = ""
        i += 1
    return starts


# --- e-mail ----------------------------------------------------------------------------------------------

BODY = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")) | st.just("\n"), max_size=80)
HEADER_JUNK = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30)
MESSAGE = st.one_of(
    st.tuples(st.just("plain"), HEADER_JUNK, BODY),
    st.tuples(st.just("charset"), st.sampled_from(["iso-8859-1", "x-bogus", "utf-16", "", "cp1252", "\x00"]), BODY),
    st.tuples(st.just("html"), HEADER_JUNK, BODY),
    st.tuples(st.just("multipart"), st.sampled_from(["b1", "", "\"unterminated"]), BODY),
    st.tuples(st.just("junk"), st.binary(max_size=200), st.just("")),
)


def _message_bytes(kind: str, extra, body: str) -> bytes:
    if kind == "junk":
        return extra
    head = f"Subject: {extra if kind in ('plain', 'html') else 'x'}\nMessage-ID: <m{len(body)}@fuzz>\n"
    if kind == "plain":
        return (head + "Content-Type: text/plain; charset=utf-8\n\n" + body).encode("utf-8")
    if kind == "charset":
        return (head + f"Content-Type: text/plain; charset={extra}\n\n").encode("utf-8", "replace") \
            + body.encode("utf-8", "replace")
    if kind == "html":
        return (head + "Content-Type: text/html\n\n<p>" + body + "</p>").encode("utf-8")
    return (head + f"Content-Type: multipart/mixed; boundary={extra}\n\n--b1\nContent-Type: text/plain\n\n"
            + body + "\n--b1--\n").encode("utf-8")


def _mboxrd_escape(data: bytes) -> bytes:
    out = []
    for line in data.split(b"\n"):
        out.append(b">" + line if line.lstrip(b">").startswith(b"From ") else line)
    return b"\n".join(out)


@FUZZ
@given(st.lists(MESSAGE, min_size=1, max_size=6))
def test_mbox_one_item_per_message_at_its_line(messages):
    chunks, starts, line = [], [], 1
    for kind, extra, body in messages:
        data = _mboxrd_escape(_message_bytes(kind, extra, body).replace(b"\r", b""))
        if not data.endswith(b"\n"):
            data += b"\n"
        starts.append(line)
        chunk = b"From fuzz@example Mon Jan  1 00:00:00 2024\n" + data + b"\n"
        chunks.append(chunk)
        line += chunk.count(b"\n")
    items = list(read_mbox(_tmp("x.mbox", b"".join(chunks))))
    assert len(items) == len(messages)
    for item, start, (kind, _, body) in zip(items, starts, messages):
        if isinstance(item, Problem):
            assert item.line == start and item.code in ("no_text_body", "empty_body", "unreadable_message")
            assert kind != "plain" or not body.strip()
        else:
            assert item["provenance"]["line"] == start
            assert isinstance(item["text"], str) and item["text"].strip()
            if kind == "plain":
                assert item["text"] == body + "\n" or item["text"] == body  # exact, ending as written


@FUZZ
@given(st.one_of(st.binary(max_size=500), MESSAGE.map(lambda m: _message_bytes(*m))))
def test_eml_and_mbox_random_bytes_never_crash(data):
    items = list(read_eml(_tmp("x.eml", data)))
    assert len(items) == 1 and (isinstance(items[0], Problem) or items[0]["text"].strip())
    got = _read_all(_tmp("x.mbox", data), read_mbox)
    for item in got or []:
        line = item.line if isinstance(item, Problem) else item["provenance"]["line"]
        assert data.split(b"\n")[line - 1].startswith(b"From ")


# --- Slack -----------------------------------------------------------------------------------------------

SLACK_MESSAGE = st.one_of(
    st.fixed_dictionaries({"type": st.just("message"), "user": st.sampled_from(["U1", "U2", "U9"]),
                           "text": TEXT, "ts": st.sampled_from(["1.000100", "2.5", ""])},
                          optional={"subtype": st.sampled_from(["channel_join", "bot_message", "channel_topic",
                                                                "me_message"]),
                                    "thread_ts": st.sampled_from(["1.000100", None, 7])}),
    st.dictionaries(st.sampled_from(["text", "ts", "user", "subtype", "user_profile"]), JSON_VALUES, max_size=5),
    JSON_VALUES,
)


@FUZZ
@given(st.one_of(st.lists(SLACK_MESSAGE, max_size=8).map(lambda v: json.dumps(v, indent=2).encode()),
                 st.binary(max_size=200), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_slack_day_file_one_item_per_message(data):
    items = list(read_day(_tmp("2025-01-01.json", data), "general", {"U1": "Ana"}))
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        value = None
    if not isinstance(value, list):
        assert len(items) == 1 and items[0].code == "invalid_json"
        return
    assert len(items) == len(value)  # count invariant
    for index, (item, message) in enumerate(zip(items, value), 1):
        if isinstance(item, Problem):
            assert item.line == index
        else:
            assert item["provenance"]["line"] == index
            assert item["provenance"]["ref"] == f"general/{message['ts']}"


# --- tickets ---------------------------------------------------------------------------------------------

# Accented letters whose cp1252 bytes can never form UTF-8 (no byte in 0x80-0xBF), so auto-detection is exact.
LATIN = st.text(alphabet=st.sampled_from(list("abcxyz ,;\"'\n-?!0123456789éèàöüßñçÉÖÜ")), max_size=25)
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252"])


@FUZZ
@given(st.lists(st.tuples(LATIN, LATIN, LATIN), min_size=1, max_size=8), ENCODINGS)
def test_tickets_any_encoding_every_row_accounted_for(rows, encoding):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows([["question", "answer", "label"]] + [list(r) for r in rows])
    path = _tmp("t.csv", buf.getvalue().encode(encoding))
    expected = [r for r in rows if any(c.strip() for c in r)]
    try:
        items = list(read_tickets(path))
    except DataError:
        assert not expected
        return
    assert len(items) == len(expected)
    for item, (question, answer, label) in zip(items, expected):
        if not question.strip():
            assert isinstance(item, Problem) and item.code == "no_question"
        elif answer.strip():
            assert item["messages"] == [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}]
        else:
            assert item["text"] == question
        if not isinstance(item, Problem):
            assert item.get("label") == (label.strip() or None)


@FUZZ
@given(st.binary(min_size=1, max_size=300), st.sampled_from(["auto", "utf-8", "cp1252", "utf-16"]))
def test_tickets_random_bytes_never_crash(data, encoding):
    path = _tmp("t.csv", b"question,answer\n" + data)
    try:
        items = list(read_tickets(path, encoding=encoding))
    except DataError as e:
        assert str(path) in str(e)
        return
    for item in items:
        line = item.line if isinstance(item, Problem) else item["provenance"]["line"]
        assert line >= 2
