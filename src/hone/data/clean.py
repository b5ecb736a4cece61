"""`hone data clean`: repair and tidy the text of every record, and refuse records with nothing left.

Per record, over every human-written text field (stage.map_texts; labels, ids and meta are untouched):

1. Unicode repair with ftfy (mojibake such as "CafÃ©" -> "Café", "donâ€™t" -> "don’t") and NFC.
   Curly quotes and full-width characters are kept as the author wrote them: only *broken* text is fixed.
2. HTML to text when a field looks like HTML (BeautifulSoup): paragraphs and line breaks kept, script,
   style and head dropped, list items as "- ", <blockquote> lines prefixed with "> " (so e-mail quote
   stripping sees them).
3. E-mail only (records whose meta/provenance says e-mail, or `email: always`): the quoted reply is cut
   ("On <date>, <name> wrote:" and all after it, "-----Original Message-----", an Outlook "From:/Sent:"
   header block, lines starting with ">"), then the signature ("-- " line, "Sent from my iPhone",
   a bare sign-off line like "Best regards," followed by at most 4 short lines at the very end). A
   sign-off is only cut when something remains, and "Thanks, that fixed it" is content, not a sign-off.
4. Control characters (not \\n, \\t) and zero-width characters removed; whitespace normalised: runs of
   spaces inside a line collapsed (leading indentation kept, code needs it), trailing spaces stripped,
   at most one blank line in a row, ends stripped.

Then filters, each a Reject with a code: `empty_content` (a text field, or a chat message's content,
became empty; an empty `input`/`system` field is allowed, alpaca records have one), `too_short` and
`too_long` (characters over all text fields, against min_chars / max_chars).

    hone data clean raw.jsonl --out clean.jsonl --min-chars 20
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hone.data.stage import (TEXT_FIELDS, Reject, StageReport, map_texts, read_records, record_texts,
                             run_stage, where)

FIXES = ("unicode_fixed", "html_converted", "quotes_stripped", "signatures_stripped", "whitespace_changed")
# Fields that may legitimately be empty (alpaca's "input", an unset system prompt).
OPTIONAL_FIELDS = ("input", "system")
_EMAIL_META_KEYS = ("message_id", "in_reply_to", "references", "subject")
_EMAIL_KINDS = {"email", "e-mail", "mail", "mbox", "eml"}
_EMAIL_SUFFIXES = (".eml", ".mbox", ".mbx", ".msg")


class CleanOptions(BaseModel):
    """Options of `hone data clean` (the `clean:` section of a `hone data prepare` recipe)."""

    model_config = ConfigDict(extra="forbid")

    fix_unicode: bool = Field(True, description="Repair mojibake and broken Unicode with ftfy, then NFC.")
    html: bool = Field(True, description="Convert text fields that look like HTML into plain text.")
    email: Literal["auto", "always", "never"] = Field(
        "auto", description="Strip quoted replies and signatures: 'auto' for records whose meta or "
        "provenance says e-mail (message_id/subject in meta, .eml/.mbox source), 'always', or 'never'.")
    min_chars: int = Field(1, ge=0, description="Reject records with fewer characters (all text fields "
                           "together, after cleaning) as too_short.")
    max_chars: int | None = Field(None, ge=1, description="Reject records with more characters than this "
                                  "as too_long; none means no limit.")


# --- unicode, control characters, whitespace -------------------------------------------------------------

# Zero-width space, word joiner, BOM, Mongolian vowel separator. ZWJ/ZWNJ (U+200C/D) are kept: emoji
# sequences and Persian/Indic scripts need them.
# Control characters are category Cc: U+0000-001F and U+007F-009F; \n and \t are kept.
_JUNK = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff\u180e]+")
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x0b\x0c\x85]")
_SPACES = re.compile(r"(?<=\S)[ \u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]{2,}|[\u00a0\u1680\u2000-\u200a"
                     r"\u202f\u205f\u3000]")
_BLANK_RUNS = re.compile(r"\n{3,}")


def fix_unicode(text: str) -> str:
    """ftfy's repair of mojibake and broken sequences, NFC; quotes and character widths kept."""
    import ftfy

    return ftfy.fix_text(text, _ftfy_config())


_FTFY_CONFIG = None


