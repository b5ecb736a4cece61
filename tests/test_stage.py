"""The stage runner: counts add up, rejects keep the record, outputs are atomic, lineage chains."""

from __future__ import annotations

import json

import pytest

from hone.data.stage import (Reject, map_texts, read_records, record_texts, rejects_path, report_path,
                             run_stage)


def _write(path, lines):
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _upper_or_reject(record):
    if "bad" in record.get("text", ""):
        return Reject("has_bad", "text says bad")
    if "twice" in record.get("text", ""):
        return [map_texts(record, str.upper)] * 2
    return [map_texts(record, str.upper)]


def test_counts_rejects_and_provenance(tmp_path):
    src = _write(tmp_path / "in.jsonl", ['{"text": "ok", "label": "a"}\n', "{broken\n",
                                         '{"text": "bad one"}\n', '{"text": "twice"}\n'])
    out = tmp_path / "out" / "clean.jsonl"
    report = run_stage("clean", read_records([src]), out, _upper_or_reject, config={"x": 1}, inputs=[src])
    assert (report.records_in, report.passed, report.records_out) == (4, 2, 3)
    assert report.rejected == {"invalid_json": 1, "has_bad": 1}
    assert report.records_in == report.passed + report.rejected_total
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0] == {"text": "OK", "label": "a", "provenance": {"source": str(src), "line": 1}}
    rejects = [json.loads(x) for x in rejects_path(out).read_text().splitlines()]
    assert [(r["code"], r["line"]) for r in rejects] == [("invalid_json", 2), ("has_bad", 3)]
    assert rejects[1]["record"]["text"] == "bad one"  # nothing good (or bad) is lost
    saved = json.loads(report_path(out).read_text())
    assert saved["counts"]["arithmetic"].startswith("in 4 = passed 2 + rejected 2")
    assert "produced 3 records out" in saved["counts"]["arithmetic"]


def test_lineage_chains_through_stages(tmp_path):
    src = _write(tmp_path / "raw.jsonl", ['{"text": "a"}\n', '{"text": "b"}\n'])
    first = tmp_path / "a.jsonl"
    run_stage("one", read_records([src]), first, lambda r: [r], config={"k": 1}, inputs=[src])
    second = tmp_path / "b.jsonl"
    rep = run_stage("two", read_records([first]), second, lambda r: [r], config={"k": 2}, inputs=[first])
    chain = rep.lineage["inputs"][0]
    assert chain["path"] == str(first)
    assert chain["produced_by"]["inputs"][0]["path"] == str(src)
    assert chain["produced_by"]["config"] == {"k": 1}
    assert rep.lineage["config_sha256"] != chain["produced_by"]["config_sha256"]
    # Provenance survives the second stage: records still point at the raw file.
    assert json.loads(second.read_text().splitlines()[1])["provenance"] == {"source": str(src), "line": 2}


def test_failed_stage_leaves_no_partial_output(tmp_path):
    src = _write(tmp_path / "in.jsonl", ['{"text": "a"}\n', '{"text": "b"}\n'])
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")

    def boom(record):
        if record["text"] == "b":
            raise RuntimeError("crash")
        return [record]

    with pytest.raises(RuntimeError):
        run_stage("x", read_records([src]), out, boom, config={}, inputs=[src])
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_text_helpers_touch_only_text():
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 1}],
           "label": "keep", "system": "sys", "meta": {"customer": "x"}}
    assert record_texts(rec) == ["sys", "hi", "yo"]
    up = map_texts(rec, str.upper)
    assert up["label"] == "keep" and up["meta"] == {"customer": "x"}
    assert [m["content"] for m in up["messages"]] == ["HI", "YO"] and up["messages"][1]["weight"] == 1
    assert rec["messages"][0]["content"] == "hi"  # the input is not modified
