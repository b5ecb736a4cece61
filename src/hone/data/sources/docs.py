"""A folder of documents (.txt, .md) -> one `{"text", "meta": {"title", "path"}}` record per file.

Files are read recursively in sorted order (so two runs give the same output), decoded with the ingest
encoding (auto: UTF-8, a BOM, UTF-16, then cp1252), and kept exactly as written: trimming and Unicode
repair are `hone data clean`'s job. A file that is binary, undecodable or empty is rejected with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from hone.data.readers import DataError, clip_raw
from hone.data.sources import SourceStats
from hone.data.sources.text import AUTO, decode_bytes
from hone.records import Problem

DOC_SUFFIXES = (".txt", ".md", ".markdown", ".text")
_ATX_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
_SETEXT_HEADING = re.compile(r"^(\S[^\n]*)\n {0,3}(=+|-+)[ \t]*$", re.MULTILINE)
# Text files hold few control characters; a share above this means the "document" is binary.
_MAX_CONTROL_SHARE = 0.1


def doc_files(folder: Path) -> list[Path]:
    """Every document under `folder`, recursively, in sorted order (hidden files and folders skipped)."""
    found = []
    for f in folder.rglob("*"):
        rel = f.relative_to(folder)
        if f.is_file() and f.suffix.lower() in DOC_SUFFIXES and not any(s.startswith(".") for s in rel.parts):
            found.append(f)
    return sorted(found)


def read_docs(path: str | Path, encoding: str = AUTO, stats: SourceStats | None = None,
              ) -> Iterator[dict | Problem]:
    """Records for a folder of documents, or for a single .txt/.md file."""
    root = Path(path)
    stats = stats if stats is not None else SourceStats()
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        files, base = doc_files(root), root
        if not files:
            raise DataError(f"{root}: no documents found (looked for {', '.join(DOC_SUFFIXES)} files, recursively)")
        stats.counts["files_ignored"] += sum(1 for f in root.rglob("*") if f.is_file()) - len(files)
    else:
        raise DataError(f"{root}: not found")
    for f in files:
        yield doc_record(f.read_bytes(), f, f.relative_to(base).as_posix(), encoding, stats)


def doc_record(data: bytes, file: Path, rel: str, encoding: str = AUTO,
               stats: SourceStats | None = None) -> dict | Problem:
    """One document's record, or a Problem saying why the file cannot be one."""
    source = str(file)
    try:
        text, used = decode_bytes(data, encoding)
    except UnicodeDecodeError as e:
        return Problem(source, 1, "undecodable", f"document is not valid {e.encoding}: byte "
                       f"0x{data[e.start]:02x} at offset {e.start}; give its encoding with --encoding",
                       raw=clip_raw(data[:200].decode("latin-1")))
    text = text.removeprefix("\ufeff")
    if looks_binary(text):
        return Problem(source, 1, "binary_file", "file holds binary data (NUL or control bytes), not text",
                       raw=clip_raw(text[:200]))
    if not text.strip():
        return Problem(source, 1, "empty_document", "document is empty (or only whitespace)")
    if stats is not None and used not in ("utf-8", "utf-8-sig"):
        stats.encodings[source] = used
    return {"text": text, "meta": {"title": doc_title(text, file), "path": rel},
            "provenance": {"source": source, "line": 1}}


def doc_title(text: str, file: Path) -> str:
    """A Markdown file's first heading (# Title, or Title over ===/---), else the file name without suffix."""
    if file.suffix.lower() not in (".md", ".markdown"):
        return file.stem
    first = None
    for pattern in (_ATX_HEADING, _SETEXT_HEADING):
        m = pattern.search(text)
        if m and (first is None or m.start() < first.start()):
            first = m
    if first and first.group(1).strip():
        return first.group(1).strip()
    return file.stem


def looks_binary(text: str) -> bool:
    if "\x00" in text:
        return True
    sample = text[:8192]
    controls = sum(1 for c in sample if ord(c) < 32 and c not in "\t\n\r\f\v")
    return controls > _MAX_CONTROL_SHARE * max(len(sample), 1)
