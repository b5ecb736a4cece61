"""Run one `hone data` stage: stream records in, write records out, the rejects, and a report with lineage.

Every `hone data` command (ingest, clean, dedup, redact, convert, synth, split) is a *stage*: a function
applied record by record to a stream, so memory stays flat whatever the input size. A stage writes

    OUT                      the records it kept or produced (JSON Lines, hone's record format)
    OUT.rejects.jsonl        every record it refused, with a stable code and a reason (next to OUT, with
                             the suffix replaced: clean.jsonl -> clean.rejects.jsonl)
    OUT.report.json          counts with their arithmetic, stage details, and lineage (see below)

**Records.** A record is a JSON object in one of hone's shapes (`messages`; `prompt`+`completion`;
`instruction`+`output`; `text`+`label`; `text` alone, a document; `prompt`+`chosen`+`rejected`, a
preference pair), optionally with `meta` (free-form fields such as a ticket's customer or an e-mail's
subject) and always with `provenance`: `{"source": FILE, "line": N, "ref": ID?}` saying where it came from.
Stages keep `provenance` when they change a record, so a training example can be traced to its e-mail.

**Counts.** `in == passed + rejected`, always: each input record either passes (yielding one record, or
several for stages that expand, like synth) or is rejected with a reason. The report shows the sum.

**Lineage.** The report holds a SHA-256 of each input's bytes, of the stage config, and of the output, plus
the reports of the inputs' own stages when they exist, so the chain back to the raw export is one file.

    report = run_stage("clean", read_records(paths), out, clean_record, config={...}, inputs=paths)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hone.data.readers import DataError, clip_raw, read_rows
from hone.records import Problem

# Fields that hold text a person wrote, per shape; labels and ids are not text to clean or redact.
TEXT_FIELDS = ("system", "prompt", "completion", "instruction", "input", "output", "text", "chosen", "rejected")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Reject:
    """A stage's refusal of one record: a stable `code` (tests and tools match on it) and a reason."""

    code: str
    message: str


