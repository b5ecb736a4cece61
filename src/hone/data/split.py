"""Carve a deterministic held-out set from training records.

`split_records(records, fraction, seed)` ranks records by a SHA-256 hash of their content and the seed
(never Python's `hash()`, which changes between processes), so the same data and seed give the same split
on any machine, in any process, whatever order the file was in. When records carry labels the split is
stratified: each label keeps about `fraction` of its records held out, at least one when it has two or
more, and never all of them, so evaluation sees every class and training loses none.

    train, held_out = split_records(report.records, cfg.data.validation_fraction, cfg.train.seed,
                                    max_held_out=cfg.data.max_validation)

`split(inputs, out_dir, SplitOptions(validation=0.1, test=0.1))` is `hone data split`: the same ranking over
record files, streamed, into train/validation/test files.
"""

from __future__ import annotations

import hashlib
import json
import time
from array import array
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hone.data.readers import DataError
from hone.data.stage import (AtomicWriter, StageReport, lineage, read_records, reject_line,
                             write_json_atomic)
from hone.records import Problem

T = TypeVar("T")


def split_records(records: Iterable[T], fraction: float, seed: int,
                  max_held_out: int | None = None) -> tuple[list[T], list[T]]:
    """Split records into (train, held_out); each part keeps the input order.

    Within each label (or the whole set, when records have no labels) the `round(n * fraction)` records
    with the lowest content hashes are held out, clamped to [1, n - 1] for n >= 2 (a label with a single
    record stays in train). `max_held_out` caps the held-out set: the cap is shared between labels in
    proportion to their held-out counts, every label keeping at least one while the cap allows, and the
    records over the cap RETURN TO TRAIN (nothing is silently dropped; train grows by that many).

    Records are Conversations (hashed by `to_json()`: messages and label, not source or line) or plain
    dicts. Raises ValueError for fewer than 2 records or a fraction outside (0, 1).
    """
    records = list(records)
    if len(records) < 2:
        raise ValueError(f"cannot carve a held-out split from {len(records)} record(s): need at least 2; "
                         "add data or give a separate validation file")
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be between 0 and 1 (exclusive), got {fraction}")
    if max_held_out is not None and max_held_out < 1:
        raise ValueError(f"max_held_out must be at least 1, got {max_held_out}")
    scores = [_score(r, seed) for r in records]
    groups = _group_by_label(records)
    quotas = {g: _held_out_count(len(ix), fraction) for g, ix in groups.items()}
    if max_held_out is not None:
        quotas = _cap_quotas(quotas, max_held_out)
    held: set[int] = set()
    for g, ix in groups.items():
        ranked = sorted(ix, key=lambda i: (scores[i], i))  # index breaks ties between identical records
        held.update(ranked[:quotas[g]])
    train = [r for i, r in enumerate(records) if i not in held]
    held_out = [r for i, r in enumerate(records) if i in held]
    return train, held_out


def _score(record: Any, seed: int) -> bytes:
    content = record.to_json() if hasattr(record, "to_json") else record
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(f"{seed}\0{text}".encode("utf-8")).digest()


def _label_of(record: Any) -> str | None:
    label = record.get("label") if isinstance(record, dict) else getattr(record, "label", None)
    return None if label is None else str(label)


