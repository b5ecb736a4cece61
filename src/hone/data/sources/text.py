"""Text decoding for exports in whatever encoding a company's tools wrote: BOMs, UTF-16, cp1252.

`detect_encoding(path)` implements `--encoding auto`: a BOM decides (UTF-8 or UTF-16); else a UTF-16 file
without a BOM is recognised by its NUL bytes; else UTF-8 if the whole file decodes as UTF-8; else cp1252
(Windows' "ANSI", what Excel writes on western systems); else latin-1, which decodes any byte. The whole-file
checks stream in chunks, so a big file costs time, not memory. `decoded_lines(path, encoding)` then yields
`(line, text, error)` per physical line, so a record in a broken encoding costs only its own line.
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Iterator
from pathlib import Path

from hone.data.readers import DataError

AUTO = "auto"
# Tried in this order when a file has no BOM; latin-1 decodes every byte, so auto never fails.
AUTO_FALLBACKS = ("utf-8", "cp1252", "latin-1")
_CHUNK = 1 << 20
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def check_encoding(name: str) -> str:
    """`name` if Python knows the codec (or it is 'auto'); else a ValueError listing common ones."""
    if name == AUTO:
        return name
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown encoding {name!r}; use auto, utf-8, utf-8-sig, utf-16, cp1252, latin-1, "
                         "or any codec name Python knows") from None
    return name


def is_wide(encoding: str) -> bool:
    """UTF-16/32 cannot be split into lines on the byte b'\\n' (it is half of a character there)."""
    return codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))


def sniff_bytes(head: bytes) -> str | None:
    """The encoding a file's first bytes announce: a BOM, or UTF-16's tell-tale NULs; None if neither."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    sample = head[:4096]
    if len(sample) >= 4 and sample.count(0) >= len(sample) // 4:
        odd_nuls, even_nuls = sample[1::2].count(0), sample[0::2].count(0)
        if odd_nuls > 2 * even_nuls:
            return "utf-16-le"
        if even_nuls > 2 * odd_nuls:
            return "utf-16-be"
    return None


def detect_encoding(path: str | Path) -> str:
    """The encoding `--encoding auto` picks for a file (see the module docstring)."""
    p = Path(path)
    with p.open("rb") as f:
        sniffed = sniff_bytes(f.read(4096))
    if sniffed:
        return sniffed
    for name in AUTO_FALLBACKS:
        if _decodes_whole(p, name):
            return name
    return "latin-1"  # unreachable: latin-1 decodes anything; kept so the function always returns


def decode_bytes(data: bytes, encoding: str = AUTO) -> tuple[str, str]:
    """(text, encoding used) for a whole small file; raises UnicodeDecodeError for an explicit encoding."""
    if encoding != AUTO:
        return data.decode(encoding), encoding
    sniffed = sniff_bytes(data)
    if sniffed:
        return data.decode(sniffed, errors="strict"), sniffed
    for name in AUTO_FALLBACKS:
        try:
            return data.decode(name), name
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1"


def decoded_lines(path: str | Path, encoding: str) -> Iterator[tuple[int, str, str | None]]:
    """`(line, text with its line ending, error or None)` per physical line (split on '\\n' only).

    A line that does not decode is yielded with U+FFFD in place of the bad bytes and an `error` saying
    where they are, so the caller can reject that one record and carry on.
    """
    p = Path(path)
    if is_wide(encoding):
        yield from _wide_lines(p, encoding)
        return
    strip_bom = codecs.lookup(encoding).name == "utf-8-sig"
    decode_as = "utf-8" if strip_bom else encoding
    with p.open("rb") as f:
        offset = 0
        for lineno, data in enumerate(f, 1):
            start = len(codecs.BOM_UTF8) if strip_bom and lineno == 1 and data.startswith(codecs.BOM_UTF8) else 0
            try:
                text, error = data[start:].decode(decode_as), None
            except UnicodeDecodeError as e:
                text = data[start:].decode(decode_as, errors="replace")
                at = start + e.start
                error = (f"line is not valid {encoding}: byte 0x{data[at]:02x} at byte offset {offset + at} "
                         f"of the file; give the file's real encoding with --encoding")
            yield lineno, text, error
            offset += len(data)


def _wide_lines(p: Path, encoding: str) -> Iterator[tuple[int, str, str | None]]:
    name = codecs.lookup(encoding).name
    if name in ("utf-16", "utf-32"):
        # Python's utf-16/utf-32 refuse a file without a BOM outright; Windows writes little-endian.
        with p.open("rb") as f:
            head = f.read(4)
        boms = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) if name == "utf-16" else (codecs.BOM_UTF32_LE,
                                                                                   codecs.BOM_UTF32_BE)
        if not head.startswith(boms):
            encoding = name + "-le"
    # errors="replace" keeps going past a bad code unit; a line holding U+FFFD is then reported as bad.
    try:
        with p.open("rb") as raw, io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline="\n") as f:
            for lineno, text in enumerate(f, 1):
                if lineno == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                error = None
                if "\ufffd" in text:
                    error = f"line is not valid {encoding} (odd byte count or an unpaired surrogate)"
                yield lineno, text, error
    except UnicodeError as e:  # a codec-level refusal, not a bad byte: the file cannot be read this way
        raise DataError(f"{p}: cannot decode as {encoding}: {e}") from None


def _decodes_whole(p: Path, encoding: str) -> bool:
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with p.open("rb") as f:
            while chunk := f.read(_CHUNK):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    except OSError as e:
        raise DataError(f"{p}: cannot read: {e}") from None
    return True
