"""A CSV of support tickets -> hone records, with a column mapping for whatever the helpdesk exported.

Roles (`--column role=COLUMN`, or guessed from common header names when not given):
question (required), answer, label, customer, id, thread. Each data row becomes

    {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
     "label"?: label}                      when the row has an answer
    {"text": question, "label": label}     when it has a label but no answer
    {"text": question}                     otherwise

with `meta` holding customer, id, thread and every other non-empty column (under its own name), and
`provenance` `{"source", "line": where the row starts, "ref": the ticket id}`. Cell text is kept as is.

Encodings: `auto` (see sources/text.py) handles UTF-8 with or without a BOM, UTF-16 and cp1252; the one used
is recorded in the report. The delimiter (comma, semicolon or tab) is taken from the header line. A row
that does not decode, has a broken quote or too many cells, or has an empty question is rejected; a mapped
column missing from the header is a DataError that lists the columns the file has.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from hone.data.readers import DataError, LineFeed, clip_raw
from hone.data.sources import SourceStats
from hone.data.sources.text import AUTO, decoded_lines, detect_encoding
from hone.records import Problem

ROLES = ("question", "answer", "label", "customer", "id", "thread")
# Header names each role is guessed from when not mapped (compared lower-case, spaces/dashes as "_").
GUESSES = {
    "question": ("question", "body", "description", "message", "text", "request", "query", "issue", "customer_message"),
    "answer": ("answer", "response", "reply", "resolution", "solution", "agent_response", "agent_reply"),
    "label": ("label", "category", "tag", "queue", "topic", "intent", "type"),
    "customer": ("customer", "customer_name", "requester", "client", "customer_email", "requester_email"),
    "id": ("id", "ticket_id", "ticket", "ticket_number", "case_id", "case_number"),
    "thread": ("thread", "thread_id", "conversation_id", "conversation"),
}
_DELIMITERS = (",", ";", "\t")
_CSV_FIELD_LIMIT = 1 << 30


def check_roles(columns: dict[str, str]) -> dict[str, str]:
    """The mapping if every role is known; else ValueError naming the bad role and the valid ones."""
    for role, name in columns.items():
        if role not in ROLES:
            raise ValueError(f"unknown ticket column role {role!r}; roles: {', '.join(ROLES)}")
        if not name.strip():
            raise ValueError(f"ticket column role {role!r} is mapped to an empty column name")
    return columns


def resolve_columns(header: list[str], columns: dict[str, str], source: str) -> dict[str, str]:
    """Role -> column name in `header`: the given mapping (checked) plus guesses for unmapped roles."""
    found = ", ".join(header)
    resolved: dict[str, str] = {}
    for role, name in columns.items():
        match = name if name in header else next((h for h in header if h.casefold() == name.casefold()), None)
        if match is None:
            raise DataError(f"{source}: column {name!r} (mapped to {role}) is not in the file; columns found: {found}")
        resolved[role] = match
    taken = set(resolved.values())
    for role in ROLES:
        if role in resolved:
            continue
        by_key = {_key(h): h for h in header if h not in taken}
        guess = next((by_key[g] for g in GUESSES[role] if g in by_key), None)
        if guess is not None:
            resolved[role] = guess
            taken.add(guess)
    if "question" not in resolved:
        raise DataError(f"{source}: no question column (none given, none recognised); columns found: {found}; "
                        "map one with --column question=COLUMN")
    return resolved


def ticket_record(row: dict[str, str], columns: dict[str, str], source: str, line: int) -> dict | Problem:
    """One row's record (messages / text+label / text, see the module docstring), or a Problem."""
    cell = {role: row.get(col, "") for role, col in columns.items()}
    ticket_id = cell.get("id", "").strip()
    where = f"ticket {ticket_id}" if ticket_id else "ticket"
    question, answer, label = cell["question"], cell.get("answer", ""), cell.get("label", "").strip()
    if not question.strip():
        return Problem(source, line, "no_question", f"{where}: the question column {columns['question']!r} is empty",
                       raw=clip_raw(repr(row)))
    if answer.strip():
        record: dict = {"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]}
    else:
        record = {"text": question}
    if label:
        record["label"] = label
    meta = {role: cell[role] for role in ("customer", "id", "thread") if cell.get(role, "").strip()}
    mapped = set(columns.values())
    meta.update({k: v for k, v in row.items() if k not in mapped and v.strip()})
    if meta:
        record["meta"] = meta
    record["provenance"] = {"source": source, "line": line, **({"ref": ticket_id} if ticket_id else {})}
    return record


def read_tickets(path: str | Path, columns: dict[str, str] | None = None, encoding: str = AUTO,
                 stats: SourceStats | None = None) -> Iterator[dict | Problem]:
    """Records for every data row of a tickets CSV; DataError for an unusable file or header."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found" if not p.exists() else f"{p}: is a folder, expected a tickets CSV")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    used = detect_encoding(p) if encoding == AUTO else encoding
    if stats is not None:
        stats.encodings[str(p)] = used
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    feed = LineFeed(decoded_lines(p, used))
    header, delimiter = _header(feed, p, used)
    resolved = resolve_columns(header, check_roles(dict(columns or {})), str(p))
    return _rows(feed, csv.reader(feed, delimiter=delimiter, strict=True), header, resolved, str(p))


def _rows(feed: LineFeed, reader, header: list[str], columns: dict[str, str], source: str,
          ) -> Iterator[dict | Problem]:
    found = False
    for start, cells, raw, errors in feed.records(reader):
        if isinstance(cells, csv.Error):
            found = True
            yield Problem(source, start, "invalid_csv", f"malformed CSV: {cells}", raw=clip_raw(raw))
            continue
        found = True
        if errors:
            yield Problem(source, start, "undecodable", errors[0][1], raw=clip_raw(raw))
        elif len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
            yield Problem(source, start, "invalid_csv", f"row has {len(cells)} cells but the header names "
                          f"{len(header)} columns; a cell containing the delimiter must be quoted", raw=clip_raw(raw))
        else:
            yield ticket_record(dict(zip(header, cells)), columns, source, start)
    if not found:
        raise DataError(f"{source}: no tickets (the CSV has a header row but no data rows)")


def _header(feed: LineFeed, p: Path, encoding: str) -> tuple[list[str], str]:
    """The column names and the delimiter, from the first non-empty line."""
    for lineno, text, error in feed.lines:
        if not text.strip():
            continue
        if error:
            raise DataError(f"{p}:{lineno}: header {error}")
        delimiter = max(_DELIMITERS, key=text.count)
        delimiter = delimiter if text.count(delimiter) else ","
        feed.line = lineno
        try:
            cells = next(csv.reader([text], delimiter=delimiter, strict=True))
        except csv.Error as e:
            raise DataError(f"{p}:{lineno}: cannot read the CSV header: {e}") from None
        names = [c.strip() for c in cells]
        while names and not names[-1]:
            names.pop()
        if not all(names) or len(set(names)) != len(names):
            raise DataError(f"{p}:{lineno}: the header must name every column once; found {names} "
                            f"(decoded as {encoding})")
        return names, delimiter
    raise DataError(f"{p}: no header row (the file holds only blank lines)")


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")