def _group_by_label(records: list) -> dict[str | None, list[int]]:
    """Indices per label (None: no label); a set without labels is one group."""
    groups: dict[str | None, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(_label_of(r), []).append(i)
    return groups


def _held_out_count(n: int, fraction: float) -> int:
    if n < 2:
        return 0
    return min(max(int(n * fraction + 0.5), 1), n - 1)


def _group_order(g: str | None) -> tuple[bool, str]:
    return (g is None, g or "")


def _cap_quotas(quotas: dict[str | None, int], cap: int) -> dict[str | None, int]:
    """Share `cap` held-out places between groups in proportion to their quotas (largest remainder)."""
    total = sum(quotas.values())
    if total <= cap:
        return quotas
    order = sorted(quotas, key=_group_order)
    share = {g: cap * quotas[g] / total for g in order}
    out = {g: int(share[g]) for g in order}
    live = [g for g in order if quotas[g] > 0]
    if cap >= len(live):
        # A label absent from evaluation is invisible there; keep each one while the cap allows it.
        for g in live:
            out[g] = max(out[g], 1)
    while sum(out.values()) < cap:
        g = max((g for g in order if out[g] < quotas[g]), key=lambda g: share[g] - out[g])
        out[g] += 1
    while sum(out.values()) > cap:  # only when the minimum of one pushed past the cap
        g = max((g for g in order if out[g] > 1), key=lambda g: out[g] - share[g])
        out[g] -= 1
    return out


# --- `hone data split`: files in, train/validation/test files out ---------------------------------------

class SplitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    validation: float = Field(0.1, ge=0, lt=1, description="Fraction of each label's records for validation.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of each label's records for the test set.")
    seed: int = Field(0, description="Changes which records go where; the same seed gives the same split.")
    stratify: bool = Field(True, description="Keep each label's share in every split (records with a `label`).")


def split(inputs: list[Path], out: Path, options: SplitOptions) -> StageReport:
    """Write OUT/train.jsonl, OUT/validation.jsonl, OUT/test.jsonl (empty splits are not written), plus
    OUT/split.rejects.jsonl and OUT/split.report.json.

    Two streaming passes: the first keeps only a 32-byte hash and a label per record, the second routes
    each record to its file, so memory does not grow with record size. Within each label the records
    with the lowest hashes go to test, the next to validation: exact per-label proportions, and each
    label with enough records appears in every split.
    """
    if options.validation + options.test >= 1:
        raise DataError(f"split fractions leave nothing to train on: validation {options.validation} + "
                        f"test {options.test} >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # 12 bytes a record (8 of hash, 4 of label id) in flat arrays: 3M records cost 36 MB, not 400.
    scores, label_ids, label_index = array("Q"), array("i"), {}
    for item in read_records(inputs):
        if not isinstance(item, Problem):
            scores.append(int.from_bytes(_score(_content(item), options.seed)[:8], "big"))
            label = _label_of(item) if options.stratify else None
            label_ids.append(label_index.setdefault(label, len(label_index)))
    assignment = _assign_splits(scores, label_ids, options.validation, options.test)
    report = StageReport(stage="split", output=str(out))
    counts = {name: 0 for name in SPLIT_NAMES}
    per_label: dict[str, dict[str, int]] = {}
    started, i = time.perf_counter(), 0
    names = [n for n in SPLIT_NAMES if n == "train" or getattr(options, n) > 0]
    writers = {n: AtomicWriter(out / f"{n}.jsonl") for n in names}
    rejected: dict[str, int] = {}
    with ExitStack() as stack:
        files = {n: stack.enter_context(w) for n, w in writers.items()}
        refused = stack.enter_context(AtomicWriter(out / "split.rejects.jsonl"))
        for item in read_records(inputs):
            report.records_in += 1
            if isinstance(item, Problem):
                rejected[item.code] = rejected.get(item.code, 0) + 1
                refused.write(reject_line(item.code, item.message, source=item.source, line=item.line,
                                          raw=item.raw))
                continue
            name = SPLIT_NAMES[assignment[i]]
            i += 1
            files[name].write(json.dumps(item, ensure_ascii=False) + "\n")
            counts[name] += 1
            label = _label_of(item)
            per_label.setdefault(label or "(none)", {n: 0 for n in names})[name] += 1
    report.passed = report.records_out = sum(counts.values())
    report.rejected = rejected
    report.seconds = time.perf_counter() - started
    report.details = {"splits": {n: {"records": counts[n], "path": str(out / f"{n}.jsonl")} for n in names},
                      "per_label": per_label if len(per_label) > 1 or "(none)" not in per_label else {}}
    report.lineage = lineage(inputs, options.model_dump(), out / "train.jsonl")
    write_json_atomic(out / "split.report.json", report.to_json())
    return report


SPLIT_NAMES = ("train", "validation", "test")


def _content(record: dict) -> dict:
    """What identifies a record's content for hashing: its shape fields, not where it came from."""
    return {k: v for k, v in record.items() if k not in ("provenance", "meta")}


def _assign_splits(scores: array, label_ids: array, validation: float, test: float) -> np.ndarray:
    """Per record, 0 (train), 1 (validation) or 2 (test): within each label, the lowest hashes go to test,
    the next to validation (ties broken by position)."""
    score = np.frombuffer(scores, dtype=np.uint64) if len(scores) else np.zeros(0, np.uint64)
    labels = np.frombuffer(label_ids, dtype=np.int32) if len(label_ids) else np.zeros(0, np.int32)
    assignment = np.zeros(len(score), dtype=np.int8)
    for label in np.unique(labels):
        ix = np.flatnonzero(labels == label)
        ranked = ix[np.lexsort((ix, score[ix]))]
        n_test, n_val = _three_way_counts(len(ranked), validation, test)
        assignment[ranked[:n_test]] = 2
        assignment[ranked[n_test:n_test + n_val]] = 1
    return assignment


def _three_way_counts(n: int, validation: float, test: float) -> tuple[int, int]:
    """(test, validation) counts for a group of n: rounded shares, at least one each when the group
    is big enough to give one to every split, and never all of the group."""
    n_test, n_val = int(n * test + 0.5), int(n * validation + 0.5)
    # Test first, then validation: each asked-for split gets one record while training keeps at least one.
    if test > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    if validation > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    while n_test + n_val > n - 1 and (n_test or n_val):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val
