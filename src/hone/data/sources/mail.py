"""E-mail -> one record per message: .eml files (one, or a folder of them) and mbox files.

    {"text": body, "meta": {"subject", "from", "to", "date", "message_id", "in_reply_to", "references",
                            "thread", "attachments"?}, "provenance": {"source", "line", "ref": Message-ID}}

The body is the text/plain part when there is one, else the HTML part turned into text (BeautifulSoup).
It is kept exactly as written, quotes and signatures included: stripping them is `hone data clean`'s job,
and doing it here would lose what clean needs to see. Parts are decoded with their declared charset; an
unknown charset name or bytes that do not fit it fall back to UTF-8, then cp1252 (counted in the report).
Attachments are not ingested; they are counted, and named in `meta.attachments`.

`line` is the line of the mbox where the message's "From " separator is (1 for an .eml file), so
`sed -n LINE,+40p FILE` shows the message. A message without a text body is rejected (`no_text_body`,
`empty_body`); a message the `email` package cannot make sense of is rejected (`unreadable_message`).

Threads: `meta.thread` is the Message-ID of the thread's first message, taken from References (its first
id) or In-Reply-To, following ids already seen in this run; a message with neither joins an earlier
message with the same normalised subject ("Re: Fwd: [team] Refund" -> "refund"), else starts a thread.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from email import policy
from email.message import Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path

from hone.data.readers import DataError, clip_raw
from hone.data.sources import SourceStats
from hone.records import Problem

EMAIL_SUFFIXES = (".eml", ".mbox")
# The MIME structure is walked with compat32 (plain strings: policy.default re-parses a header on every
# access, which made ingest 3x slower); display headers are then decoded with policy.default (see _header).
_PARSER = BytesParser(policy=policy.compat32)
_ESCAPED_FROM = re.compile(rb"^>+From ")
_MSG_ID = re.compile(r"<[^<>\s]+>")
_SUBJECT_PREFIX = re.compile(r"^\s*(?:(?:re|fwd?|aw|wg|sv|vs|tr|antw)\s*(?:\[\d+\])?\s*:|\[[^\]]*\])\s*", re.IGNORECASE)
_FALLBACK_CHARSETS = ("utf-8", "cp1252", "latin-1")
_BLOCK_TAGS = ("p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "ul", "ol", "hr",
               "section", "article", "header", "footer", "dl")
_LINE_TAGS = ("li", "tr", "dd", "dt")  # one per line, without a blank line between them


class ThreadIndex:
    """Assigns thread ids across the messages of one ingest run (see the module docstring)."""

    def __init__(self) -> None:
        self._by_id: dict[str, str] = {}
        self._by_subject: dict[str, str] = {}

    def thread_for(self, message_id: str | None, in_reply_to: str | None, references: list[str],
                   subject: str, fallback: str) -> str:
        refs = references + ([in_reply_to] if in_reply_to and in_reply_to not in references else [])
        thread = next((self._by_id[r] for r in refs if r in self._by_id), None)
        if thread is None and refs:
            thread = refs[0]
        norm = normalise_subject(subject)
        if thread is None and norm:
            thread = self._by_subject.get(norm)
        if thread is None:
            thread = message_id or fallback
        if message_id:
            self._by_id.setdefault(message_id, thread)
        if norm:
            self._by_subject.setdefault(norm, thread)
        return thread


def normalise_subject(subject: str) -> str:
    """The subject without reply/forward prefixes and list tags, case-folded, whitespace collapsed."""
    s = subject or ""
    while True:
        stripped = _SUBJECT_PREFIX.sub("", s, count=1)
        if stripped == s:
            break
        s = stripped
    return " ".join(s.split()).casefold()


# --- sources ---------------------------------------------------------------------------------------------

def read_email_source(path: str | Path, stats: SourceStats | None = None,
                      threads: ThreadIndex | None = None) -> Iterator[dict | Problem]:
    """Records from an .eml file, an mbox file, or a folder of them (recursive, sorted)."""
    p = Path(path)
    stats = stats if stats is not None else SourceStats()
    threads = threads if threads is not None else ThreadIndex()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in EMAIL_SUFFIXES)
        if not files:
            raise DataError(f"{p}: no e-mail found (looked for .eml and .mbox files, recursively)")
        stats.counts["files_ignored"] += sum(1 for f in p.rglob("*") if f.is_file()) - len(files)
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{p}: not found")
    for f in files:
        if f.suffix.lower() == ".eml":
            yield from read_eml(f, stats, threads)
        else:
            yield from read_mbox(f, stats, threads)


def read_eml(path: str | Path, stats: SourceStats | None = None,
             threads: ThreadIndex | None = None) -> Iterator[dict | Problem]:
    """The one message of an .eml file (line 1)."""
    p = Path(path)
    data = p.read_bytes()
    if not data.strip():
        yield Problem(str(p), 1, "empty_message", "the .eml file is empty")
        return
    yield message_record(data, str(p), 1, threads if threads is not None else ThreadIndex(), stats)


def read_mbox(path: str | Path, stats: SourceStats | None = None,
              threads: ThreadIndex | None = None) -> Iterator[dict | Problem]:
    """One record (or Problem) per message of an mbox file, in file order."""
    threads = threads if threads is not None else ThreadIndex()
    for line, data in split_mbox(path):
        yield message_record(data, str(path), line, threads, stats)


def split_mbox(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """`(line of the "From " separator, message bytes)` per message, streaming.

    A separator is a line starting with "From " at the top of the file or after an empty line (RFC 4155);
    ">From " lines are unescaped one level (mboxrd). Raises DataError if the file is not an mbox.
    """
    p = Path(path)
    start, buf, prev_empty = 0, [], True
    with p.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith(b"From ") and prev_empty:
                if start:
                    yield start, _message_bytes(buf)
                start, buf = lineno, []
            elif not start:
                if line.strip():
                    raise DataError(f"{p}:{lineno}: not an mbox file: expected a 'From ' separator line "
                                    f"before the first message, found {line[:60]!r}")
            else:
                buf.append(line[1:] if _ESCAPED_FROM.match(line) else line)
            prev_empty = line in (b"\n", b"\r\n")
    if not start:
        raise DataError(f"{p}: no messages (the mbox file is empty)")
    yield start, _message_bytes(buf)


def _message_bytes(lines: list[bytes]) -> bytes:
    # The empty line before the next separator belongs to the mbox format, not to the message.
    if lines and lines[-1] in (b"\n", b"\r\n"):
        lines = lines[:-1]
    return b"".join(lines)


# --- one message -----------------------------------------------------------------------------------------

def message_record(data: bytes, source: str, line: int, threads: ThreadIndex,
                   stats: SourceStats | None = None) -> dict | Problem:
    """The record for one raw RFC 822 message, or a Problem naming the message and what is wrong."""
    stats = stats if stats is not None else SourceStats()
    raw = clip_raw(data.decode("utf-8", errors="replace"))
    try:
        msg = _PARSER.parsebytes(data)
        meta = message_meta(msg)
    except Exception as e:  # noqa: BLE001 - the stdlib email package has known crashes on malformed input
        return Problem(source, line, "unreadable_message", f"cannot parse the message: {type(e).__name__}: {e}",
                       raw=raw)
    mid = meta["message_id"]
    where = f"message {mid}" if mid else "message (no Message-ID)"
    try:
        parts = MessageParts()
        parts.collect(msg)
        body, kind = parts.body_text(stats)
    except Exception as e:  # noqa: BLE001 - as above: a malformed MIME tree must not stop the stage
        return Problem(source, line, "unreadable_message", f"{where}: cannot read the body: "
                       f"{type(e).__name__}: {e}", raw=raw)
    attachments = parts.attachments
    if body is None:
        return Problem(source, line, "no_text_body", f"{where}: has no text/plain or text/html part"
                       + (f" (only attachments: {', '.join(attachments)})" if attachments else ""), raw=raw)
    if not body.strip():
        return Problem(source, line, "empty_body", f"{where}: the body is empty", raw=raw)
    if kind == "html":
        stats.counts["html_only_messages"] += 1
    if attachments:
        stats.counts["attachments_skipped"] += len(attachments)
        meta["attachments"] = attachments
    meta["thread"] = threads.thread_for(mid, meta["in_reply_to"], meta["references"], meta["subject"] or "",
                                        fallback=f"{source}:{line}")
    provenance: dict = {"source": source, "line": line}
    if mid:
        provenance["ref"] = mid
    return {"text": body, "meta": meta, "provenance": provenance}


def message_meta(msg: Message) -> dict:
    """Subject, from, to, date (ISO 8601 when parseable), ids and references of a parsed message."""
    refs_header = _header(msg, "references") or ""
    references = _MSG_ID.findall(refs_header) or refs_header.split()
    reply = _header(msg, "in-reply-to")
    reply_ids = _MSG_ID.findall(reply or "")
    return {"subject": _header(msg, "subject"), "from": _header(msg, "from"), "to": _header(msg, "to"),
            "date": _date(msg), "message_id": _header(msg, "message-id"),
            "in_reply_to": reply_ids[0] if reply_ids else reply, "references": references}


class MessageParts:
    """One walk over a MIME tree: the first text/plain and text/html parts that are not attachments, and
    the names of the attachments (attached files, forwarded messages, inline images and other non-text)."""

    def __init__(self) -> None:
        self.plain: Message | None = None
        self.html: Message | None = None
        self.attachments: list[str] = []

    def collect(self, part: Message) -> None:
        ctype = part.get_content_type()
        if part.get_content_disposition() == "attachment" or ctype == "message/rfc822":
            self.attachments.append(part.get_filename() or ctype)
        elif part.is_multipart():
            for child in part.get_payload():
                self.collect(child)
        elif ctype == "text/plain" and self.plain is None:
            self.plain = part
        elif ctype == "text/html" and self.html is None:
            self.html = part
        elif part.get_content_maintype() != "text":
            self.attachments.append(part.get_filename() or ctype)

    def body_text(self, stats: SourceStats) -> tuple[str | None, str]:
        """(body, "plain" | "html"): the text/plain part, else the HTML as text; (None, "") if neither."""
        if self.plain is not None:
            return part_text(self.plain, stats), "plain"
        if self.html is not None:
            return html_to_text(part_text(self.html, stats)), "html"
        return None, ""


def part_text(part: Message, stats: SourceStats) -> str:
    """A part's payload decoded: declared charset, else UTF-8, cp1252, latin-1 (fallbacks are counted)."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    declared = part.get_content_charset()
    tried = ([declared] if declared else []) + [c for c in _FALLBACK_CHARSETS if c != declared]
    for i, charset in enumerate(tried):
        try:
            codecs.lookup(charset)
            text = payload.decode(charset)
        except (LookupError, UnicodeDecodeError):
            continue
        if declared and i > 0:
            stats.counts["charset_fallbacks"] += 1
        return text
    return payload.decode("latin-1")  # unreachable: latin-1 decodes every byte


def html_to_text(html: str) -> str:
    """Readable text from HTML: scripts and styles dropped, blocks and <br> on their own lines."""
    from bs4 import BeautifulSoup  # imported here: only HTML-only messages need it

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "head"]):
        tag.decompose()
    for br in soup.find_all("br"):
        br.replace_with("\n")
    for tag in soup.find_all(_BLOCK_TAGS):
        tag.insert_before("\n")
        tag.insert_after("\n")
    for tag in soup.find_all(_LINE_TAGS):
        tag.insert_before("\n")
    lines = [" ".join(line.split()) for line in soup.get_text().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _header(msg: Message, name: str) -> str | None:
    """A header decoded as policy.default would (RFC 2047 words, 8-bit bytes), whitespace collapsed."""
    value = msg.get(name)
    if value is None:
        return None
    value = str(value)
    if "=?" in value or not value.isascii():  # policy.default's parsers are slow: only when there is decoding
        value = str(policy.default.header_fetch_parse(name, value))
    return " ".join(value.split())


def _date(msg: Message) -> str | None:
    value = _header(msg, "date")
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value).isoformat()
    except (TypeError, ValueError, IndexError, OverflowError):
        return value  # unparseable: kept as written
