"""`hone data clean`: hand-computed repairs, e-mail stripping that keeps the content, filters, the stage, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hone.cli import app
from hone.data.clean import (CleanOptions, clean, clean_record, clean_text, html_to_text, is_email_record,
                             looks_like_html, normalise_whitespace, remove_control_chars, strip_quoted_reply,
                             strip_signature)
from hone.data.stage import Reject, rejects_path, report_path

MBOX = Path(__file__).parent / "fixtures" / "data" / "ingest" / "support.mbox"
OPTS = CleanOptions()

THREAD_REPLY = """Hi team,

The export still fails with error 42.
Thanks, that fixed the first problem though.
> not a quote marker in the middle? yes it is, it goes

Best regards,
John Smith
ACME Corp

On Mon, Mar 4, 2024 at 10:12 AM Support <support@acme.example> wrote:
> Please try again.
> --
> Support"""

OUTLOOK_REPLY = """Sure, here is the log you asked for.

Sent from my iPhone

________________________________
From: Anna Berg <anna@acme.example>
Sent: Monday, March 4, 2024 10:00
To: John Smith
Subject: RE: export

Can you send the log?"""


def test_mojibake_and_nfc_are_repaired_quotes_kept():
    text, fixes = clean_text("CafÃ© donâ€™t â€œworryâ€\x9d", OPTS)
    assert text == "Café don’t “worry”"
    assert fixes == {"unicode_fixed"}
    # NFC: 'e' + combining acute becomes one code point.
    assert clean_text("Cafe\u0301", OPTS)[0] == "Caf\u00e9"
    assert clean_text("CafÃ©", CleanOptions(fix_unicode=False))[0] == "CafÃ©"


def test_control_zero_width_and_whitespace():
    assert remove_control_chars("a\x00b\x07c\td\r\ne\u200bf\u2028g\ufeff") == "abc\td\nef\ng"
    assert remove_control_chars("zwj \u200d kept") == "zwj \u200d kept"  # emoji sequences need it
    assert normalise_whitespace("  a   b  \n\n\n\n    c  d \n\n x\u00a0\u00a0y ") == "a b\n\n    c d\n\n x y"
    # ^ leading indentation is kept (code needs it); only runs inside a line collapse
    text, fixes = clean_text("one\x0ctwo   three", OPTS)
    assert text == "one\ntwo three" and fixes == {"whitespace_changed"}


def test_html_to_text_keeps_structure_drops_scripts():
    html = ("<html><head><style>p{color:red}</style><title>T</title></head><body>\n"
            "  <h1>Reset your   password</h1>\n"
            "  <div><div> <p>Go to <b>Settings</b> and\n     click <a href='x'>Reset</a>.</p></div></div>\n"
            "  <ul><li>one</li><li>two <b>bold</b></li></ul><script>alert(1)</script>\n"
            "  <p>Line one<br>Line two &amp; more</p>\n"
            "  <pre>def f():\n    return 1</pre><blockquote>quoted<br>more</blockquote></body></html>")
    assert html_to_text(html) == ("Reset your password\n\nGo to Settings and click Reset.\n\n- one\n- two bold\n\n"
                                  "Line one\nLine two & more\n\ndef f():\n    return 1\n\n> quoted\n> more")
    text, fixes = clean_text("<p>Hello</p><p>World</p>", OPTS)
    assert (text, fixes) == ("Hello\n\nWorld", {"html_converted"})
    assert clean_text("<p>Hello</p><p>World</p>", CleanOptions(html=False))[0] == "<p>Hello</p><p>World</p>"


def test_text_that_mentions_tags_is_not_html():
    assert not looks_like_html("Use a <div> and a </span> in the <p> template")
    assert not looks_like_html("if a < b and c > d")
    assert looks_like_html("line<br>line")
    assert looks_like_html("<!DOCTYPE html><title>x</title>")


def test_quoted_reply_and_signature_are_cut_content_kept():
    text, fixes = clean_text(THREAD_REPLY, OPTS, email=True)
    assert text == "Hi team,\n\nThe export still fails with error 42.\nThanks, that fixed the first problem though."
    assert fixes == {"quotes_stripped", "signatures_stripped"}
    text, fixes = clean_text(OUTLOOK_REPLY, OPTS, email=True)
    assert text == "Sure, here is the log you asked for."
    assert fixes == {"quotes_stripped", "signatures_stripped"}


def test_html_email_gmail_quote_is_cut():
    html = ('<div dir="ltr">Thanks, that fixed it.<div><br></div><div>Anna</div></div><br>'
            '<div class="gmail_quote"><div class="gmail_attr">On Mon, 3 Mar 2025 at 09:12, Support &lt;'
            '<a href="mailto:s@x.com">s@x.com</a>&gt; wrote:<br></div><blockquote class="gmail_quote">'
            '<div>Please restart<br>the router.</div></blockquote></div>')
    text, fixes = clean_text(html, OPTS, email=True)
    assert text == "Thanks, that fixed it.\n\nAnna"
    assert fixes == {"html_converted", "quotes_stripped"}


def test_reply_header_variants():
    assert strip_quoted_reply("Yes.\n\n-----Original Message-----\nFrom: a\nold") == "Yes."
    # Gmail wraps a long header over two lines.
    assert strip_quoted_reply("Done.\nOn Tue, 5 Mar 2024 at 09:00, Very Long Name <\nname@x.com> wrote:\n> q") \
        == "Done."
    assert strip_quoted_reply("Ja.\n\nAm 05.03.2024 um 09:00 schrieb Lukas <l@x.de>:\n> frage") == "Ja."
    # Content that merely starts with "On" or "From" is not a header.
    text = "On Monday we shipped it and he wrote:\nall good.\nFrom: the warehouse, see below."
    assert strip_quoted_reply(text) == text


def test_signatures_and_sign_offs():
    assert strip_signature("Works now.\n-- \nJohn\nhttp://john.example") == "Works now."
    # Stacked: the sign-off above a '-- ' block goes too.
    assert strip_signature("Refund please.\n\nThanks,\nAna\n\n-- \nAna Silva\nHead of Ops") == "Refund please."
    assert strip_signature("Fixed.\n\nCheers!") == "Fixed."
    # A sign-off followed by too many (or too long) lines is content, and so is a sign-off with words.
    body = "Question?\n\nThanks,\n" + "\n".join(f"line {i}" for i in range(5))
    assert strip_signature(body) == body
    assert strip_signature("It crashed.\nThanks, that fixed it") == "It crashed.\nThanks, that fixed it"
    # Nothing left after the cut: the sign-off is the message.
    assert strip_signature("Thanks!") == "Thanks!"


def test_email_detection_and_option():
    mail = {"text": "Ok.\n\nOn 1 Jan 2024, A <a@x> wrote:\n> hi", "meta": {"message_id": "<1@x>"}}
    plain = {"text": mail["text"], "provenance": {"source": "notes.jsonl", "line": 3}}
    assert is_email_record(mail) and not is_email_record(plain)
    assert is_email_record({"text": "x", "provenance": {"source": "box/support.mbox", "line": 1}})
    assert is_email_record({"text": "x", "meta": {"kind": "email"}})
    assert clean_record(mail, OPTS)[0]["text"] == "Ok."
    assert clean_record(plain, OPTS)[0]["text"] == mail["text"]  # auto: not e-mail, left alone
    assert clean_record(plain, CleanOptions(email="always"))[0]["text"] == "Ok."
    assert clean_record(mail, CleanOptions(email="never"))[0]["text"] == mail["text"]


def test_filters_reject_with_codes():
    where = {"provenance": {"source": "f.jsonl", "line": 7}}
    res, _ = clean_record({"text": "\u200b \x00 ", **where}, OPTS)
    assert isinstance(res, Reject) and res.code == "empty_content" and "f.jsonl:7" in res.message
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<p> </p>"}], **where}
    res, _ = clean_record(chat, OPTS)
    assert res.code == "empty_content" and "messages[1].content (assistant)" in res.message
    alpaca = {"instruction": "Add  2 and 2", "input": "", "output": "4", **where}
    res, _ = clean_record(alpaca, OPTS)
    assert res == {"instruction": "Add 2 and 2", "input": "", "output": "4", **where}
    assert clean_record({"prompt": "a", "completion": "", **where}, OPTS)[0].code == "empty_content"
    res, _ = clean_record({"text": "abcd", "label": "x", **where}, CleanOptions(min_chars=5))
    assert res.code == "too_short" and "4 characters" in res.message
    res, _ = clean_record({"text": "abcdef", **where}, CleanOptions(max_chars=5))
    assert res.code == "too_long"
    res, _ = clean_record({"text": "abcde", "label": "x", "meta": {"k": 1}, **where}, CleanOptions(min_chars=5,
                                                                                                     max_chars=5))
    assert res == {"text": "abcde", "label": "x", "meta": {"k": 1}, **where}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_stage_counts_and_details(tmp_path):
    src = _write(tmp_path / "raw.jsonl", [
        {"text": "CafÃ© is   open", "label": "a"},
        "{not json",
        {"text": "<p>Hello</p><p>there</p>"},
        {"text": " \u200b "},
        {"text": "Please help.\n\nOn 1 Jan 2024, A <a@x> wrote:\n> old", "meta": {"subject": "help"}},
        {"text": "ok"},
    ])
    out = tmp_path / "clean.jsonl"
    report = clean([src], out, CleanOptions(min_chars=3))
    assert (report.records_in, report.passed) == (6, 3)
    assert report.rejected == {"invalid_json": 1, "empty_content": 1, "too_short": 1}
    assert report.records_in == report.passed + report.rejected_total
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["Café is open", "Hello\n\nthere", "Please help."]
    assert rows[0]["provenance"] == {"source": str(src), "line": 1} and rows[0]["label"] == "a"
    assert report.details["records_with_fix"] == {"unicode_fixed": 1, "html_converted": 1, "quotes_stripped": 1,
                                                  "signatures_stripped": 0, "whitespace_changed": 2}
    codes = [json.loads(x)["code"] for x in rejects_path(out).read_text().splitlines()]
    assert codes == ["invalid_json", "empty_content", "too_short"]
    saved = json.loads(report_path(out).read_text())
    assert saved["lineage"]["config"]["min_chars"] == 3


@pytest.mark.skipif(not MBOX.is_file(), reason="ingest fixtures not present")
def test_real_mailbox_replies_lose_quotes_and_signatures():
    from hone.data.sources.mail import read_mbox

    records = [r for r in read_mbox(MBOX) if isinstance(r, dict)]
    cleaned = [clean_record(r, OPTS)[0] for r in records]
    first, reply = cleaned[0]["text"], cleaned[1]["text"]
    assert first.endswith("the second payment of 49,90 €?")  # "Thanks,\nAna" and the "-- " block cut
    assert reply.startswith("Hi Ana,") and reply.endswith("within 3-5 business days.")
    assert "wrote:" not in reply and "Best regards" not in reply


def test_cli_clean(tmp_path):
    src = _write(tmp_path / "in.jsonl", [{"text": "a  b"}, {"text": "x"}])
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["data", "clean", str(src), "--out", str(out), "--min-chars", "2"])
    assert result.exit_code == 0, result.output
    assert "in 2 = passed 1 + rejected 1 (too_short 1)" in result.output
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["a b"]
    bad = CliRunner().invoke(app, ["data", "clean", str(src), "--out", str(out), "--email", "sometimes"])
    assert bad.exit_code == 2 and "--email" in bad.output
    missing = CliRunner().invoke(app, ["data", "clean", str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert missing.exit_code == 2 and "nope.jsonl" in missing.output

_PIECES = st.sampled_from(["<p>", "</p>", "<br>", "> ", "\n", "\r\n", "  ", "\t", "\x00", "\u200b", "Ã©", "-- ",
                           "On 1 Jan 2024, A wrote:", "Thanks,", "From: a", "Sent: b", "To: c", "&amp;", "é"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.text(max_size=12)), max_size=30), st.booleans())
def test_any_text_cleans_without_crash_to_tidy_text(pieces, email):
    text, fixes = clean_text("".join(pieces), OPTS, email=email)
    assert fixes <= {"unicode_fixed", "html_converted", "quotes_stripped", "signatures_stripped",
                     "whitespace_changed"}
    assert text == text.strip() and "\n\n\n" not in text and "\r" not in text
    assert not any(line != line.rstrip() for line in text.split("\n"))
    assert not any(ord(c) < 32 and c not in "\n\t" for c in text) and "\u200b" not in text
