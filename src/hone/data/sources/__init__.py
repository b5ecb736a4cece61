"""Readers for raw company exports, used by `hone data ingest` (see data/ingest.py).

Each reader is a generator over one source (a file or a folder) that yields hone records, each with
`provenance` `{"source", "line", "ref"?}`, or `Problem`s for things it read but could not turn into a
record (an e-mail without a body, a Slack join notice, a ticket row in a broken encoding). It raises
`DataError` only when the source as a whole cannot be used. Readers note what they saw (encodings,
attachments skipped, charset fallbacks) on a `SourceStats`, which ingest puts in its report.

    docs.read_docs(folder)        a folder of .txt/.md documents, one record per file
    mail.read_mbox(path)          an mbox file, one record per message
    mail.read_eml(path)           one .eml file (mail.read_email_source: a folder of them, or either)
    slack.read_slack(folder)      a Slack export folder, one record per message
    tickets.read_tickets(path)    a CSV of support tickets with a column mapping
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SourceStats:
    """What readers noticed that is not a record or a reject: goes into the ingest report's details."""

    # file -> the text encoding it was decoded with (tickets CSVs, documents that are not UTF-8)
    encodings: dict[str, str] = field(default_factory=dict)
    # free counters, e.g. attachments_skipped, charset_fallbacks, html_only_messages, files_ignored
    counts: Counter = field(default_factory=Counter)
