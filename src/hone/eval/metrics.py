"""Evaluation metrics as pure functions over plain Python values (no torch, no sklearn).

Used by the eval runners to score base and tuned models on held-out data, and by the report to mark
examples correct or not. Conventions follow the references people already trust, so our numbers can be
compared with theirs:

- ``exact_match`` / ``token_f1``: the official SQuAD v1.1 evaluation script (normalise, then compare tokens).
- ``classification_metrics``: scikit-learn's ``precision_recall_fscore_support`` / ``f1_score(average="macro")``
  with ``zero_division=0``, averaging over the labels that occur in gold or predictions; micro averages pool
  the counts of every class, with answers that name no label counted as predictions of no class.
- ``bleu`` / ``chrf``: sacrebleu's corpus scores (0..100), as its command line prints them.
- ``rouge``: Google's rouge-score package (F-measure, Porter stemmer), averaged over examples (0..1).
- ``expected_calibration_error`` / ``brier_score``: equal-width confidence bins (Guo et al. 2017) and the
  multi-class Brier score (sum over classes of squared error, averaged over examples; 0..2).

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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def accuracy(preds: list, golds: list) -> float:
    """Share of predictions equal to their gold value (None, no answer, is never equal)."""
    if len(preds) != len(golds):
        raise ValueError(f"accuracy: {len(preds)} predictions but {len(golds)} gold values")
    return _mean([float(p is not None and p == g) for p, g in zip(preds, golds)])


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
    ``macro_precision`` / ``macro_recall`` average the same way. Micro averages pool every class's counts:
    precision = hits / answers that named a label, recall = hits / examples (so micro-F1 equals accuracy
    when no answer is invalid, as in sklearn's single-label case).
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
    micro_p, micro_r, micro_f1 = _prf(sum(hits.values()), sum(pred_counts.values()), n)
    return {
        "accuracy": sum(hits.values()) / n if n else 0.0,
        "macro_f1": _mean([per_class[c]["f1"] for c in occurring]),
        "macro_precision": _mean([per_class[c]["precision"] for c in occurring]),
        "macro_recall": _mean([per_class[c]["recall"] for c in occurring]),
        "micro_precision": micro_p, "micro_recall": micro_r, "micro_f1": micro_f1,
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


# --- text overlap: BLEU, chrF, ROUGE, JSON fields ----------------------------------------------


def _references(refs: list) -> list[list[str]]:
    """sacrebleu's layout (one list per reference *set*) from one reference or a list of them per example."""
    per_example = [[r] if isinstance(r, str) else list(r) for r in refs]
    width = max((len(r) for r in per_example), default=1)
    # Examples with fewer references repeat their last one: a duplicate reference changes no n-gram count max.
    return [[r[min(k, len(r) - 1)] for r in per_example] for k in range(width)]


def bleu(preds: list[str], refs: list) -> float:
    """Corpus BLEU (0..100) with sacrebleu's defaults (13a tokenizer, exponential smoothing), the figure
    `sacrebleu -m bleu` prints. ``refs``: one reference string per example, or a list of references each."""
    import sacrebleu

    if len(preds) != len(refs):
        raise ValueError(f"bleu: {len(preds)} predictions but {len(refs)} references")
    return float(sacrebleu.corpus_bleu(preds, _references(refs)).score) if preds else 0.0


def chrf(preds: list[str], refs: list) -> float:
    """Corpus chrF (0..100; character 6-grams, beta 2), sacrebleu's defaults, as `sacrebleu -m chrf`."""
    import sacrebleu

    if len(preds) != len(refs):
        raise ValueError(f"chrf: {len(preds)} predictions but {len(refs)} references")
    return float(sacrebleu.corpus_chrf(preds, _references(refs)).score) if preds else 0.0