def _ftfy_config():
    global _FTFY_CONFIG
    if _FTFY_CONFIG is None:
        import ftfy

        _FTFY_CONFIG = ftfy.TextFixerConfig(uncurl_quotes=False, fix_character_width=False, explain=False)
    return _FTFY_CONFIG


def remove_control_chars(text: str) -> str:
    """Line breaks unified to \\n; control and zero-width characters removed; \\n and \\t kept."""
    return _JUNK.sub("", _LINE_BREAKS.sub("\n", text))


def normalise_whitespace(text: str) -> str:
    """Collapse space runs inside lines (indentation kept), strip line ends, <= 1 blank line, strip ends."""
    lines = [_SPACES.sub(" ", line).rstrip() for line in text.split("\n")]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


# --- HTML ------------------------------------------------------------------------------------------------

_HTML_DOC = re.compile(r"<!doctype html|<html[\s>]|<body[\s>]", re.I)
_HTML_TAG = re.compile(r"</?(p|div|br|span|a|b|i|u|em|strong|table|tr|td|th|ul|ol|li|h[1-6]|blockquote|pre|"
                       r"img|font|hr|head|style|script|meta|center|tbody|thead)\b[^<>]*>", re.I)
_HTML_BR = re.compile(r"<br\s*/?>", re.I)
_HTML_DROP = {"script", "style", "head", "title", "noscript", "template", "svg"}
_HTML_PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "pre", "hr", "section",
                   "article", "header", "footer", "blockquote", "dl", "figure"}
_HTML_LINE = {"div", "tr", "li", "dt", "dd", "address", "center", "form", "fieldset", "nav", "main",
              "caption", "figcaption"}


def looks_like_html(text: str) -> bool:
    """A document marker, a <br>, or a known element both opened and closed ("<p>...</p>").

    Text that merely mentions a tag ("use a <div> here") is not converted.
    """
    if "<" not in text:
        return False
    if _HTML_DOC.search(text) or _HTML_BR.search(text):
        return True
    opened, closed = set(), set()
    for m in _HTML_TAG.finditer(text):
        (closed if m.group(0).startswith("</") else opened).add(m.group(1).lower())
    return bool(opened & closed)


