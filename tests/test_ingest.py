"""`hone data ingest`: every source kind on the hand-written exports in tests/fixtures/data/ingest/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hone.cli import app
from hone.data.ingest import IngestOptions, detect_kind, ingest
from hone.data.readers import DataError
from hone.data.sources import SourceStats
from hone.data.sources.docs import doc_title, read_docs
from hone.data.sources.mail import (
    ThreadIndex,
    html_to_text,
    normalise_subject,
    read_email_source,
    read_mbox,
    split_mbox,
)
from hone.data.sources.slack import read_slack, resolve_markup
from hone.data.sources.text import decoded_lines, detect_encoding
from hone.data.sources.tickets import read_tickets
from hone.data.stage import rejects_path, report_path
from hone.records import Problem

FX = Path(__file__).parent / "fixtures" / "data" / "ingest"
MBOX = FX / "support.mbox"


def _split(items):
    records = [i for i in items if not isinstance(i, Problem)]
    problems = [i for i in items if isinstance(i, Problem)]
    return records, problems


# --- e-mail ----------------------------------------------------------------------------------------------

def test_mbox_one_record_per_message_with_start_line_and_message_id():
    stats = SourceStats()
    records, problems = _split(list(read_mbox(MBOX, stats)))
    assert problems == []
    lines = MBOX.read_bytes().split(b"\n")
    assert [r["provenance"]["line"] for r in records] == [1, 25, 52, 83, 100, 118]
    for r in records:  # the line really is the message's "From " separator
        assert lines[r["provenance"]["line"] - 1].startswith(b"From ")
        assert r["provenance"]["ref"] == r["meta"]["message_id"]
        assert r["provenance"]["source"] == str(MBOX)
    assert records[1]["meta"]["message_id"] == "<20250303113002.tom@acme.example>"
    assert records[0]["meta"]["date"] == "2025-03-03T09:12:44+01:00"
    assert records[2]["meta"]["references"] == ["<CAF1042.ana@mail.example.com>", "<20250303113002.tom@acme.example>"]
    assert records[2]["meta"]["in_reply_to"] == "<20250303113002.tom@acme.example>"
    assert stats.counts["attachments_skipped"] == 1 and stats.counts["html_only_messages"] == 1


def test_mbox_bodies_kept_exact_with_quotes_and_signatures():
    records = list(read_mbox(MBOX))
    first, reply, followup = (r["text"] for r in records[:3])
    assert first.endswith("Thanks,\nAna\n\n-- \nAna Silva\nHead of Operations, Silva & Filhos Lda.\n+351 21 555 0199\n")
    assert "49,90 €?" in first
    # quoted-printable soft line break joined, the quote and "Best regards," signature left for `clean`
    assert "refunded the second payment; it will" in reply
    assert "Best regards,\nTom Becker\nAcme Support\n\nOn Mon, 3 Mar 2025 at 09:12, Ana Silva" in reply
    assert "> the second payment of 49,90 €?\n" in reply
    # mboxrd ">From " unescaped once; the quoted lines keep their "> "
    assert "\nFrom now on I will pay by bank transfer.\n" in followup
    assert "> Best regards,\n> Tom Becker\n" in followup


def test_mbox_html_only_charset_and_attachment():
    records = list(read_mbox(MBOX))
    html = records[3]
    assert html["text"] == ("Invoice INV-2291\n\nDear Ana,\nyour invoice for March 2025 is ready.\n\n"
                            "Kettle (blue) × 1: 49,90 €\nShipping: 4,90 €\n\n"
                            "Questions? Reply to this e-mail & we will help.\n")
    latin = records[4]
    assert latin["meta"]["subject"] == "Lieferung nach München verspätet"
    assert latin["meta"]["from"] == "Lukas Müller-Weber <lukas.weber@example.de>"
    assert "in München ankommen" in latin["text"] and "Mit freundlichen Grüßen\n" in latin["text"]
    mixed = records[5]
    assert mixed["text"].startswith("The kettle from order 1099 arrived with a cracked lid.")
    assert "<p>" not in mixed["text"]  # the text/plain alternative wins over HTML
    assert mixed["meta"]["attachments"] == ["receipt-1099.pdf"]


def test_threads_follow_references_across_mbox_and_eml():
    threads = ThreadIndex()
    mbox = list(read_mbox(MBOX, threads=threads))
    eml, _ = _split(list(read_email_source(FX / "eml", threads=threads)))
    root = "<CAF1042.ana@mail.example.com>"
    assert [r["meta"]["thread"] for r in mbox[:3]] == [root] * 3
    assert mbox[3]["meta"]["thread"] == "<inv-2291@billing.acme.example>"
    followup = next(r for r in eml if r["meta"]["message_id"] == "<20250304090000.tom@acme.example>")
    assert followup["meta"]["thread"] == root
    assert followup["provenance"]["line"] == 1
    assert followup["text"] == "Great to hear, Ana. Bank transfer works fine too.\r\n\r\nBest regards,\r\nTom\r\n"


def test_thread_by_subject_when_headers_are_missing():
    threads = ThreadIndex()
    assert threads.thread_for("<a@x>", None, [], "Printer broken", "f:1") == "<a@x>"
    assert threads.thread_for("<b@x>", None, [], "RE: Fwd: [IT] printer   BROKEN", "f:2") == "<a@x>"
    assert threads.thread_for("<c@x>", "<zz@x>", [], "Other", "f:3") == "<zz@x>"
    assert threads.thread_for(None, None, [], "", "f:4") == "f:4"
    assert normalise_subject("Re: AW: [team] Refund  for order") == "refund for order"


def test_eml_bad_charset_falls_back_and_empty_body_is_rejected():
    stats = SourceStats()
    records, problems = _split(list(read_email_source(FX / "eml", stats)))
    reset = next(r for r in records if r["meta"]["message_id"] == "<pw-reset-8812@example.ie>")
    assert reset["text"] == "The reset link says “expired” every time I click it. Sean\n"
    assert stats.counts["charset_fallbacks"] == 1
    assert [(p.code, p.line) for p in problems] == [("empty_body", 1)]
    assert "<empty-1@mail.example.com>" in problems[0].message
    assert problems[0].source.endswith("empty_body.eml")


def test_message_without_text_part_and_unparseable_mbox(tmp_path):
    mbox = tmp_path / "x.mbox"
    mbox.write_bytes(b"From a@b Mon Jan  1 00:00:00 2024\nMessage-ID: <only-pdf@x>\nContent-Type: multipart/mixed;"
                     b" boundary=z\n\n--z\nContent-Type: application/pdf\nContent-Disposition: attachment; "
                     b"filename=a.pdf\n\nJVBERi0=\n--z--\n\nFrom c@d Mon Jan  1 00:00:00 2024\nSubject: hi\n\n"
                     b"body\nFrom here on a body line, not a separator (no empty line before it)\n")
    items = list(read_mbox(mbox))
    assert isinstance(items[0], Problem) and items[0].code == "no_text_body" and "a.pdf" in items[0].message
    assert "<only-pdf@x>" in items[0].message
    assert items[1]["text"] == "body\nFrom here on a body line, not a separator (no empty line before it)\n"
    assert "ref" not in items[1]["provenance"] and items[1]["provenance"]["line"] == 12
    junk = tmp_path / "junk.mbox"
    junk.write_text("hello\nworld\n")
    with pytest.raises(DataError, match="junk.mbox:1: not an mbox file"):
        list(split_mbox(junk))


def test_html_to_text_drops_scripts_and_keeps_lines():
    assert html_to_text("<p>a&amp;b<br>c</p><script>x()</script><div>d</div>") == "a&b\nc\n\nd\n"


# --- Slack -----------------------------------------------------------------------------------------------

def test_slack_export_messages_mentions_threads_and_join_reject():
    stats = SourceStats()
    records, problems = _split(list(read_slack(FX / "slack_export", stats)))
    assert len(records) == 7 and stats.counts["slack_channels"] == 2
    assert [(p.code, p.line) for p in problems] == [("chat_join_leave", 1)]
    assert problems[0].source.endswith("general/2025-03-03.json")
    welcome = records[0]
    assert welcome["text"] == "Welcome @Léa! Release notes are in #support & on the wiki (https://acme.example/notes)."
    assert welcome["meta"] == {"channel": "general", "user": "U01ANA", "user_name": "Ana",
                               "ts": "1740992460.000200", "thread": "1740992460.000200"}
    assert welcome["provenance"] == {"source": str(FX / "slack_export" / "general" / "2025-03-03.json"),
                                     "line": 2, "ref": "general/1740992460.000200"}
    support = [r for r in records if r["meta"]["channel"] == "support"]
    assert support[0]["text"].startswith("@Tom Becker a customer was charged twice")
    assert {r["meta"]["thread"] for r in support[:3]} == {"1740996000.000100"}
    assert support[1]["text"] == "On it. Refund issued, 3-5 days <= usual."
    assert support[3]["meta"]["user_name"] == "Helpdesk" and support[3]["meta"]["subtype"] == "bot_message"


def test_slack_broken_day_file_costs_only_that_day(tmp_path):
    export = tmp_path / "export"
    shutil.copytree(FX / "slack_export", export)
    (export / "general" / "2025-03-04.json").write_text('[{"text": "cut off', encoding="utf-8")
    (export / "support" / "2025-03-05.json").write_text(
        json.dumps([{"type": "message", "user": "U9", "text": "no ts"}, "just a string",
                    {"user": "U01ANA", "ts": "1.2", "text": "", "files": [{"name": "a.png"}]},
                    {"user": "U01ANA", "ts": "1.3", "subtype": "channel_topic", "text": "set the topic"}]))
    records, problems = _split(list(read_slack(export)))
    assert len(records) == 6
    assert [(p.code, p.line) for p in problems] == [
        ("chat_join_leave", 1), ("invalid_json", 1), ("invalid_message", 1), ("invalid_message", 2),
        ("empty_message", 3), ("chat_system_message", 4)]
    (export / "users.json").write_text("{not json")
    with pytest.raises(DataError, match="users.json: not valid JSON"):
        list(read_slack(export))


def test_resolve_markup_unknown_user_and_specials():
    users = {"U1": "Ana"}
    assert resolve_markup("<@U1> <@U2> <!channel> <!subteam^S1|@ops> <mailto:a@b.c|a@b.c> 1 &lt; 2", users) == \
        "@Ana @U2 @channel @ops mailto:a@b.c 1 < 2"


# --- tickets ---------------------------------------------------------------------------------------------

def test_tickets_cp1252_auto_encoding_shapes_and_meta():
    stats = SourceStats()
    path = FX / "tickets_cp1252.csv"
    records, problems = _split(list(read_tickets(path, stats=stats)))
    assert stats.encodings == {str(path): "cp1252"}
    assert records[0] == {
        "messages": [{"role": "user", "content": "I was charged twice for order 1042.\nPlease refund 49,90 €."},
                     {"role": "assistant", "content": "We refunded the duplicate charge; allow 3-5 days."}],
        "label": "billing",
        "meta": {"customer": "José Núñez", "id": "T-1001", "Subject": "Refund", "Created": "2025-03-03"},
        "provenance": {"source": str(path), "line": 2, "ref": "T-1001"}}
    assert {k: records[1][k] for k in ("text", "label")} == {"text": "Where is my parcel? It is a week late.",
                                                             "label": "shipping"}
    assert records[1]["provenance"]["line"] == 4  # the first ticket spans lines 2-3
    assert records[2]["meta"]["customer"] == "François Lefèvre"
    assert set(records[3]) == {"text", "meta", "provenance"} and records[3]["meta"]["customer"] == "Søren Ørsted"
    assert [(p.code, p.line) for p in problems] == [("no_question", 7)]
    assert "T-1005" in problems[0].message and "'Body'" in problems[0].message


def test_tickets_utf16_tab_separated():
    stats = SourceStats()
    records = list(read_tickets(FX / "tickets_utf16.csv", stats=stats))
    assert stats.encodings[str(FX / "tickets_utf16.csv")] == "utf-16"
    assert records[0]["messages"][0]["content"] == "注文 1042 の返金はいつですか？"
    assert records[0]["meta"] == {"customer": "山田 太郎"} and records[0]["label"] == "billing"
    assert records[1]["messages"][0]["content"] == "Can I change my delivery address? 📦"
    assert records[2] == {"text": "Wie ändere ich mein Passwort?", "label": "login",
                          "meta": {"customer": "Jürgen Groß"},
                          "provenance": {"source": str(FX / "tickets_utf16.csv"), "line": 4}}


def test_tickets_explicit_mapping_bom_and_bad_rows(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeffcase,ask,said,kind\n1,Hi there,Hello!,greet\n2,\"broken \"quote,x,y\n3,Ünïcode ok,,\n"
                     .encode("utf-8"))
    stats = SourceStats()
    cols = {"id": "case", "question": "ask", "answer": "said", "label": "kind"}
    items = list(read_tickets(path, cols, stats=stats))
    assert stats.encodings[str(path)] == "utf-8-sig"
    assert items[0]["messages"][1]["content"] == "Hello!" and items[0]["provenance"]["ref"] == "1"
    assert isinstance(items[1], Problem) and (items[1].code, items[1].line) == ("invalid_csv", 3)
    assert items[2]["text"] == "Ünïcode ok" and items[2]["provenance"]["line"] == 4
    with pytest.raises(DataError, match=r"column 'question' \(mapped to question\) is not in the file; "
                                        r"columns found: case, ask, said, kind"):
        read_tickets(path, {"question": "question"})
    with pytest.raises(DataError, match="no question column"):
        read_tickets(path, {})


def test_tickets_explicit_wrong_encoding_rejects_rows_not_file():
    items = list(read_tickets(FX / "tickets_cp1252.csv", encoding="utf-8"))
    assert [i.code for i in items] == ["undecodable"] * 4 + ["no_question"]
    assert "byte 0xe9" in items[0].message


def test_detect_encoding_and_decoded_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("naïve\r\ncafé\n".encode("utf-16-le"))
    assert detect_encoding(f) == "utf-16-le"
    assert [t for _, t, _ in decoded_lines(f, "utf-16-le")] == ["naïve\r\n", "café\n"]
    f.write_bytes(b"ok\n\x81\x8d\n")  # bytes cp1252 leaves undefined
    assert detect_encoding(f) == "latin-1"
    f.write_bytes(b"caf\xc3\xa9\n")
    assert detect_encoding(f) == "utf-8"


# --- documents -------------------------------------------------------------------------------------------

def test_docs_folder_titles_paths_encodings_and_rejects():
    stats = SourceStats()
    records, problems = _split(list(read_docs(FX / "docs", stats=stats)))
    assert [r["meta"] for r in records] == [
        {"title": "garantie", "path": "faq/garantie.txt"},
        {"title": "Refunds and returns", "path": "faq/refunds.md"},
        {"title": "shipping", "path": "faq/shipping.txt"},
        {"title": "Getting started with Acme Kettles", "path": "getting-started.md"}]
    assert records[0]["text"] == "Die Garantie gilt zwei Jahre ab Kaufdatum – auch für Geräte aus München.\n"
    assert stats.encodings == {str(FX / "docs" / "faq" / "garantie.txt"): "cp1252"}
    assert stats.counts["files_ignored"] == 1  # logo.png
    assert sorted((p.code, Path(p.source).name) for p in problems) == [("binary_file", "scan.txt"),
                                                                       ("empty_document", "empty.md")]


def test_doc_title_rules():
    md = Path("x.md")
    assert doc_title("intro\n\n## Using C#\n# Later", md) == "Using C#"
    assert doc_title("no heading here", md) == "x"
    assert doc_title("# Looks like a heading", Path("notes.txt")) == "notes"


# --- ingest: kinds, counts, report -----------------------------------------------------------------------

def test_detect_kind(tmp_path):
    assert detect_kind(MBOX) == "email"
    assert detect_kind(FX / "eml") == "email"
    assert detect_kind(FX / "slack_export") == "slack"
    assert detect_kind(FX / "docs") == "docs"
    assert detect_kind(FX / "tickets_cp1252.csv") == "tickets"
    assert detect_kind(FX / "tickets_utf16.csv") == "tickets"
    recs = tmp_path / "r.csv"
    recs.write_text("text,label\nhi,a\n")
    assert detect_kind(recs) == "records"
    mbox = tmp_path / "Inbox"
    mbox.write_bytes(MBOX.read_bytes())
    assert detect_kind(mbox) == "email"
    assert detect_kind(recs, "tickets") == "tickets"
    with pytest.raises(DataError, match="both e-mail"):
        detect_kind(FX)
    with pytest.raises(DataError, match="not found"):
        detect_kind(tmp_path / "nope")


def test_ingest_all_kinds_counts_details_and_lineage(tmp_path):
    records_file = tmp_path / "prior.jsonl"
    records_file.write_text('{"text": "kept", "provenance": {"source": "raw.csv", "line": 9}}\n'
                            '{"text": "new"}\n{oops\n')
    out = tmp_path / "out" / "ingest.jsonl"
    sources = [MBOX, FX / "eml", FX / "slack_export", FX / "tickets_cp1252.csv", FX / "tickets_utf16.csv",
               FX / "docs", records_file]
    report = ingest(sources, out, IngestOptions())
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert report.records_in == report.passed + report.rejected_total == 34
    assert report.rejected == {"empty_body": 1, "chat_join_leave": 1, "no_question": 1, "empty_document": 1,
                               "binary_file": 1, "invalid_json": 1}
    assert len(rows) == report.records_out == 28
    assert all(isinstance(r["provenance"]["line"], int) for r in rows)
    assert rows[-2]["provenance"] == {"source": "raw.csv", "line": 9}  # passed through untouched
    assert rows[-1]["provenance"] == {"source": str(records_file), "line": 2}
    saved = json.loads(report_path(out).read_text())
    details = saved["details"]
    assert details["by_kind"]["email"] == {"sources": 2, "records": 8, "rejected": 1}
    assert details["by_kind"]["tickets"] == {"sources": 2, "records": 7, "rejected": 1}
    assert details["attachments_skipped"] == 1
    assert details["encodings"][str(FX / "tickets_cp1252.csv")] == "cp1252"
    assert [s["kind"] for s in details["sources"]] == ["email", "email", "slack", "tickets", "tickets", "docs",
                                                       "records"]
    assert len(saved["lineage"]["inputs"]) == 7 and saved["lineage"]["config"]["kinds"][str(MBOX)] == "email"
    rejects = [json.loads(x) for x in rejects_path(out).read_text().splitlines()]
    assert {(r["code"], r["line"]) for r in rejects} >= {("chat_join_leave", 1), ("no_question", 7),
                                                         ("invalid_json", 3)}


def test_options_validation():
    with pytest.raises(ValueError, match="unknown ticket column role 'body'"):
        IngestOptions(columns={"body": "x"})
    with pytest.raises(ValueError, match="unknown encoding"):
        IngestOptions(encoding="klingon")
    with pytest.raises(ValueError, match="extra"):
        IngestOptions(knd="docs")
    assert IngestOptions.model_fields["columns"].description


def test_cli_ingest(tmp_path):
    runner = CliRunner()
    out = tmp_path / "t.jsonl"
    result = runner.invoke(app, ["data", "ingest", str(FX / "tickets_cp1252.csv"), "--tickets", "--column",
                                 "question=Subject", "--column", "answer=Body", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "in 5 = passed 4 + rejected 1" in result.output
    first = json.loads(out.read_text().splitlines()[0])
    assert first["messages"][0]["content"] == "Refund" and first["meta"]["Agent Reply"].startswith("We refunded")
    result = runner.invoke(app, ["data", "ingest", str(FX / "tickets_cp1252.csv"), "--column", "question=Nope",
                                 "--out", str(out)])
    assert result.exit_code == 2 and "columns found: Ticket ID, Customer" in result.output
    result = runner.invoke(app, ["data", "ingest", str(MBOX), "--column", "question", "--out", str(out)])
    assert result.exit_code == 2 and "expected ROLE=COLUMN" in result.output
