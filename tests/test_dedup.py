"""`hone data dedup`: exact and near duplicates with the right kept record, contamination, report, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hone.cli import app
from hone.data.dedup import DedupOptions, dedup, normalise, record_key_text, shingles
from hone.data.stage import rejects_path, report_path

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zu", "pe", "da", "fi"]


def _text(seed: int, n: int = 60) -> list[str]:
    """n distinct pseudo-words: every word 3-gram of the text is distinct, so Jaccard is easy to compute."""
    rng = random.Random(seed)
    vocab = sorted({a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES})
    return rng.sample(vocab, n)


BASE = _text(1)
ONE_WORD_CHANGED = BASE[:30] + ["changed"] + BASE[31:]  # 3 of 58 shingles differ: J = 55/61 = 0.902
REWORDED = [w if i % 4 else "other" for i, w in enumerate(BASE)]  # every shingle touched: J = 0


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _rejects(out: Path) -> list[dict]:
    return [json.loads(x) for x in rejects_path(out).read_text().splitlines()]


def _kept_lines(out: Path) -> list[int]:
    return [json.loads(x)["provenance"]["line"] for x in out.read_text().splitlines()]


def test_normalised_key_and_shingles():
    assert normalise("  Hello,  WORLD!\n(it's) Straße ") == "hello world it s strasse"
    assert record_key_text({"prompt": "Hi!", "completion": "Yo."}) == "hi \x1f yo"
    assert record_key_text({"text": "👍"}) == "👍"  # nothing left after normalising: raw text
    assert shingles("a b c d e f g h", words=3, short_words=8) == {b"a b c", b"b c d", b"c d e", b"d e f",
                                                                  b"e f g", b"f g h"}
    assert shingles("abcdefg", short_words=8) == {b"abcde", b"bcdef", b"cdefg"}  # short: character 5-grams
    assert shingles("abc") == {b"abc"} and shingles("") == set()


def test_exact_near_conflicting_and_paraphrase(tmp_path):
    src = _write(tmp_path / "in.jsonl", [
        {"text": " ".join(BASE), "label": "a"},                       # 1 kept
        {"text": " ".join(BASE).upper() + " !!", "label": "a"},       # 2 exact duplicate of 1
        {"text": " ".join(ONE_WORD_CHANGED), "label": "a"},           # 3 near duplicate of 1
        {"text": " ".join(REWORDED), "label": "a"},                   # 4 paraphrase: kept
        {"text": " ".join(BASE), "label": "b"},                       # 5 same text, other label
        "{broken",                                                    # 6 unreadable
        {"messages": [{"role": "user", "content": "Reset my password"},
                      {"role": "assistant", "content": "Use the link."}]},  # 7 kept
        {"prompt": "reset my PASSWORD", "completion": "use the link"},      # 8 exact duplicate of 7
    ])
    out = tmp_path / "dedup.jsonl"
    report = dedup([src], out, DedupOptions())
    assert report.records_in == 8 == report.passed + report.rejected_total
    assert report.rejected == {"duplicate": 2, "near_duplicate": 1, "conflicting_label": 1, "invalid_json": 1}
    assert _kept_lines(out) == [1, 4, 7]
    rejects = {r["line"]: r for r in _rejects(out)}
    assert rejects[2]["code"] == "duplicate" and f"{src}:1" in rejects[2]["message"]
    assert rejects[3]["code"] == "near_duplicate" and f"of {src}:1 " in rejects[3]["message"]
    assert rejects[5]["code"] == "conflicting_label" and "'b' (kept: 'a')" in rejects[5]["message"]
    assert rejects[8]["code"] == "duplicate" and f"{src}:7" in rejects[8]["message"]
    clusters = {c["kept"]: c for c in report.details["clusters"]}
    assert report.details["clusters_total"] == 2 and set(clusters) == {f"{src}:1", f"{src}:7"}
    first = clusters[f"{src}:1"]
    assert first["dropped_total"] == 3 and first["label"] == "a"
    by_line = {d["where"]: d for d in first["dropped"]}
    assert by_line[f"{src}:2"]["similarity"] == 1.0
    assert by_line[f"{src}:3"]["similarity"] == pytest.approx(55 / 61, abs=0.08)  # estimate of the true J
    assert by_line[f"{src}:5"] == {"where": f"{src}:5", "similarity": 1.0, "code": "conflicting_label", "label": "b"}


def test_threshold_and_near_off(tmp_path):
    src = _write(tmp_path / "in.jsonl", [{"text": " ".join(BASE)}, {"text": " ".join(ONE_WORD_CHANGED)}])
    assert dedup([src], tmp_path / "a.jsonl", DedupOptions(threshold=0.97)).passed == 2
    assert dedup([src], tmp_path / "b.jsonl", DedupOptions(near=False)).passed == 2
    report = dedup([src], tmp_path / "c.jsonl", DedupOptions(num_perm=64))
    assert report.rejected == {"near_duplicate": 1}


def test_report_caps_clusters_but_counts_all(tmp_path):
    rows = [{"text": " ".join(_text(s))} for s in (1, 2, 3)] * 2
    src = _write(tmp_path / "in.jsonl", rows)
    report = dedup([src], tmp_path / "out.jsonl", DedupOptions(max_report_clusters=2))
    assert report.rejected == {"duplicate": 3}
    assert report.details["clusters_total"] == 3 and report.details["clusters_listed"] == 2
    saved = json.loads(report_path(tmp_path / "out.jsonl").read_text())
    assert [c["kept"] for c in saved["details"]["clusters"]] == [f"{src}:1", f"{src}:2"]


@pytest.mark.parametrize("keep", [False, True])
def test_contamination_dropped_or_flagged(tmp_path, keep):
    eval_file = _write(tmp_path / "eval.jsonl", [{"text": "unrelated question about invoices", "label": "x"},
                                                 {"text": " ".join(BASE), "label": "x"}, "{bad"])
    src = _write(tmp_path / "train.jsonl", [
        {"text": " ".join(ONE_WORD_CHANGED), "label": "a"},   # near copy of eval line 2
        {"text": " ".join(_text(7)), "label": "a"},           # clean
        {"text": "Unrelated question, about INVOICES!"},      # exact copy of eval line 1
    ])
    out = tmp_path / "out.jsonl"
    report = dedup([src], out, DedupOptions(eval_files=[eval_file], keep_contaminated=keep))
    c = report.details["contamination"]
    assert (c["eval_records"], c["eval_unique"], c["eval_unreadable"], c["matches_total"],
            c["eval_records_matched"]) == (2, 2, 1, 2, 2)
    assert [(m["where"], m["eval"]) for m in c["matches"]] == [(f"{src}:1", f"{eval_file}:2"),
                                                               (f"{src}:3", f"{eval_file}:1")]
    if keep:
        assert report.rejected == {} and _kept_lines(out) == [1, 2, 3]
        assert {m["action"] for m in c["matches"]} == {"flagged"}
    else:
        assert report.rejected == {"contaminated": 2} and _kept_lines(out) == [2]
        rejects = _rejects(out)
        assert [r["code"] for r in rejects] == ["contaminated"] * 2
        assert f"{eval_file}:2" in rejects[0]["message"] and f"{eval_file}:1" in rejects[1]["message"]
    # The eval file is part of the lineage: changing it changes what the output means.
    assert str(eval_file) in [i["path"] for i in report.lineage["inputs"]]


def test_cli_dedup(tmp_path):
    src = _write(tmp_path / "in.jsonl", [{"text": "Hello world"}, {"text": "hello, world"}, {"text": "bye now"}])
    ev = _write(tmp_path / "eval.jsonl", [{"text": "Bye now!"}])
    out = tmp_path / "out.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["data", "dedup", str(src), "--out", str(out), "--eval", str(ev)])
    assert result.exit_code == 0, result.output
    assert "in 3 = passed 1 + rejected 2" in result.output and "contamination: 1 records" in result.output
    result = runner.invoke(app, ["data", "dedup", str(src), "--out", str(out), "--eval", str(ev),
                                 "--keep-contaminated", "--threshold", "0.9", "--num-perm", "64"])
    assert result.exit_code == 0 and "in 3 = passed 2 + rejected 1 (duplicate 1)" in result.output
    bad = runner.invoke(app, ["data", "dedup", str(src), "--out", str(out), "--threshold", "1.5"])
    assert bad.exit_code == 2 and "--threshold" in bad.output
    missing = runner.invoke(app, ["data", "dedup", str(src), "--out", str(out), "--eval", str(tmp_path / "no.jsonl")])
    assert missing.exit_code == 2 and "no.jsonl" in missing.output
