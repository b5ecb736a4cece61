"""`hone data dedup`: exact and near duplicates with the right kept record, contamination, report, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hone.cli import app
from hone.data import dedup as dedup_module
from hone.data import minhash_index
from hone.data.dedup import (DedupOptions, MinHashIndex, choose_backend, count_near_duplicates, dedup, normalise,
                             record_key_text, shingles)
from hone.data.minhash_index import DiskStore, MemoryStore
from hone.data.readers import DataError
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


@pytest.fixture(params=["memory", "disk"])
def index(request) -> str:
    """Every stage test runs on both index backends: they must give the same results."""
    return request.param


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


def test_exact_near_conflicting_and_paraphrase(tmp_path, index):
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
    report = dedup([src], out, DedupOptions(index=index))
    assert report.records_in == 8 == report.passed + report.rejected_total
    assert report.details["params"]["index"] == index and report.details["params"]["lsh_bands_rows"] == [14, 9]
    assert not list(tmp_path.glob(".hone-dedup-*"))  # the disk index is gone
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


def test_threshold_and_near_off(tmp_path, index):
    src = _write(tmp_path / "in.jsonl", [{"text": " ".join(BASE)}, {"text": " ".join(ONE_WORD_CHANGED)}])
    assert dedup([src], tmp_path / "a.jsonl", DedupOptions(index=index, threshold=0.97)).passed == 2
    assert dedup([src], tmp_path / "b.jsonl", DedupOptions(index=index, near=False)).passed == 2
    report = dedup([src], tmp_path / "c.jsonl", DedupOptions(index=index, num_perm=64))
    assert report.rejected == {"near_duplicate": 1}


def test_report_caps_clusters_but_counts_all(tmp_path, index):
    rows = [{"text": " ".join(_text(s))} for s in (1, 2, 3)] * 2
    src = _write(tmp_path / "in.jsonl", rows)
    report = dedup([src], tmp_path / "out.jsonl", DedupOptions(index=index, max_report_clusters=2))
    assert report.rejected == {"duplicate": 3}
    assert report.details["clusters_total"] == 3 and report.details["clusters_listed"] == 2
    saved = json.loads(report_path(tmp_path / "out.jsonl").read_text())
    assert [c["kept"] for c in saved["details"]["clusters"]] == [f"{src}:1", f"{src}:2"]


@pytest.mark.parametrize("keep", [False, True])
def test_contamination_dropped_or_flagged(tmp_path, index, keep):
    eval_file = _write(tmp_path / "eval.jsonl", [{"text": "unrelated question about invoices", "label": "x"},
                                                 {"text": " ".join(BASE), "label": "x"}, "{bad"])
    src = _write(tmp_path / "train.jsonl", [
        {"text": " ".join(ONE_WORD_CHANGED), "label": "a"},   # near copy of eval line 2
        {"text": " ".join(_text(7)), "label": "a"},           # clean
        {"text": "Unrelated question, about INVOICES!"},      # exact copy of eval line 1
    ])
    out = tmp_path / "out.jsonl"
    report = dedup([src], out, DedupOptions(index=index, eval_files=[eval_file], keep_contaminated=keep))
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
    result = runner.invoke(app, ["data", "dedup", str(src), "--out", str(out), "--index", "disk"])
    assert result.exit_code == 0 and "in 3 = passed 2 + rejected 1 (duplicate 1)" in result.output
    assert json.loads(report_path(out).read_text())["details"]["params"]["index"] == "disk"
    bad = runner.invoke(app, ["data", "dedup", str(src), "--out", str(out), "--index", "cloud"])
    assert bad.exit_code == 2 and "--index" in bad.output
    bad = runner.invoke(app, ["data", "dedup", str(src), "--out", str(out), "--threshold", "1.5"])
    assert bad.exit_code == 2 and "--threshold" in bad.output
    missing = runner.invoke(app, ["data", "dedup", str(src), "--out", str(out), "--eval", str(tmp_path / "no.jsonl")])
    assert missing.exit_code == 2 and "no.jsonl" in missing.output


def _variants(n_bases: int = 30) -> list[dict]:
    """Records with every kind of duplicate: copies, one to many words changed, label flips, list labels."""
    rng = random.Random(5)
    rows = []
    for b in range(n_bases):
        base = _text(100 + b)
        for v in range(8):
            words = list(base)
            for i in rng.sample(range(len(words)), [0, 0, 1, 2, 3, 6, 10, 40][v]):
                words[i] = "w" + str(rng.randrange(1000))
            label = ["x", "y"] if b % 7 == 0 else rng.choice("aab")
            rows.append({"text": " ".join(words).upper() if v == 1 else " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def test_band_index_finds_exactly_what_minhashlsh_finds(tmp_path, monkeypatch):
    """Our band index (both stores) gives the same candidates as datasketch's MinHashLSH it replaces."""
    from datasketch import MinHashLSH

    monkeypatch.setattr(minhash_index, "_MERGE_MIN", 50)  # exercise merges of the memory table
    lsh = MinHashLSH(threshold=0.8, num_perm=128, weights=(0.1, 0.9))
    stores = [MemoryStore(128), DiskStore(128, tmp_path)]
    indexes = [MinHashIndex(0.8, 128, 1, store) for store in stores]
    sketches = []
    for key, row in enumerate(_variants()):
        sketches.append(indexes[0].minhash(shingles(record_key_text(row))))
        lsh.insert(key, indexes[0]._m, check_duplication=False)
        for index, store in zip(indexes, stores):
            assert store.add(f"f:{key}", None) == key
            index.add(key, sketches[-1])
    assert len(stores[0].bands.hashes) > 0  # some entries were merged into the sorted arrays
    shared = 0
    for key, sketch in enumerate(sketches):
        indexes[0]._m.hashvalues[:] = sketch.signature
        expected = set(lsh.query(indexes[0]._m))
        shared += len(expected) > 1
        assert sketch.bands == minhash_index.band_hashes(sketch.signature, 14, 9)
        for store in stores:
            assert set(store.candidates(sketch.bands)) == expected
            assert np.array_equal(store.signature(key), sketch.signature)
    assert shared > 30  # the variants do collide: the comparison is not vacuous
    stores[1].close()


