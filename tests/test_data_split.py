"""`hone data split`: deterministic, stratified, counts add up, bad lines go to rejects."""

from __future__ import annotations

import json

import pytest

from hone.data.readers import DataError
from hone.data.split import SplitOptions, _three_way_counts, split


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def labelled(tmp_path):
    lines = [json.dumps({"text": f"message number {i}", "label": ["a", "b", "c"][i % 3] if i < 90 else "rare"})
             for i in range(93)]
    lines.insert(10, "{not json")
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_stratified_three_way_split(tmp_path, labelled):
    report = split([labelled], tmp_path / "out", SplitOptions(validation=0.1, test=0.2, seed=3))
    train, val, test = (_rows(tmp_path / "out" / f"{n}.jsonl") for n in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (64, 10, 19)
    assert report.records_in == 94 and report.rejected == {"invalid_json": 1}
    assert report.records_in == report.passed + report.rejected_total
    for label in "abc":  # 30 each: 6 test, 3 validation, 21 train
        assert [sum(r["label"] == label for r in s) for s in (train, val, test)] == [21, 3, 6]
    # 3 "rare" records: one in each split, so every label is seen everywhere.
    assert [sum(r["label"] == "rare" for r in s) for s in (train, val, test)] == [1, 1, 1]
    texts = [r["text"] for r in train + val + test]
    assert len(set(texts)) == 93  # nothing lost, nothing doubled
    assert train[0]["provenance"]["source"] == str(labelled)
    saved = json.loads((tmp_path / "out" / "split.report.json").read_text())
    assert saved["details"]["per_label"]["rare"] == {"train": 1, "validation": 1, "test": 1}
    assert json.loads((tmp_path / "out" / "split.rejects.jsonl").read_text())["line"] == 11


def test_split_is_deterministic_and_order_free(tmp_path, labelled):
    split([labelled], tmp_path / "one", SplitOptions(seed=1))
    shuffled = tmp_path / "shuffled.jsonl"
    lines = labelled.read_text().splitlines()
    shuffled.write_text("\n".join(reversed(lines)) + "\n")
    split([shuffled], tmp_path / "two", SplitOptions(seed=1))
    split([labelled], tmp_path / "three", SplitOptions(seed=2))
    test_of = lambda d: sorted(r["text"] for r in _rows(tmp_path / d / "test.jsonl"))  # noqa: E731
    assert test_of("one") == test_of("two")
    assert test_of("one") != test_of("three")


def test_unlabelled_and_no_validation(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    report = split([p], tmp_path / "out", SplitOptions(validation=0, test=0.2))
    assert not (tmp_path / "out" / "validation.jsonl").exists()
    assert len(_rows(tmp_path / "out" / "test.jsonl")) == 10 and report.records_out == 50


def test_bad_fractions_name_the_problem(tmp_path, labelled):
    with pytest.raises(DataError, match="nothing to train on"):
        split([labelled], tmp_path / "out", SplitOptions(validation=0.5, test=0.5))


@pytest.mark.parametrize("n,val,test,expected", [(1, .1, .1, (0, 0)), (2, .1, .1, (1, 0)), (3, .1, .1, (1, 1)),
                                                  (10, .1, .2, (2, 1)), (10, 0, .25, (3, 0))])
def test_three_way_counts(n, val, test, expected):
    assert _three_way_counts(n, val, test) == expected
