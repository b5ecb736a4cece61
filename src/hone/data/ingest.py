"""`hone data ingest`: raw company exports -> hone records, each with provenance back to its file and line.

    hone data ingest support.mbox slack_export/ docs/ tickets.csv --out data/ingest.jsonl

Source kinds, detected from each path (or forced for all with `--kind`):

    records   .jsonl/.json/.csv/.parquet already in hone's shapes: passed through (readers.read_rows)
    tickets   a .csv whose header names none of hone's fields (text, messages, prompt, ...): a support-
              ticket export, mapped with `--column role=COLUMN` (sources/tickets.py)
    docs      a .txt/.md file or a folder of them (sources/docs.py)
    email     .eml or .mbox files, a folder of them, or any file that starts with an mbox "From " line
              (sources/mail.py)
    slack     a folder holding users.json / channels.json and channel folders (sources/slack.py)

Everything streams through `run_stage("ingest", ...)`: the readers yield records or Problems (an e-mail
without a body, a Slack join notice, a ticket row in a broken encoding), Problems go to the rejects file
with their code and place, and the report details give per-kind and per-source counts, the encodings
used and the attachments skipped.

    report = ingest([Path("support.mbox")], Path("out.jsonl"), IngestOptions())
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hone.data.readers import DataError
from hone.data.sources import SourceStats
from hone.data.sources.docs import DOC_SUFFIXES, doc_files
from hone.data.sources.mail import EMAIL_SUFFIXES, ThreadIndex
from hone.data.sources.slack import is_slack_export
from hone.data.sources.text import AUTO, check_encoding, sniff_bytes
from hone.data.sources.tickets import check_roles
from hone.data.stage import StageReport, read_records, run_stage
from hone.records import Problem

Kind = Literal["auto", "records", "docs", "email", "slack", "tickets"]
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# A CSV whose header names one of these holds hone records; one that names none is a tickets export.
RECORD_FIELDS = frozenset({"messages", "text", "prompt", "completion", "instruction", "output", "chosen"})


class IngestOptions(BaseModel):
    """How `hone data ingest` reads its sources (the `ingest:` section of a `hone data prepare` recipe)."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind = Field("auto", description="Source kind for every input: auto (detect from each path), records, "
                       "docs, email, slack or tickets.")
    columns: dict[str, str] = Field(default_factory=dict, description="Tickets CSV column mapping, role -> "
                                    "column name; roles: question, answer, label, customer, id, thread. "
                                    "Unmapped roles are guessed from common header names.")
    encoding: str = Field(AUTO, description="Text encoding of tickets CSVs and documents: auto (UTF-8, a BOM, "
                          "UTF-16, then cp1252, recorded in the report) or a codec name such as cp1252.")

    @field_validator("columns")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        return check_roles(value)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        return check_encoding(value)


def ingest(inputs: list[Path], out: Path, options: IngestOptions) -> StageReport:
    """Read every source into `out` (+ rejects and report); see the module docstring."""
    if not inputs:
        raise DataError("no sources given: name at least one file or folder to ingest")
    sources = [(Path(p), detect_kind(p, options.kind)) for p in inputs]
    stats, per_source = SourceStats(), []
    threads = ThreadIndex()  # shared, so a reply in one .eml joins the thread of an earlier file's message

    def stream() -> Iterator[dict | Problem]:
        for path, kind in sources:
            counts: Counter[str] = Counter()
            per_source.append({"path": str(path), "kind": kind, "counts": counts})
            for item in read_source(path, kind, options, stats, threads):
                counts["rejected" if isinstance(item, Problem) else "records"] += 1
                yield item

    config = {"options": options.model_dump(), "kinds": {str(p): k for p, k in sources}}
    return run_stage("ingest", stream(), out, lambda record: [record], config=config,
                     inputs=[p for p, _ in sources], details=lambda: ingest_details(per_source, stats))