def rouge(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0..1) from rouge-score, with its Porter stemmer.
    rouge-score keeps only ASCII letters and digits, so text in other scripts scores 0."""
    from rouge_score import rouge_scorer

    if len(preds) != len(refs):
        raise ValueError(f"rouge: {len(preds)} predictions but {len(refs)} references")
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(preds, refs)]  # score(target, prediction)
    return {k: _mean([s[k].fmeasure for s in scores]) for k in kinds}


def parse_json_object(text: str) -> dict | None:
    """The JSON object in ``text`` (whole, or the outermost {...} inside prose or a code fence), else None."""
    import json

    for candidate in (text, text[text.find("{"): text.rfind("}") + 1] if "{" in text else ""):
        try:
            value = json.loads(candidate)
        except (ValueError, TypeError):
            continue
        if isinstance(value, dict):
            return value
    return None


def json_fields(obj: dict, prefix: str = "") -> set[tuple[str, str]]:
    """(dotted key, normalised value) pairs of a JSON object; nested objects are flattened, strings compared
    case- and whitespace-insensitively, other values (numbers, lists, null) by their canonical JSON."""
    import json

    pairs = set()
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            pairs |= json_fields(value, name + ".")
        elif isinstance(value, str):
            pairs.add((name, " ".join(value.split()).casefold()))
        else:
            pairs.add((name, json.dumps(value, sort_keys=True)))
    return pairs


def field_scores(preds: list[str], refs: list[str]) -> dict[str, float] | None:
    """Micro precision / recall / F1 over key-value pairs when every reference is a JSON object, else None.

    A prediction that is not JSON contributes no pairs (it loses recall, never precision).
    """
    ref_objects = [parse_json_object(r) for r in refs]
    if not refs or any(r is None for r in ref_objects):
        return None
    tp = n_pred = n_ref = 0
    for pred, ref in zip(preds, ref_objects):
        got, want = json_fields(parse_json_object(pred) or {}), json_fields(ref)
        tp, n_pred, n_ref = tp + len(got & want), n_pred + len(got), n_ref + len(want)
    precision, recall, f1 = _prf(tp, n_pred, n_ref)
    return {"field_precision": precision, "field_recall": recall, "field_f1": f1}


# --- calibration -------------------------------------------------------------------------------


def expected_calibration_error(confidences: list[float], correct: list[bool], n_bins: int = 10) -> float:
    """ECE: sum over equal-width confidence bins of (bin share) x |bin accuracy - bin mean confidence|.

    Bin b holds confidences in [b/n, (b+1)/n); a confidence of exactly 1 goes to the last bin. Empty bins
    add nothing.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"expected_calibration_error: {len(confidences)} confidences but {len(correct)} outcomes")
    if n_bins < 1:
        raise ValueError("expected_calibration_error: n_bins must be at least 1")
    bins: dict[int, list[tuple[float, bool]]] = {}
    for conf, ok in zip(confidences, correct):
        b = min(n_bins - 1, max(0, math.floor(conf * n_bins)))
        bins.setdefault(b, []).append((conf, ok))
    n = len(confidences)
    return sum(len(items) / n * abs(_mean([float(ok) for _, ok in items]) - _mean([c for c, _ in items]))
               for items in bins.values())


def brier_score(probs: list[list[float]], gold_index: list[int]) -> float:
    """Multi-class Brier score: mean over examples of sum_k (p_k - [k is gold])^2 (0 best, 2 worst)."""
    if len(probs) != len(gold_index):
        raise ValueError(f"brier_score: {len(probs)} probability rows but {len(gold_index)} gold indices")
    return _mean([sum((p - (k == g)) ** 2 for k, p in enumerate(row)) for row, g in zip(probs, gold_index)])


def calibration_metrics(probs: list[list[float]], gold_index: list[int], n_bins: int = 10) -> dict[str, float]:
    """ECE and Brier of label probabilities, and ``prob_accuracy``: how often the most probable label is gold."""
    top = [max(range(len(row)), key=row.__getitem__) for row in probs]
    correct = [t == g for t, g in zip(top, gold_index)]
    return {"prob_accuracy": _mean([float(c) for c in correct]),
            "ece": expected_calibration_error([row[t] for row, t in zip(probs, top)], correct, n_bins),
            "brier": brier_score(probs, gold_index)}


# --- metric sets per task ----------------------------------------------------------------------

LABEL_METRICS = ("accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall", "micro_precision",
                 "micro_recall")
CALIBRATION_METRICS = ("ece", "brier", "prob_accuracy")
TEXT_METRICS = ("exact_match", "token_f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "field_precision",
                "field_recall", "field_f1")
ALL_METRICS = LABEL_METRICS + CALIBRATION_METRICS + TEXT_METRICS
TASK_METRICS = {
    "classification": ("accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall", "ece", "brier",
                       "prob_accuracy", "exact_match", "token_f1"),
    "extraction": ("exact_match", "token_f1", "field_precision", "field_recall", "field_f1"),
    "generation": ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "token_f1"),
    "qa": ("exact_match", "token_f1"),
}
# eval.task auto keeps the cost of an evaluation as it was: no label scoring pass (ECE, Brier) unless asked for.
AUTO_METRICS = {"classification": tuple(m for m in TASK_METRICS["classification"] if m not in CALIBRATION_METRICS),
                "qa": TASK_METRICS["qa"]}
TASK_PRIMARY = {"classification": "accuracy", "extraction": "field_f1", "generation": "rougeL", "qa": "token_f1"}


def text_metrics(preds: list[str], refs: list[str], names) -> dict[str, float]:
    """The named free-text metrics (of TEXT_METRICS); field_* only when every reference is a JSON object."""
    names = [n for n in names if n in TEXT_METRICS]
    out: dict[str, float] = {}
    if {"exact_match", "token_f1"} & set(names):
        out.update({k: v for k, v in generation_metrics(preds, refs).items() if k in names})
    if "bleu" in names:
        out["bleu"] = bleu(preds, refs)
    if "chrf" in names:
        out["chrf"] = chrf(preds, refs)
    if {"rouge1", "rouge2", "rougeL"} & set(names):
        out.update({k: v for k, v in rouge(preds, refs).items() if k in names})
    if any(n.startswith("field_") for n in names):
        out.update({k: v for k, v in (field_scores(preds, refs) or {}).items() if k in names})
    return {n: out[n] for n in names if n in out}
