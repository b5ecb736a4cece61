"""Evaluation metrics as pure functions over plain Python values (no torch, no sklearn).

Used by the eval runners to score base and tuned models on held-out data, and by the report to mark
examples correct or not. Conventions follow the references people already trust, so our numbers can be
compared with theirs:

- ``exact_match`` / ``token_f1``: the official SQuAD v1.1 evaluation script (normalise, then compare tokens).
- ``classification_metrics``: scikit-learn's ``precision_recall_fscore_support`` / ``f1_score(average="macro")``
  with ``zero_division=0``, averaging over the labels that occur in gold or predictions.

Every function here is deterministic and cheap; tests compare them to hand-computed cases and to an
independent re-implementation.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

INVALID = "(invalid)"  # confusion-matrix column for answers that matched no label

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_PUNCT_TO_SPACE = str.maketrans({ch: " " for ch in string.punctuation})


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when prediction and reference are equal after SQuAD normalisation, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token-overlap F1 (multiset of normalised tokens). Both empty -> 1.0, one empty -> 0.0."""
    pred_tokens = normalize_answer(pred).split()
    ref_tokens = normalize_answer(ref).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def label_key(s: str) -> tuple[str, ...]:
    """Tokens a label or an answer is compared by.

    Unlike ``normalize_answer`` punctuation becomes a space rather than vanishing, so "card_arrival",
    "card-arrival" and "Card arrival" all give ("card", "arrival") and "Answer: billing." gives
    ("answer", "billing") — a model writing a label in prose still matches it word for word.
    """
    s = s.lower().translate(_PUNCT_TO_SPACE)
    tokens = tuple(_ARTICLES.sub(" ", s).split())
    # A label made only of articles/punctuation would vanish; keep its raw words so it stays matchable.
    return tokens or tuple(s.split())


def _contains(haystack: tuple[str, ...], needle: tuple[str, ...]) -> bool:
    """Whether ``needle`` occurs as a contiguous run of whole tokens in ``haystack``."""
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def match_label(generated: str, labels: list[str]) -> str | None:
    """Map a model's free-text answer to one of ``labels``, or None when it names none unambiguously.

    In order: (1) the answer equals a label after normalisation; (2) the answer starts with a label
    (longest wins, so "card arrival delayed" beats "card arrival"); (3) exactly one label appears in it as
    whole words — labels that only appear inside a longer matching label are not counted against it.
    Comparison is case-insensitive and treats underscores, hyphens and spaces alike.
    """
    answer = label_key(generated)
    if not answer:
        return None
    keyed = [(label_key(label), label) for label in labels]
    for key, label in keyed:
        if key == answer:
            return label
    prefixes = [(key, label) for key, label in keyed if key and answer[: len(key)] == key]
    if prefixes:
        return max(prefixes, key=lambda kl: len(kl[0]))[1]
    inside = [(key, label) for key, label in keyed if _contains(answer, key)]
    # "card" inside "card arrival" is not a second, competing answer: drop labels nested in another hit.
    outer = [
        label
        for key, label in inside
        if not any(other != key and _contains(other, key) for other, _ in inside)
    ]
    return outer[0] if len(outer) == 1 else None


def _ordered_classes(preds: list[str | None], golds: list[str], labels: list[str]) -> list[str]:
    """``labels`` in their order, then any stray gold/pred values not among them, in order of appearance."""
    classes = list(dict.fromkeys(labels))
    seen = set(classes)
    for value in [*golds, *preds]:
        if value is not None and value not in seen:
            classes.append(value)
            seen.add(value)
    return classes


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1 with sklearn's zero_division=0 (an undefined ratio counts as 0)."""
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def classification_metrics(preds: list[str | None], golds: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class scores and a confusion table for label predictions.

    ``preds`` holds ``match_label`` results: None means the model named no label. Such answers count as
    wrong (they lower the gold class's recall) and are reported as ``invalid`` and in the confusion
    column "(invalid)", but "(invalid)" is not a class, so it does not enter the macro average.
    ``macro_f1`` averages F1 over the classes that occur in gold or predictions, as sklearn does when no
    label list is passed; ``per_class`` lists every label given, plus any stray values seen.
    ``confusion`` is sparse: {gold: {pred or "(invalid)": count}} with non-zero counts only.
    """
    if len(preds) != len(golds):
        raise ValueError(f"classification_metrics: {len(preds)} predictions but {len(golds)} gold labels")
    pairs = list(zip(golds, preds))
    gold_counts = Counter(golds)
    pred_counts = Counter(p for p in preds if p is not None)
    hits = Counter(g for g, p in pairs if g == p)
    per_class = {}
    for label in _ordered_classes(preds, golds, labels):
        precision, recall, f1 = _prf(hits[label], pred_counts[label], gold_counts[label])
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": gold_counts[label]}
    occurring = [c for c in per_class if gold_counts[c] or pred_counts[c]]
    confusion: dict[str, dict[str, int]] = {}
    for gold, pred in pairs:
        row = confusion.setdefault(gold, {})
        column = INVALID if pred is None else pred
        row[column] = row.get(column, 0) + 1
    n = len(pairs)
    return {
        "accuracy": sum(hits.values()) / n if n else 0.0,
        "macro_f1": sum(per_class[c]["f1"] for c in occurring) / len(occurring) if occurring else 0.0,
        "per_class": per_class,
        "confusion": confusion,
        "invalid": sum(p is None for p in preds),
        "n": n,
    }


def generation_metrics(preds: list[str], refs: list[str]) -> dict:
    """Mean SQuAD exact match and token F1 of free-text predictions against references."""
    if len(preds) != len(refs):
        raise ValueError(f"generation_metrics: {len(preds)} predictions but {len(refs)} references")
    n = len(preds)
    return {
        "exact_match": sum(map(exact_match, preds, refs)) / n if n else 0.0,
        "token_f1": sum(map(token_f1, preds, refs)) / n if n else 0.0,
        "n": n,
    }


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf rather than an OverflowError for a diverged loss."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