def read_source(path: Path, kind: str, options: IngestOptions, stats: SourceStats,
                threads: ThreadIndex | None = None) -> Iterator[dict | Problem]:
    """The records (and Problems) of one source of a known kind."""
    if kind == "records":
        return read_records([path])
    if kind == "docs":
        from hone.data.sources.docs import read_docs
        return read_docs(path, options.encoding, stats)
    if kind == "email":
        from hone.data.sources.mail import read_email_source
        return read_email_source(path, stats, threads)
    if kind == "slack":
        from hone.data.sources.slack import read_slack
        return read_slack(path, stats)
    if kind == "tickets":
        from hone.data.sources.tickets import read_tickets
        return read_tickets(path, options.columns, options.encoding, stats)
    raise ValueError(f"unknown source kind {kind!r}")


def detect_kind(path: str | Path, forced: str = "auto") -> str:
    """The kind of source `path` is (see the module docstring); DataError when it cannot tell."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: not found")
    if forced != "auto":
        return forced
    if p.is_dir():
        return _folder_kind(p)
    suffix = p.suffix.lower()
    if suffix in EMAIL_SUFFIXES:
        return "email"
    if suffix in DOC_SUFFIXES:
        return "docs"
    if suffix == ".csv":
        return "records" if _csv_header_names(p) & RECORD_FIELDS else "tickets"
    if suffix in RECORD_SUFFIXES:
        return "records"
    with p.open("rb") as f:
        if f.read(5) == b"From ":
            return "email"
    raise DataError(f"{p}: cannot tell what kind of source this is (suffix {suffix or 'none'}); "
                    "give --kind records|docs|email|slack|tickets")


def ingest_details(per_source: list[dict], stats: SourceStats) -> dict:
    """Report details: counts per source and per kind, encodings used, attachments and other notes."""
    by_kind: dict[str, dict[str, int]] = {}
    for s in per_source:
        k = by_kind.setdefault(s["kind"], {"sources": 0, "records": 0, "rejected": 0})
        k["sources"] += 1
        k["records"] += s["counts"]["records"]
        k["rejected"] += s["counts"]["rejected"]
    sources = [{"path": s["path"], "kind": s["kind"], "records": s["counts"]["records"],
                "rejected": s["counts"]["rejected"]} for s in per_source]
    notes = dict(sorted(stats.counts.items()))
    return {"by_kind": by_kind, "sources": sources, "encodings": stats.encodings,
            "attachments_skipped": notes.pop("attachments_skipped", 0), "notes": notes}


def _folder_kind(p: Path) -> str:
    if is_slack_export(p):
        return "slack"
    has_mail = any(f.is_file() and f.suffix.lower() in EMAIL_SUFFIXES for f in p.rglob("*"))
    has_docs = bool(doc_files(p))
    if has_mail and has_docs:
        raise DataError(f"{p}: folder holds both e-mail (.eml/.mbox) and documents (.txt/.md); name its files or "
                        "subfolders separately, or give --kind email or --kind docs")
    if has_mail:
        return "email"
    if has_docs:
        return "docs"
    raise DataError(f"{p}: cannot tell what kind of folder this is: no Slack users.json/channels.json, no "
                    f".eml/.mbox files, no {'/'.join(DOC_SUFFIXES)} documents; give --kind, or name the files")


def _csv_header_names(p: Path) -> set[str]:
    """The lower-cased column names on a CSV's first line (any encoding auto would pick)."""
    import csv

    with p.open("rb") as f:
        head = f.read(65536)
    encoding = sniff_bytes(head)
    if encoding is None:
        encoding = "utf-8" if _decodes(head, "utf-8") else "cp1252"
    text = head.decode(encoding, errors="replace").lstrip("\ufeff")
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        cells = next(csv.reader([first], delimiter=max((",", ";", "\t"), key=first.count)), [])
    except csv.Error:
        return set()
    return {c.strip().lower() for c in cells}


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError as e:
        return e.start > len(data) - 4  # a multi-byte character cut at the end of the sample is fine
    return True
