"""split_records: deterministic (across processes too), stratified, order-preserving, capped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from hone.data.split import split_records
from hone.records import Conversation, Message


def conv(i: int, label: str | None = None) -> Conversation:
    return Conversation([Message("user", f"question {i}"), Message("assistant", label or f"answer {i}")],
                        source="d.jsonl", line=i + 1, label=label, shape="label" if label else "completion")


def labelled(counts: dict[str, int]) -> list[Conversation]:
    out, i = [], 0
    for label, n in counts.items():
        for _ in range(n):
            out.append(conv(i, label))
            i += 1
    return out


def lines(records):
    return [r.line for r in records]


def test_same_input_same_split_and_order_preserved():
    records = [conv(i) for i in range(100)]
    train, held = split_records(records, 0.2, seed=3)
    assert (lines(train), lines(held)) == tuple(map(lines, split_records(records, 0.2, seed=3)))
    assert len(held) == 20
    assert lines(train) == sorted(lines(train)) and lines(held) == sorted(lines(held))


def test_no_overlap_and_union_is_the_input():
    records = [conv(i) for i in range(57)]
    train, held = split_records(records, 0.3, seed=0)
    assert not set(map(id, train)) & set(map(id, held))
    assert sorted(lines(train + held)) == lines(records)


def test_seed_changes_the_split_and_content_not_position_decides():
    records = [conv(i) for i in range(200)]
    _, held0 = split_records(records, 0.1, seed=0)
    _, held1 = split_records(records, 0.1, seed=1)
    assert lines(held0) != lines(held1)
    _, held_rev = split_records(list(reversed(records)), 0.1, seed=0)
    assert sorted(lines(held_rev)) == lines(held0)


def test_split_is_the_same_in_another_process():
    script = (
        "import json\n"
        "from hone.data.split import split_records\n"
        "from hone.records import Conversation, Message\n"
        "recs = [Conversation([Message('user', f'question {i}'), Message('assistant', 'l%d' % (i % 3))],"
        " line=i + 1, label='l%d' % (i % 3)) for i in range(90)]\n"
        "train, held = split_records(recs, 0.2, seed=7)\n"
        "print(json.dumps([r.line for r in held]))\n")
    records = [Conversation([Message("user", f"question {i}"), Message("assistant", "l%d" % (i % 3))],
                            line=i + 1, label="l%d" % (i % 3)) for i in range(90)]
    _, held = split_records(records, 0.2, seed=7)
    for hash_seed in ("1", "2"):  # different str hashing in the child proves hash() plays no part
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
        assert json.loads(out.stdout) == lines(held)


def test_stratified_by_label():
    records = labelled({"big": 100, "mid": 20, "small": 3, "pair": 2, "single": 1})
    train, held = split_records(records, 0.1, seed=0)
    held_counts, train_counts = Counter(r.label for r in held), Counter(r.label for r in train)
    assert held_counts == {"big": 10, "mid": 2, "small": 1, "pair": 1}
    assert train_counts == {"big": 90, "mid": 18, "small": 2, "pair": 1, "single": 1}


def test_high_fraction_never_holds_out_a_whole_label():
    records = labelled({"a": 3, "b": 2})
    train, held = split_records(records, 0.9, seed=0)
    assert Counter(r.label for r in held) == {"a": 2, "b": 1}
    assert Counter(r.label for r in train) == {"a": 1, "b": 1}


def test_max_held_out_returns_extras_to_train_and_keeps_labels_represented():
    records = labelled({"a": 300, "b": 100, "c": 10})
    train, held = split_records(records, 0.5, seed=0, max_held_out=20)
    counts = Counter(r.label for r in held)
    assert len(held) == 20 and set(counts) == {"a", "b", "c"}
    assert counts["a"] > counts["b"] > 0
    assert len(train) == len(records) - 20
    # Capping only moves records back to train: the capped held-out set is a subset of the uncapped one.
    _, uncapped = split_records(records, 0.5, seed=0)
    assert set(map(id, held)) <= set(map(id, uncapped))


def test_max_held_out_smaller_than_label_count():
    records = labelled({"a": 10, "b": 10, "c": 10})
    _, held = split_records(records, 0.5, seed=0, max_held_out=2)
    assert len(held) == 2


def test_tiny_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        split_records([conv(0)], 0.1, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        split_records([], 0.1, seed=0)
    train, held = split_records([conv(0), conv(1)], 0.01, seed=0)
    assert len(train) == 1 and len(held) == 1
    # Labels with a single record each: nothing can be held out, and that is not an error.
    train, held = split_records([conv(0, "a"), conv(1, "b")], 0.5, seed=0)
    assert len(train) == 2 and held == []


def test_bad_arguments():
    records = [conv(i) for i in range(5)]
    for fraction in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            split_records(records, fraction, seed=0)
    with pytest.raises(ValueError, match="max_held_out"):
        split_records(records, 0.5, seed=0, max_held_out=0)


def test_dict_records_and_identical_records():
    records = [{"text": "same", "label": "x"}] * 4 + [{"text": f"t{i}", "label": "y"} for i in range(4)]
    train, held = split_records(records, 0.5, seed=0)
    assert Counter(r["label"] for r in held) == {"x": 2, "y": 2} and len(train) == 4