def test_backends_give_identical_outputs_and_rejects(tmp_path, monkeypatch):
    monkeypatch.setattr(minhash_index, "_MERGE_MIN", 40)
    src = _write(tmp_path / "in.jsonl", _variants())
    outs = {}
    for index in ("memory", "disk"):
        out = tmp_path / index / "out.jsonl"
        report = dedup([src], out, DedupOptions(index=index))
        outs[index] = (out.read_text(), rejects_path(out).read_text(), report.rejected, report.details["clusters"])
    assert outs["memory"] == outs["disk"]
    assert set(outs["memory"][2]) == {"duplicate", "conflicting_label", "near_duplicate"}
    assert outs["memory"][2]["near_duplicate"] >= 40
    assert count_near_duplicates(_variants()) == {"exact_duplicates": outs["memory"][2]["duplicate"],
                                                  "conflicting_labels": outs["memory"][2]["conflicting_label"],
                                                  "near_duplicates": outs["memory"][2]["near_duplicate"]}


def test_disk_index_removed_at_the_end_and_when_the_stage_fails(tmp_path):
    store = DiskStore(64, tmp_path)
    assert store.path.parent == tmp_path and (store.path / "index.sqlite").is_file()
    store.close()
    store.close()  # twice is fine
    assert not store.path.exists()
    src = _write(tmp_path / "in.jsonl", [{"text": "one"}, {"text": "one"}])
    with pytest.raises(DataError, match="missing.jsonl"):
        dedup([src, tmp_path / "missing.jsonl"], tmp_path / "out" / "o.jsonl", DedupOptions(index="disk"))
    assert not list((tmp_path / "out").glob(".hone-dedup-*")) and not list(tmp_path.glob(".hone-dedup-*"))


def test_auto_index_goes_to_disk_for_big_inputs(tmp_path, monkeypatch):
    src = _write(tmp_path / "in.jsonl", [{"text": "one"}, {"text": "two"}])
    assert choose_backend("auto", [src]) == "memory" and choose_backend("disk", [src]) == "disk"
    monkeypatch.setattr(dedup_module, "AUTO_DISK_BYTES", src.stat().st_size - 1)
    assert choose_backend("auto", [src]) == "disk"
    report = dedup([src], tmp_path / "out.jsonl", DedupOptions())
    assert report.details["params"]["index"] == "disk" and report.passed == 2


def test_sigterm_leaves_no_temporary_files(tmp_path):
    """A stopped `hone data dedup --index disk` removes its SQLite index and half-written outputs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "in.jsonl"
    with src.open("w") as f:
        for i in range(60000):
            f.write(json.dumps({"text": f"ticket {i} about order {i * 7} and invoice {i % 97} please help"}) + "\n")
    out = tmp_path / "out" / "dedup.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "hone", "data", "dedup", str(src), "--out", str(out),
                             "--index", "disk"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 60
    while not any(out.parent.glob(".hone-dedup-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "dedup finished before it could be stopped; make the input bigger"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert sorted(p.name for p in out.parent.iterdir()) == []