@dataclass
class StageReport:
    stage: str
    output: str
    records_in: int = 0
    passed: int = 0
    records_out: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def arithmetic(self) -> str:
        """'in 1000 = passed 950 + rejected 50 (duplicate 40, empty 10)', plus the expansion if any."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items(), key=lambda kv: -kv[1]))
        text = f"in {self.records_in} = passed {self.passed} + rejected {self.rejected_total}"
        if reasons:
            text += f" ({reasons})"
        if self.records_out != self.passed:
            text += f"; {self.passed} passed records produced {self.records_out} records out"
        return text

    def to_json(self) -> dict:
        return {"stage": self.stage, "output": self.output, "seconds": round(self.seconds, 3),
                "counts": {"in": self.records_in, "passed": self.passed, "rejected": self.rejected_total,
                           "out": self.records_out, "rejected_by_code": dict(sorted(self.rejected.items())),
                           "arithmetic": self.arithmetic()},
                "details": self.details, "lineage": self.lineage}


# A stage's per-record work: one record in; the records it becomes (usually one), or a Reject.
Transform = Callable[[dict], "list[dict] | Reject"]


def run_stage(stage: str, records: Iterable[dict | Problem], out: str | Path, transform: Transform, *,
              config: dict, inputs: Iterable[str | Path], details: Callable[[], dict] | None = None,
              ) -> StageReport:
    """Stream `records` through `transform` into `out`; write rejects and report; return the report.

    `records` yields records (with `provenance`) or `Problem`s for input that could not be read at all
    (those count as input and are rejected under the Problem's code). `details` is called once at the
    end for stage-specific report content (clusters, PII counts, ...). The output, rejects and report
    appear atomically: a crash leaves the previous files (or none), never a half-written one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = StageReport(stage=stage, output=str(out))
    rejected: Counter[str] = Counter()
    started = time.perf_counter()
    with AtomicWriter(out) as kept, AtomicWriter(rejects_path(out)) as refused:
        for item in records:
            report.records_in += 1
            if isinstance(item, Problem):
                rejected[item.code] += 1
                refused.write(reject_line(item.code, item.message, source=item.source, line=item.line,
                                          raw=item.raw))
                continue
            result = transform(item)
            if isinstance(result, Reject):
                rejected[result.code] += 1
                refused.write(reject_line(result.code, result.message, record=item))
                continue
            report.passed += 1
            for produced in result:
                report.records_out += 1
                kept.write(json.dumps(produced, ensure_ascii=False) + "\n")
    report.rejected = dict(rejected)
    report.seconds = time.perf_counter() - started
    report.details = details() if details else {}
    report.lineage = lineage(inputs, config, out)
    write_json_atomic(report_path(out), report.to_json())
    return report


def read_records(paths: Iterable[str | Path]) -> Iterator[dict | Problem]:
    """Records from hone JSONL/CSV/Parquet files, each given `provenance` if it has none (file, line)."""
    for path in paths:
        for line, row in read_rows(path):
            if isinstance(row, Problem):
                yield row
                continue
            if not isinstance(row.get("provenance"), dict):
                row["provenance"] = {"source": str(path), "line": line}
            yield row


def where(record: dict) -> str:
    """'file:line' (or 'file#ref') of a record, for messages and reports."""
    p = record.get("provenance") or {}
    text = f"{p.get('source', '?')}:{p.get('line', '?')}"
    return f"{text}#{p['ref']}" if p.get("ref") else text


def record_texts(record: dict) -> list[str]:
    """Every piece of human-written text in a record, in a stable order (for hashing, PII scans, ...)."""
    texts = [record[k] for k in TEXT_FIELDS if isinstance(record.get(k), str)]
    for m in record.get("messages") or []:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            texts.append(m["content"])
    return texts


def map_texts(record: dict, fn: Callable[[str], str]) -> dict:
    """A copy of `record` with `fn` applied to every human-written text field; everything else kept."""
    new = dict(record)
    for k in TEXT_FIELDS:
        if isinstance(new.get(k), str):
            new[k] = fn(new[k])
    if isinstance(new.get("messages"), list):
        new["messages"] = [({**m, "content": fn(m["content"])} if isinstance(m, dict)
                            and isinstance(m.get("content"), str) else m) for m in new["messages"]]
    return new


def reject_line(code: str, message: str, *, record: dict | None = None, source: str | None = None,
                line: int | None = None, raw: str | None = None) -> str:
    """One line of a rejects file: where, code, reason, and the record (or raw text) so nothing is lost."""
    entry: dict[str, Any] = {"code": code, "message": message}
    if record is not None:
        prov = record.get("provenance") or {}
        entry["source"], entry["line"] = prov.get("source"), prov.get("line")
        if prov.get("ref"):
            entry["ref"] = prov["ref"]
        entry["record"] = record
    else:
        entry["source"], entry["line"] = source, line
        if raw is not None:
            entry["raw"] = clip_raw(raw)
    return json.dumps(entry, ensure_ascii=False) + "\n"


# --- files and lineage -----------------------------------------------------------------------------------

def rejects_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".rejects.jsonl")


def report_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".report.json")


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative names and bytes, in sorted order)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def lineage(inputs: Iterable[str | Path], config: dict, out: str | Path) -> dict:
    """What produced `out`: each input's hash (and its own report's lineage), the config and its hash."""
    from hone import __version__

    entries = []
    for path in inputs:
        p = Path(path)
        if not p.exists():
            raise DataError(f"{p}: input not found")
        entry: dict[str, Any] = {"path": str(p), "sha256": content_hash(p)}
        parent = report_path(p)
        if p.is_file() and parent.is_file():
            try:
                entry["produced_by"] = json.loads(parent.read_text())["lineage"]
            except (json.JSONDecodeError, KeyError):
                entry["produced_by"] = {"unreadable_report": str(parent)}
        entries.append(entry)
    return {"hone_version": __version__, "inputs": entries, "config": config,
            "config_sha256": config_hash(config), "output_sha256": content_hash(out)}


def write_json_atomic(path: str | Path, value: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class AtomicWriter:
    """A text file written under a temporary name and renamed into place only when the block succeeds."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")

    def __enter__(self):
        self.f = self.tmp.open("w", encoding="utf-8")
        return self.f

    def __exit__(self, exc_type, exc, tb):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False