def html_to_text(html: str) -> str:
    """Plain text of an HTML fragment or page: blocks become lines/paragraphs, scripts and styles go."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    parts: list[str | int] = []
    try:
        _walk(soup, parts, pre=False)
    except RecursionError:  # pathologically nested junk: flat text is better than nothing
        return normalise_whitespace(soup.get_text("\n"))
    return normalise_whitespace(_join_blocks(parts))


def _join_blocks(parts: list[str | int]) -> str:
    """Join text pieces; ints are soft breaks (1 line, 2 paragraph) that merge with their neighbours."""
    out: list[str] = []
    pending = 0
    for part in parts:
        if isinstance(part, int):
            pending = max(pending, part)
            continue
        if pending and out:
            out.append("\n" * pending)
            part = part.lstrip(" ")  # source indentation is layout, not content (unlike <pre>)
        pending = 0
        out.append(part)
    return "".join(out)


def _walk(node, parts: list[str | int], pre: bool) -> None:
    from bs4 import Comment, Declaration, Doctype, NavigableString, ProcessingInstruction, Tag

    for child in node.children:
        if isinstance(child, (Comment, Declaration, Doctype, ProcessingInstruction)):
            continue
        if isinstance(child, NavigableString):
            parts.append(str(child) if pre else re.sub(r"\s+", " ", str(child)))
            continue
        if not isinstance(child, Tag) or child.name in _HTML_DROP:
            continue
        name = child.name
        if name == "br":
            parts.append("\n")
        elif name == "blockquote":
            inner: list[str | int] = []
            _walk(child, inner, pre)
            quoted = normalise_whitespace(_join_blocks(inner))
            parts += [2, "\n".join("> " + line for line in quoted.split("\n")), 2]
        elif name in _HTML_PARAGRAPH or name in _HTML_LINE:
            gap = 2 if name in _HTML_PARAGRAPH else 1
            parts += [gap, "- "] if name == "li" else [gap]
            _walk(child, parts, pre or name == "pre")
            parts.append(gap)
        elif name in ("td", "th"):
            _walk(child, parts, pre)
            parts.append("\t")
        else:
            _walk(child, parts, pre)


# --- e-mail: quoted replies and signatures ---------------------------------------------------------------

_REPLY_HEADER = re.compile(
    r"^(On\b.{0,300}\d.{0,300}\bwrote:"  # Gmail / Apple Mail / Thunderbird
    r"|Am\b.{0,300}\d.{0,300}\bschrieb.{0,200}:"  # German
    r"|Le\b.{0,300}\d.{0,300}\ba écrit\s?:)$", re.I)  # French
_ORIGINAL_MESSAGE = re.compile(r"^-{2,}\s*(Original Message|Ursprüngliche Nachricht|Message d'origine)\s*-{2,}$",
                               re.I)
_OUTLOOK_FROM = re.compile(r"^\*?(From|Von|De):\*?\s+\S", re.I)
_OUTLOOK_FIELD = re.compile(r"^\*?(Sent|Date|To|Subject|Cc|Gesendet|Envoyé|An|Betreff|Objet|À):\*?\s", re.I)
_SIG_DASHES = re.compile(r"^-- ?$")
_SENT_FROM = re.compile(r"^(Sent from my \w[\w ]{0,40}|Sent from (Mail|Outlook|Yahoo Mail)\b.{0,60}"
                        r"|Get Outlook for \w+.{0,20}|Von meinem \w+ gesendet)\.?$", re.I)
_SIGN_OFF = re.compile(r"^(best|best regards|kind regards|warm regards|warmest regards|regards|many thanks|"
                       r"thanks|thanks again|thanks a lot|thank you|thank you very much|thx|cheers|sincerely|"
                       r"yours sincerely|sincerely yours|yours truly|all the best|best wishes|br|"
                       r"mit freundlichen grüßen|viele grüße|cordialement)\s*[,.!]*$", re.I)
_SIGNATURE_MAX_LINES = 4
_SIGNATURE_LINE_CHARS = 60
_DASH_SIGNATURE_MAX_LINES = 15


def strip_quoted_reply(text: str) -> str:
    """The text without the message it replies to: cut at a reply header, drop '>' lines."""
    lines = text.split("\n")
    cut = _reply_cut(lines)
    if cut is not None:
        lines = lines[:cut]
    kept = [line for line in lines if not line.lstrip().startswith(">")]
    return "\n".join(kept).strip()


def _reply_cut(lines: list[str]) -> int | None:
    """Index of the first line of the quoted message (its header), or None."""
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line:
            continue
        if _ORIGINAL_MESSAGE.match(line) or _REPLY_HEADER.match(line):
            return i
        # Gmail wraps a long "On ... <addr> wrote:" header over two lines.
        if line[:3].lower() in ("on ", "am ", "le ") and i + 1 < len(lines):
            if _REPLY_HEADER.match(line + " " + lines[i + 1].strip()):
                return i
        if _OUTLOOK_FROM.match(line) and _outlook_block(lines, i):
            # Outlook puts a rule of underscores above the header; it belongs to the quote.
            while i > 0 and re.fullmatch(r"_{5,}|-{5,}|\s*", lines[i - 1]):
                i -= 1
            return i
    return None


def _outlook_block(lines: list[str], start: int) -> bool:
    """'From: ...' followed within 4 lines by at least two of Sent/Date/To/Subject: a forwarded header."""
    fields = {m.group(1).lower() for line in lines[start + 1:start + 5] if (m := _OUTLOOK_FIELD.match(line.strip()))}
    return len(fields) >= 2


def strip_signature(text: str) -> str:
    """The text without its trailing signature; unchanged if nothing would remain.

    Repeated, because signatures stack: "Thanks,\\nAna\\n\\n-- \\nAna Silva\\nHead of Operations".
    """
    for _ in range(3):
        lines = text.rstrip().split("\n")
        cut = _signature_cut(lines)
        rest = "\n".join(lines[:cut]).strip() if cut is not None else ""
        if not rest:
            return text
        text = rest
    return text


def _signature_cut(lines: list[str]) -> int | None:
    n = len(lines)
    for i in range(n - 1, max(-1, n - 2 - _DASH_SIGNATURE_MAX_LINES), -1):
        if _SIG_DASHES.match(lines[i]):
            return i
    tail = [i for i in range(n) if lines[i].strip()][-(_SIGNATURE_MAX_LINES + 1):]
    for i in tail:
        if _SENT_FROM.match(lines[i].strip()):
            return i
    for i in tail:
        after = [line.strip() for line in lines[i + 1:] if line.strip()]
        if (_SIGN_OFF.match(lines[i].strip()) and len(after) <= _SIGNATURE_MAX_LINES
                and all(len(line) <= _SIGNATURE_LINE_CHARS for line in after)):
            return i
    return None


def is_email_record(record: dict) -> bool:
    """Whether a record came from e-mail: meta with message_id/subject/..., a kind, or a mail file."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    if any(meta.get(k) for k in _EMAIL_META_KEYS):
        return True
    for key in ("kind", "type", "source_type", "format"):
        if str(meta.get(key, "")).lower() in _EMAIL_KINDS:
            return True
    prov = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
    return str(prov.get("source", "")).lower().endswith(_EMAIL_SUFFIXES)


