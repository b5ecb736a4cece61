"""hone data convert: FAQ docs -> Q&A, docs -> chunks, threads -> chats, labels -> routing, ratings -> pairs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hone.data.chunk import chunk_text
from hone.data.convert import (
    ConvertError,
    ConvertOptions,
    Member,
    build_conversation,
    convert,
    extract_qa,
    is_agent,
    parse_time,
    preference_pairs,
    qa_records,
)
from hone.data.stage import rejects_path, report_path

FIXTURES = Path(__file__).parent / "fixtures" / "data" / "convert"


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _codes(out):
    return [r["code"] for r in _rows(rejects_path(out))]


# --- qa ----------------------------------------------------------------------------------------------------

def test_extract_qa_reads_every_faq_style():
    pairs = extract_qa((FIXTURES / "faq.md").read_text())
    assert [(p.question, p.answer) for p in pairs] == [
        ("How do I reset my password?",
         "Open Settings, then Security, and click Reset password.\nA link arrives by e-mail within five minutes."),
        ("Can I cancel at any time?", "Yes. Cancel from the Billing page; you keep access until the end of the month."),
        ("Where do I find my invoices?", "Under Billing > Invoices, as PDF files."),
        ("Do you ship abroad?", "Yes, to 30 countries in Europe."),
        ("Is there a free trial?", "Yes, 14 days, no card needed."),
    ]
    text = (FIXTURES / "faq.md").read_text()
    assert text[pairs[1].offset:].startswith("Q: Can I cancel")


def test_extract_qa_sections_end_at_headings_and_skip_unanswered():
    text = "## Why?\n\n### Details\nnot part of the answer\n## What is it?\nA thing.\n# Q: also a heading?\n"
    assert [(p.question, p.answer) for p in extract_qa(text)] == [("What is it?", "A thing.")]
    assert extract_qa("Q: only a question\n") == []


def test_qa_records_keep_provenance_and_reject_plain_text():
    doc = {"text": "Q: Hi?\nA: Hello.", "meta": {"title": "t"}, "provenance": {"source": "d.md", "line": 1}}
    [rec] = qa_records(doc)
    assert rec["messages"] == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert rec["provenance"] == {"source": "d.md", "line": 1, "qa": 0} and rec["meta"]["title"] == "t"
    rejected = qa_records({"text": "Just prose.", "provenance": {"source": "n.txt", "line": 1}})
    assert rejected.code == "no_qa_structure" and "hone data synth" in rejected.message
    assert qa_records({"label": "x", "provenance": {}}).code == "not_a_document"


def test_convert_qa_stage_on_documents(tmp_path):
    out = tmp_path / "qa.jsonl"
    report = convert([FIXTURES / "faq.md", FIXTURES / "notes.txt"], out, ConvertOptions(to="qa"))
    assert (report.records_in, report.passed, report.records_out) == (2, 1, 5)
    assert report.rejected == {"no_qa_structure": 1}
    assert _rows(out)[0]["provenance"]["source"].endswith("faq.md")
    assert _rows(rejects_path(out))[0]["source"].endswith("notes.txt")


# --- chunks --------------------------------------------------------------------------------------------------

def test_chunks_respect_size_offsets_and_overlap():
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    chunks = chunk_text(text, max_size=120, overlap=40)
    assert len(chunks) > 5
    for c in chunks:
        assert len(c.text) <= 120 and text[c.start:c.end] == c.text
        assert c.text.endswith(".")  # cut at sentence ends, never mid-sentence
    for a, b in itertools.pairwise(chunks):
        assert b.start < a.end and b.start > a.start  # overlapping, always advancing
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_chunks_prefer_paragraphs_and_split_huge_words():
    text = "Para one.\n\nPara two is longer.\n\n" + "x" * 30
    assert [c.text for c in chunk_text(text, max_size=25)] == ["Para one.", "Para two is longer.", "x" * 30]
    tokens = chunk_text("a b c d e f g h", max_size=3, size=lambda s: len(s.split()))
    assert [c.text for c in tokens] == ["a b c", "d e f", "g h"]
    with pytest.raises(ValueError):
        chunk_text("x", max_size=10, overlap=10)


def test_convert_chunks_stage(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "One. Two. Three. Four. Five.", "meta": {"id": 7}}) + "\n" +
                    json.dumps({"text": "   "}) + "\n")
    out = tmp_path / "chunks.jsonl"
    report = convert([docs], out, ConvertOptions(to="chunks", chunk_size=10, chunk_overlap=0))
    rows = _rows(out)
    assert [r["text"] for r in rows] == ["One. Two.", "Three.", "Four.", "Five."]
    assert rows[2]["meta"] == {"id": 7, "chunk": 2, "chunks": 4, "chunk_start": 17, "chunk_end": 22}
    assert rows[2]["provenance"] == {"source": str(docs), "line": 1, "chunk": 2}
    assert report.rejected == {"empty": 1} and report.records_in == report.passed + report.rejected_total


def test_convert_chunks_in_tokens(tmp_path):
    from hone.data.chunk import load_size
    from hone.models.tiny import build_tokenizer

    tok = build_tokenizer()
    tiny_model_dir = tmp_path / "tok"
    tok.save_pretrained(tiny_model_dir)
    out = tmp_path / "chunks.jsonl"
    convert([FIXTURES / "faq.md"], out, ConvertOptions(to="chunks", chunk_unit="tokens", chunk_size=40,
                                                       chunk_overlap=10, tokenizer=str(tiny_model_dir)))
    sizes = [len(tok.encode(r["text"], add_special_tokens=False)) for r in _rows(out)]
    assert len(sizes) > 3 and max(sizes) <= 40 and load_size("chars", "unused") is len


# --- chat ----------------------------------------------------------------------------------------------------

def test_is_agent_matches_addresses_domains_and_slack_users():
    assert is_agent({"from": "Bob <Bob@Acme.com>"}, ["@acme.com"])
    assert is_agent({"from": "bob@acme.com"}, ["bob@acme.com"])
    assert not is_agent({"from": "bob@notacme.com.evil.org"}, ["@acme.com"])
    assert not is_agent({"from": "ana@example.org"}, ["@acme.com", "dana"])
    assert is_agent({"user": "U9", "user_name": "Dana"}, ["dana"]) and is_agent({"user": "U9"}, ["U9"])


def test_parse_time_formats():
    assert parse_time("1712000000.000100") == pytest.approx(1712000000.0001)
    assert parse_time("2024-03-01T10:00:00Z") == parse_time("Fri, 01 Mar 2024 10:00:00 +0000") == 1709287200.0
    assert parse_time("next tuesday") is None and parse_time(None) is None


def test_build_conversation_trims_merges_and_rejects():
    m = [Member(0, "", {"source": "f", "line": 1}, turns=[("user", "q1")], time=1),
         Member(1, "", {"source": "f", "line": 2}, turns=[("assistant", "a1")], time=2),
         Member(2, "", {"source": "f", "line": 3}, turns=[("user", "q2")], time=3),
         Member(3, "", {"source": "f", "line": 4}, turns=[("user", "q3")], time=4),
         Member(4, "", {"source": "f", "line": 5}, turns=[("assistant", "a2")], time=5),
         Member(5, "", {"source": "f", "line": 6}, turns=[("user", "thanks")], time=6)]
    [conv], rejects = build_conversation(list(reversed(m)), system="Be kind.")
    assert [(x["role"], x["content"]) for x in conv["messages"]] == [
        ("system", "Be kind."), ("user", "q1"), ("assistant", "a1"), ("user", "q2\n\nq3"), ("assistant", "a2")]
    assert {k: r.code for k, r in rejects.items()} == {5: "after_last_agent_reply"}
    assert conv["provenance"] == {"source": "f", "line": 1}
    produced, rejects = build_conversation(m[:1])
    assert produced == [] and rejects[0].code == "no_agent_reply"


def test_convert_chat_stage_counts_every_record(tmp_path):
    out = tmp_path / "chat.jsonl"
    report = convert([FIXTURES / "threads.jsonl"], out,
                     ConvertOptions(to="chat", agents=["@acme.com", "dana"], system="You are Acme support."))
    assert (report.records_in, report.passed, report.records_out) == (11, 7, 2)
    assert report.rejected == {"after_last_agent_reply": 1, "agent_before_customer": 1, "no_agent_reply": 1,
                               "no_thread": 1}
    email, slack = _rows(out)
    assert [x["role"] for x in email["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert email["messages"][3]["content"] == "Thanks! When will I see it?\n\nAlso, can I get an invoice?"
    assert email["provenance"] == {"source": str(FIXTURES / "threads.jsonl"), "line": 1}
    assert [x["content"] for x in slack["messages"][1:]] == ["Does anyone know if the API is down?",
                                                            "Yes, we are on it, back in 10 minutes."]
    assert sorted(_codes(out)) == sorted(report.rejected)
    assert json.loads(report_path(out).read_text())["details"]["groups"] == 3


def test_convert_chat_needs_an_agent(tmp_path):
    with pytest.raises(ConvertError, match="--agent"):
        convert([FIXTURES / "threads.jsonl"], tmp_path / "x.jsonl", ConvertOptions(to="chat"))


def test_ticket_rows_with_messages_join_their_thread(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Login fails"}, {"role": "assistant", "content": "Reset it"}],
             "meta": {"thread": "T-1", "created_at": "2024-01-02"}},
            {"text": "It worked, thanks", "meta": {"thread": "T-1", "customer": "x", "created_at": "2024-01-03"}},
            {"messages": [{"role": "user", "content": "Still?"}, {"role": "assistant", "content": "Fixed."}],
             "meta": {"thread": "T-1", "created_at": "2024-01-04"}}]
    src = tmp_path / "tickets.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "c.jsonl"
    report = convert([src], out, ConvertOptions(to="chat", agents=["support@acme.com"]))
    [conv] = _rows(out)
    assert [m["content"] for m in conv["messages"]] == ["Login fails", "Reset it", "It worked, thanks\n\nStill?",
                                                       "Fixed."]
    assert report.passed == 3 and report.rejected == {}


# --- routing -------------------------------------------------------------------------------------------------

def test_convert_routing(tmp_path):
    src = tmp_path / "labels.csv"
    src.write_text("text,label\nmy card was charged twice,billing\nwhere is my parcel,shipping\n"
                   "cannot sign in,login\n,billing\nhello,\n")
    out = tmp_path / "r.jsonl"
    report = convert([src], out, ConvertOptions(to="routing"))
    rows = _rows(out)
    assert rows[0]["messages"][0]["content"].startswith(
        "Classify the customer message into exactly one of these categories: billing, login, shipping.")
    assert [m["content"] for m in rows[0]["messages"][1:]] == ["my card was charged twice", "billing"]
    assert rows[0]["label"] == "billing" and report.rejected == {"not_labeled": 2}
    out2 = tmp_path / "r2.jsonl"
    fixed = convert([src], out2, ConvertOptions(to="routing", labels=["billing", "login"], instruction="Pick: {labels}"))
    assert _rows(out2)[0]["messages"][0]["content"] == "Pick: billing, login"
    assert fixed.rejected == {"not_labeled": 2, "unknown_label": 1}


# --- preference ----------------------------------------------------------------------------------------------

def test_preference_pairs_best_worst_and_all():
    ms = [Member(i, t, {"source": "r", "line": i + 1}, rating=r, prompt="p")
          for i, (t, r) in enumerate([("good", 5), ("bad", 1), ("ok", 4), ("ok2", 4)])]
    pairs, rejects = preference_pairs(ms)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("good", "bad")]
    assert {k: r.code for k, r in rejects.items()} == {2: "middle_rating", 3: "middle_rating"}
    pairs, rejects = preference_pairs(ms, "all", min_margin=1)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("good", "ok"), ("good", "ok2"), ("good", "bad"),
                                                             ("ok", "bad"), ("ok2", "bad")]
    assert rejects == {}
    pairs, rejects = preference_pairs(ms, "all", min_margin=2)
    assert len(pairs) == 3 and rejects == {}
    pairs, rejects = preference_pairs(ms, "all", min_margin=5)
    assert pairs == [] and {r.code for r in rejects.values()} == {"no_margin"}


def test_convert_preference_stage(tmp_path):
    out = tmp_path / "p.jsonl"
    report = convert([FIXTURES / "ratings.jsonl"], out, ConvertOptions(to="preference"))
    [pair] = _rows(out)
    assert pair["prompt"] == "How do I reset my password?"
    assert (pair["chosen"], pair["rejected"]) == ("Open Settings > Security > Reset password.", "Ask someone.")
    assert pair["meta"]["chosen_rating"] == 5 and pair["provenance"]["line"] == 1
    assert report.rejected == {"middle_rating": 1, "no_margin": 2, "single_answer": 1, "bad_rating": 1}
    assert (report.records_in, report.passed) == (7, 2)


# --- CLI -----------------------------------------------------------------------------------------------------

def test_cli_convert(tmp_path):
    from hone.cli import app

    runner = CliRunner()
    out = tmp_path / "chat.jsonl"
    result = runner.invoke(app, ["data", "convert", str(FIXTURES / "threads.jsonl"), "--out", str(out),
                                 "--to", "chat", "--agent", "@acme.com", "--agent", "dana"])
    assert result.exit_code == 0, result.output
    assert "in 11 = passed 7 + rejected 4" in result.output
    bad = runner.invoke(app, ["data", "convert", str(FIXTURES / "threads.jsonl"), "--out", str(out), "--to", "chat"])
    assert bad.exit_code == 2 and "--agent" in bad.output
    bad = runner.invoke(app, ["data", "convert", str(FIXTURES / "faq.md"), "--out", str(out), "--to", "poem"])
    assert bad.exit_code == 2 and "--to" in bad.output
