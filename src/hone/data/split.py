"""Carve a deterministic held-out set from training records.

`split_records(records, fraction, seed)` ranks records by a SHA-256 hash of their content and the seed
(never Python's `hash()`, which changes between processes), so the same data and seed give the same split
on any machine, in any process, whatever order the file was in. When records carry labels the split is
stratified: each label keeps about `fraction` of its records held out, at least one when it has two or
more, and never all of them, so evaluation sees every class and training loses none.

    train, held_out = split_records(report.records, cfg.data.validation_fraction, cfg.train.seed,
                                    max_held_out=cfg.data.max_validation)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, TypeVar

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