# --- the record ------------------------------------------------------------------------------------------

def clean_text(text: str, options: CleanOptions, email: bool = False) -> tuple[str, set[str]]:
    """One text field cleaned, and the names of the fixes that changed it (see FIXES)."""
    fixes: set[str] = set()
    if options.fix_unicode:
        fixed = fix_unicode(text)
        if fixed != text:
            fixes.add("unicode_fixed")
        text = fixed
    text = remove_control_chars(text)
    if options.html and looks_like_html(text):
        text = html_to_text(text)
        fixes.add("html_converted")
    if email:
        stripped = strip_quoted_reply(text)
        if stripped != text.strip():
            fixes.add("quotes_stripped")
        signed = strip_signature(stripped)
        if signed != stripped:
            fixes.add("signatures_stripped")
        text = signed
    tidy = normalise_whitespace(text)
    if tidy != text:
        fixes.add("whitespace_changed")
    return tidy, fixes


def clean_record(record: dict, options: CleanOptions) -> tuple[dict | Reject, set[str]]:
    """A record with every text field cleaned, or a Reject; plus the fixes applied to any field."""
    email = options.email == "always" or (options.email == "auto" and is_email_record(record))
    fixes: set[str] = set()

    def fix(text: str) -> str:
        cleaned, applied = clean_text(text, options, email)
        fixes.update(applied)
        return cleaned

    new = map_texts(record, fix)
    empty = _empty_fields(record, new)
    if empty:
        return Reject("empty_content", f"{where(record)}: {', '.join(empty)} empty after cleaning"), fixes
    texts = record_texts(new)
    if not texts:
        return Reject("empty_content", f"{where(record)}: no text field to train on "
                                       f"(keys: {', '.join(sorted(record)) or 'none'})"), fixes
    chars = sum(len(t) for t in texts)
    if chars < options.min_chars:
        return Reject("too_short", f"{where(record)}: {chars} characters after cleaning, "
                                   f"min_chars is {options.min_chars}"), fixes
    if options.max_chars is not None and chars > options.max_chars:
        return Reject("too_long", f"{where(record)}: {chars} characters after cleaning, "
                                  f"max_chars is {options.max_chars}"), fixes
    return new, fixes


def _empty_fields(before: dict, after: dict) -> list[str]:
    """Names of text fields (and messages[i].content) that are empty after cleaning."""
    empty = [k for k in TEXT_FIELDS
             if after.get(k) == "" and not (k in OPTIONAL_FIELDS and not before[k].strip())]
    for i, m in enumerate(after.get("messages") or []):
        if isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"]:
            empty.append(f"messages[{i}].content ({m.get('role', '?')})")
    return empty


def clean(inputs: list[Path], out: Path, options: CleanOptions) -> StageReport:
    """Run the clean stage over `inputs` into `out` (plus rejects and report); see the module docstring."""
    counts: Counter[str] = Counter()

    def transform(record: dict):
        result, fixes = clean_record(record, options)
        counts.update(fixes)
        return result if isinstance(result, Reject) else [result]

    def details() -> dict:
        return {"records_with_fix": {name: counts[name] for name in FIXES}}

    return run_stage("clean", read_records(inputs), out, transform, config=options.model_dump(mode="json"),
                     inputs=inputs, details=details)
