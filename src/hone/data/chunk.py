"""Split documents into overlapping, size-bounded text chunks (for continued pretraining and for synth).

A chunk is built from whole paragraphs (blank-line separated); a paragraph longer than the budget is cut
at sentence ends, and a sentence longer than the budget at word boundaries, so a chunk only breaks
mid-sentence when one sentence alone is over budget. Size is measured in characters, or in tokens of a
tokenizer when one is given (`size=` any `str -> int`). Consecutive chunks share up to `overlap` of the
previous chunk's trailing pieces, so a fact cut by a boundary is whole in at least one chunk.

Every chunk carries `start`/`end` character offsets into the original text (`text[start:end]` is the
chunk), which is what `convert --to chunks` and `synth` record as provenance.

    for c in chunk_text(doc, max_size=1500, overlap=200): print(c.start, c.end, c.text[:40])

`read_documents` lets convert/synth take .md/.txt files (or folders of them) directly, besides record files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hone.data.readers import DataError
from hone.data.stage import read_records
from hone.records import Problem

DOCUMENT_SUFFIXES = (".md", ".markdown", ".txt")
_PARAGRAPH = re.compile(r"\S(?:.*?\S)?(?=\n[ \t]*\n|\s*\Z)", re.DOTALL)
# A sentence ends at . ! ? (optionally closed by a quote or bracket) followed by whitespace.
_SENTENCE = re.compile(r"\S.*?(?:[.!?][\"')\]]*(?=\s)|\Z)", re.DOTALL)
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    start: int  # character offsets into the source text: source[start:end] == text
    end: int


def chunk_text(text: str, *, max_size: int = 1500, overlap: int = 0,
               size: Callable[[str], int] = len) -> list[Chunk]:
    """Chunks of `text`, each at most `max_size` by `size` (unless one word alone is bigger)."""
    if max_size < 1:
        raise ValueError("max_size must be at least 1")
    if not 0 <= overlap < max_size:
        raise ValueError("overlap must be at least 0 and smaller than max_size")
    pieces = list(_pieces(text, max_size, size))
    chunks: list[Chunk] = []
    i = 0
    while i < len(pieces):
        j = i + 1  # always take one piece, even an oversized single word, so the loop advances
        while j < len(pieces) and size(text[pieces[i][0]:pieces[j][1]]) <= max_size:
            j += 1
        start, end = pieces[i][0], pieces[j - 1][1]
        chunks.append(Chunk(len(chunks), text[start:end], start, end))
        if j >= len(pieces):
            break
        i = _overlap_start(text, pieces, i, j, overlap, size)
    return chunks


def _overlap_start(text: str, pieces: list[tuple[int, int]], i: int, j: int, overlap: int,
                   size: Callable[[str], int]) -> int:
    """First piece of the next chunk: step back from `j` over trailing pieces that fit in `overlap`."""
    k = j
    while k - 1 > i and size(text[pieces[k - 1][0]:pieces[j - 1][1]]) <= overlap:
        k -= 1
    return k


def _pieces(text: str, max_size: int, size: Callable[[str], int]) -> Iterator[tuple[int, int]]:
    """(start, end) spans of paragraphs, cut into sentences, then word runs, until each fits."""
    for p in _PARAGRAPH.finditer(text):
        if size(p.group()) <= max_size:
            yield p.span()
            continue
        for s in _SENTENCE.finditer(text, p.start(), p.end()):
            if size(s.group()) <= max_size:
                yield s.span()
            else:
                yield from _word_runs(text, s.start(), s.end(), max_size, size)


def _word_runs(text: str, start: int, end: int, max_size: int,
               size: Callable[[str], int]) -> Iterator[tuple[int, int]]:
    words = [m.span() for m in _WORD.finditer(text, start, end)]
    i = 0
    while i < len(words):
        j = i + 1
        while j < len(words) and size(text[words[i][0]:words[j][1]]) <= max_size:
            j += 1
        yield words[i][0], words[j - 1][1]
        i = j


def token_size(tokenizer) -> Callable[[str], int]:
    """A `size` function counting tokens of a Hugging Face tokenizer (no special tokens)."""
    return lambda s: len(tokenizer.encode(s, add_special_tokens=False))


# --- documents ---------------------------------------------------------------------------------------------

def read_documents(paths: list[Path]) -> Iterator[dict | Problem]:
    """Records from record files (.jsonl/.csv/.parquet), plus one `{"text"}` record per .md/.txt file
    (folders are searched for .md/.txt files, in sorted order)."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in DOCUMENT_SUFFIXES)
            if not files:
                raise DataError(f"{path}: folder holds no {'/'.join(DOCUMENT_SUFFIXES)} files")
            for f in files:
                yield _document(f)
        elif path.suffix.lower() in DOCUMENT_SUFFIXES:
            if not path.is_file():
                raise DataError(f"{path}: file not found")
            yield _document(path)
        else:
            yield from read_records([path])


def _document(path: Path) -> dict | Problem:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return Problem(str(path), 1, "not_utf8", f"document is not valid UTF-8 (byte offset {e.start}); "
                       "re-save it as UTF-8")
    return {"text": text, "meta": {"title": path.stem}, "provenance": {"source": str(path), "line": 1}}


def load_size(unit: str, tokenizer: str) -> Callable[[str], int]:
    """`len` for unit "chars"; for "tokens", a token counter for `tokenizer` (the embedded model's name or a
    model directory; only the tokenizer files are read)."""
    if unit == "chars":
        return len
    from transformers import AutoTokenizer

    from hone.config import EMBEDDED_MODEL
    from hone.models.load import ModelError, embedded_model_dir

    path = embedded_model_dir() if tokenizer == EMBEDDED_MODEL else Path(tokenizer).expanduser()
    if not Path(path).is_dir():
        raise ModelError(f"tokenizer '{tokenizer}': expected '{EMBEDDED_MODEL}' or a model directory")
    return token_size(AutoTokenizer.from_pretrained(path))
