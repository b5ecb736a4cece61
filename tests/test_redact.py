"""hone data redact: validators, patterns, recall on the labelled set, modes, the stage and the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hone.data.pii_patterns import (
    PII_TYPES,
    STRUCTURED_TYPES,
    TRIGGERS,
    Found,
    card_ok,
    find_with_patterns,
    iban_ok,
    luhn_ok,
    resolve_overlaps,
    triggered_types,
)
from hone.data.readers import DataError
from hone.data.redact import (
    Detector,
    Pseudonyms,
    RedactOptions,
    RedactState,
    count_pii,
    redact,
    redact_record,
    splice,
)

ROOT = Path(__file__).resolve().parents[1]
LABELLED = ROOT / "tests" / "fixtures" / "data" / "pii" / "labelled.jsonl"
# Written after the patterns, scored once before any fix (see notes/readme_redact.md), then kept as more cases.
HELDOUT = LABELLED.with_name("heldout.jsonl")


def _bench():
    spec = importlib.util.spec_from_file_location("redact_quality", ROOT / "bench" / "redact_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def presidio_detector():
    detector = Detector(RedactOptions())
    if detector.engine != "presidio":
        pytest.skip(f"Presidio does not start here: {detector.engine_note}")
    return detector


@pytest.fixture(scope="module")
def regex_detector():
    return Detector(RedactOptions(engine="regex"))


def _found(detector, text):
    return [(f.type, text[f.start:f.end]) for f in detector.find(text)]


# --- validators and patterns -----------------------------------------------------------------------------

def test_checksums():
    assert luhn_ok("4111 1111 1111 1111") and not luhn_ok("4111 1111 1111 1112")
    assert card_ok("378282246310005") and not card_ok("4532015112830368")  # 16 digits, Luhn fails
    assert not card_ok("0000000000000000")  # Luhn-valid, but no card network starts with 0
    assert iban_ok("GB29 NWBK 6016 1331 9268 19") and not iban_ok("GB28 NWBK 6016 1331 9268 19")


@pytest.mark.parametrize("text,expected", [
    ("card 4532015112830368 is our order id", []),                         # non-Luhn 16 digits
    ("version 1.2.3.4 and v10.0.0.1 crash", []),                            # versions, not IPs
    ("see https://docs.example.com/guide?page=2", []),                      # a plain URL is not PII
    ("at 10:45:12 on 2024-03-15, total $1,299.99", []),                     # times, dates, prices
    ("Password: reset it in the portal", []),                               # a word, not a secret
    ("Hi team,\nall good.\nThanks", []),                                    # greetings without names
    ("ticket TCK-2024-000318 is open", []),                                 # an id, not a phone
    ("reach me: a.b+c@mail.example.org", [("EMAIL", "a.b+c@mail.example.org")]),
    ("to 'bob@x.io' and o'neil@x.io", [("EMAIL", "bob@x.io"), ("EMAIL", "o'neil@x.io")]),
    ("IPv6 fe80::1ff:fe23:4567:890a here", [("IP_ADDRESS", "fe80::1ff:fe23:4567:890a")]),
    ("SSN 536-22-8471, NI AB 12 34 56 C", [("US_SSN", "536-22-8471"), ("UK_NINO", "AB 12 34 56 C")]),
    ("key AKIAIOSFODNN7EXAMPLE", [("SECRET", "AKIAIOSFODNN7EXAMPLE")]),
    ("api_key=4f9d2c81b7e6", [("SECRET", "4f9d2c81b7e6")]),
    ("go to https://x.example.com/r?token=abc123. Thanks", [("URL_WITH_TOKEN", "https://x.example.com/r?token=abc123")]),
    ("Kind regards,\nSarah O'Connor", [("PERSON", "Sarah O'Connor")]),
    ("Regards\nTomás Dvořák", [("PERSON", "Tomás Dvořák")]),
    ("iban de89 3704 0044 0532 0130 00 was", [("IBAN", "de89 3704 0044 0532 0130 00")]),
    ("card 4485.2759.1375.8201 ok", [("CREDIT_CARD", "4485.2759.1375.8201")]),
    ("GitLab glpat-xKq3Rz8vLm2NpW7tYb5c leaked", [("SECRET", "glpat-xKq3Rz8vLm2NpW7tYb5c")]),
    ("link https://e.com/account/reset/MTIz/5k2-9f8e7d6c5b4a3/ expired",
     [("URL_WITH_TOKEN", "https://e.com/account/reset/MTIz/5k2-9f8e7d6c5b4a3/")]),
])
def test_regex_engine_cases(regex_detector, text, expected):
    assert _found(regex_detector, text) == expected


def test_presidio_engine_agrees_on_cases(presidio_detector, regex_detector):
    text = ("Hi Tom,\ncall +1 (415) 555-0132, card 5500-0000-0000-0004, IBAN DE89 3704 0044 0532 0130 00, "
            "mail tom@corp.local.example, from 203.0.113.45; order 4532015112830368, version 1.2.3.4.\n"
            "Best,\nAnna Berg")
    expected = [("PERSON", "Tom"), ("PHONE", "+1 (415) 555-0132"), ("CREDIT_CARD", "5500-0000-0000-0004"),
                ("IBAN", "DE89 3704 0044 0532 0130 00"), ("EMAIL", "tom@corp.local.example"),
                ("IP_ADDRESS", "203.0.113.45"), ("PERSON", "Anna Berg")]
    assert _found(presidio_detector, text) == expected
    assert _found(regex_detector, text) == expected


def test_triggers_are_necessary_conditions():
    """A type whose trigger fails is skipped, so every match any pattern makes must satisfy its trigger."""
    rows = [json.loads(x) for f in (LABELLED, HELDOUT) for x in f.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        for f in find_with_patterns(row["text"], PII_TYPES):
            assert TRIGGERS[f.type].search(row["text"]), (f, row["text"])
        for span in (s for s in row["spans"] if s["type"] in STRUCTURED_TYPES):
            assert span["type"] in triggered_types(row["text"], PII_TYPES), (span, row["text"])


def test_overlaps_longer_span_wins():
    spans = [Found(10, 20, "EMAIL", 1.0), Found(0, 40, "URL_WITH_TOKEN", 0.9), Found(50, 55, "PHONE", 0.7)]
    assert resolve_overlaps(spans) == [Found(0, 40, "URL_WITH_TOKEN", 0.9), Found(50, 55, "PHONE", 0.7)]


# --- quality on the labelled set -------------------------------------------------------------------------

def test_labelled_set_is_valid_and_big_enough():
    rows = _bench().load_labelled(LABELLED)  # raises on bad offsets, unknown types, overlaps
    spans = [s for r in rows for s in r["spans"]]
    assert len(spans) >= 200
    assert {s["type"] for s in spans} == set(PII_TYPES)
    assert sum(not r["spans"] for r in rows) >= 30  # hard negatives


@pytest.mark.parametrize("engine", ["presidio", "regex"])
def test_structured_recall_on_labelled_set(engine, presidio_detector, regex_detector):
    bench = _bench()
    detector = presidio_detector if engine == "presidio" else regex_detector
    result = bench.evaluate(bench.load_labelled(LABELLED) + bench.load_labelled(HELDOUT), detector)
    print(f"\n{engine}:\n" + bench.format_table(result))  # precision is reported, recall is asserted
    for t in STRUCTURED_TYPES:
        assert result[t]["recall"] >= 0.98, (t, result[t])
    assert result["PERSON"]["recall"] >= 0.7  # context patterns only: names without a cue are missed
    assert all(r["precision"] >= 0.9 for r in result.values() if r["precision"] is not None)


# --- modes and records -----------------------------------------------------------------------------------

def test_mask_splice_and_allow_list(regex_detector):
    text = "write to support@ours.com or bob@x.com"
    spans = regex_detector.find(text)
    assert splice(text, spans, lambda f, v: f"<{f.type}>") == "write to <EMAIL> or <EMAIL>"
    allowing = Detector(RedactOptions(engine="regex", allow=[" SUPPORT@ours.com "]))
    assert _found(allowing, text) == [("EMAIL", "bob@x.com")]


def test_pseudonyms_consistent_normalised_and_salted():
    p = Pseudonyms(salt=b"s")
    phone = Found(0, 1, "PHONE", 1.0)
    assert p(phone, "+44 20 7946 0958") == "<PHONE_1>"
    assert p(phone, "+44-20-7946-0958") == "<PHONE_1>"  # same digits, same person
    assert p(phone, "+1 415 555 0132") == "<PHONE_2>"
    assert p(Found(0, 1, "EMAIL", 1.0), "A@B.com") == "<EMAIL_1>"
    assert p(Found(0, 1, "EMAIL", 1.0), "a@b.com") == "<EMAIL_1>"
    assert all(b"0958" not in k and b"a@b" not in k for k in p._numbers)


def test_redact_record_fields_and_drop_mode(regex_detector):
    record = {"messages": [{"role": "user", "content": "I am at 10.0.0.5"},
                           {"role": "assistant", "content": "Noted."}],
              "label": "bob@x.com", "meta": {"email": "bob@x.com"}, "provenance": {"source": "f", "line": 3}}
    state = RedactState(regex_detector, RedactOptions(engine="regex"))
    [out] = redact_record(dict(record), state)
    assert out["messages"][0]["content"] == "I am at <IP_ADDRESS>"
    assert out["label"] == "bob@x.com"  # labels are classes, not text: untouched
    assert out["meta"] == {"email": "<EMAIL>"}  # meta values are redacted like text
    assert out["provenance"] == record["provenance"]
    assert state.records_changed == 1 and state.spans["IP_ADDRESS"] == 1 and state.spans["EMAIL"] == 1
    clean = {"text": "nothing to hide", "provenance": {"source": "f", "line": 4}}
    assert redact_record(clean, state) == [clean]

    drop = RedactState(regex_detector, RedactOptions(engine="regex", mode="drop"))
    victim = {"text": "card 4111 1111 1111 1111, mail a@b.com, a@b.com"}
    rejected = redact_record(victim, drop)
    assert rejected.code == "pii" and "CREDIT_CARD 1" in rejected.message and "EMAIL 2" in rejected.message
    assert victim["text"] == "card <CREDIT_CARD>, mail <EMAIL>, <EMAIL>"  # what the rejects file stores


def test_options_validation():
    assert RedactOptions(types=["national_id", "EMAIL"]).types == ["US_SSN", "UK_NINO", "EMAIL"]
    for bad in ({"mode": "hide"}, {"types": ["PASSPORT"]}, {"threshold": 2}, {"engine": "spacy"}, {"x": 1}):
        with pytest.raises(ValueError):
            RedactOptions(**bad)
    with pytest.raises(DataError, match="neither an installed spaCy package"):
        Detector(RedactOptions(ner_model="/no/such/model"))


def test_count_pii_for_the_card():
    records = [{"text": "mail a@b.com"}, {"text": "none"}, {"prompt": "ip 1.2.3.4", "completion": "ok a@b.com"}]
    assert count_pii(records) == {"EMAIL": 2, "IP_ADDRESS": 1, "records_with_pii": 2}


# --- the stage and the CLI -------------------------------------------------------------------------------

def _input(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "Hi Ann,\\nmail ann@x.com or ann@x.com", "label": "a"}\n{oops\n'
                   '{"text": "call +44 20 7946 0958", "label": "b"}\n{"text": "fine", "label": "c"}\n',
                   encoding="utf-8")
    return src


def test_stage_pseudonym_counts_and_report(tmp_path):
    src = _input(tmp_path)
    out = tmp_path / "red.jsonl"
    report = redact([src], out, RedactOptions(engine="regex", mode="pseudonym"))
    assert (report.records_in, report.passed, report.rejected) == (4, 3, {"invalid_json": 1})
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["text"] == "Hi <PERSON_1>,\nmail <EMAIL_1> or <EMAIL_1>"
    assert rows[1]["text"] == "call <PHONE_1>" and rows[1]["provenance"] == {"source": str(src), "line": 3}
    d = json.loads((tmp_path / "red.report.json").read_text())["details"]
    assert d["engine"] == "regex" and d["records_changed"] == 2
    assert d["spans_found"]["EMAIL"] == 2 and d["spans_found"]["PHONE"] == 1 and d["spans_total"] == 4


def test_stage_drop_mode_rejects_hold_no_raw_pii(tmp_path):
    src = _input(tmp_path)
    out = tmp_path / "red.jsonl"
    report = redact([src], out, RedactOptions(engine="regex", mode="drop", types=["EMAIL", "PHONE"]))
    assert report.rejected == {"invalid_json": 1, "pii": 2} and report.records_out == 1
    rejects = (tmp_path / "red.rejects.jsonl").read_text()
    assert "ann@x.com" not in rejects and "7946" not in rejects and "<EMAIL>" in rejects
    assert json.loads(out.read_text())["text"] == "fine"


def test_cli(tmp_path):
    from hone.cli import app

    src = _input(tmp_path)
    out = tmp_path / "o.jsonl"
    runner = CliRunner()
    res = runner.invoke(app, ["data", "redact", str(src), "--out", str(out), "--engine", "regex",
                              "--types", "EMAIL", "--allow", "ann@x.com"])
    assert res.exit_code == 0, res.output
    assert "in 4 = passed 3 + rejected 1" in res.output
    assert "ann@x.com" in out.read_text() and "7946" in out.read_text()  # allowed; PHONE not asked for
    bad = runner.invoke(app, ["data", "redact", str(src), "--out", str(out), "--types", "EMAIL,PASSPORT"])
    assert bad.exit_code == 2 and "PASSPORT" in bad.output
    missing = runner.invoke(app, ["data", "redact", str(tmp_path / "nope.jsonl"), "--out", str(out),
                                  "--engine", "regex"])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_falls_back_to_regex_when_presidio_cannot_import(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)  # `import presidio_analyzer` now fails
    detector = Detector(RedactOptions())
    assert detector.engine == "regex" and "Presidio unavailable" in detector.engine_note
    assert _found(detector, "mail a@b.com") == [("EMAIL", "a@b.com")]
    with pytest.raises(DataError, match="Presidio cannot start"):
        Detector(RedactOptions(engine="presidio"))


def test_meta_is_redacted_and_known_names_found_in_text(tmp_path):
    from hone.data.redact import RedactOptions, redact

    rows = [{"text": "Hi team, my parcel is late.\n\nAna", "meta": {"from": "Ana Silva <ana.silva@example.com>",
                                                                "thread": "<CAF1.ana@mail.example.com>"}},
            {"text": "Hello Ana, our support team sent it today.",
             "meta": {"from": "Acme Support <help@acme.example>", "thread": "<CAF1.ana@mail.example.com>"}}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    report = redact([src], out, RedactOptions(mode="mask", engine="regex"))
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got[0]["text"].endswith("\n\n<PERSON>") and got[1]["text"].startswith("Hello <PERSON>,")
    assert "support team" in got[1]["text"]  # "Support" is a word these texts use: not taken for a name
    assert "ana" not in json.dumps(got[0]["meta"]).lower()
    # Thread ids are pseudonymised even in mask mode, so the two messages still share a thread.
    assert got[0]["meta"]["thread"] == got[1]["meta"]["thread"] and "EMAIL_" in got[0]["meta"]["thread"]
    assert got[0]["provenance"]["source"] == str(src)
    assert report.details["known_names"] == 3  # Ana, Silva, Acme
