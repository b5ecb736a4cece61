"""Error analysis of one held-out evaluation: where a model fails, as plain data for the report.

Pure functions over an eval result (the dict ``hone.eval.runners.evaluate_task`` returns, as saved in a run's
eval_base.json / eval_tuned.json): they read its ``per_example`` rows (input, input_tokens, reference, output,
score; label tasks also gold, predicted, confidence, gold_probability), ``per_class`` and ``confusion``.

- ``worst_examples``: label tasks list wrong answers, the most confident first when the model's label
  probabilities were measured (a confident mistake says more than a coin flip); other tasks list the lowest
  per-example scores (token F1).
- ``slices_by_label``: per-class precision / recall / F1 with support and the label each class is most often
  mistaken for, hardest classes first.
- ``slices_by_length``: the score per input-length tertile (in tokens of the user's message), with counts.

    from hone.eval.analysis import analyse
    result["analysis"] = analyse(result)
"""

from __future__ import annotations

import math

from hone.eval.metrics import INVALID

WORST_K = 10


def _score_name(result: dict) -> str:
    return "accuracy" if result.get("task") == "label" else "token_f1"


def worst_examples(per_example: list[dict], label_task: bool, k: int = WORST_K) -> list[dict]:
    """The k examples that went worst, each {index, input, expected, got, score, ...}, worst first."""
    rows = [{"index": i, **row} for i, row in enumerate(per_example)]
    if label_task:
        wrong = [r for r in rows if not r.get("score")]
        # Confident mistakes first; answers naming no label (confidence None) after them, in input order.
        wrong.sort(key=lambda r: (r.get("confidence") is None, -(r.get("confidence") or 0.0), r["index"]))
        picked = wrong[:k]
    else:
        picked = sorted(rows, key=lambda r: (r.get("score", 0.0), r["index"]))[:k]
    keep = ("index", "input", "input_tokens", "score", "confidence", "gold_probability", "predicted")
    return [{"expected": r.get("reference"), "got": r.get("output"), **{key: r[key] for key in keep if key in r}}
            for r in picked]


def slices_by_label(per_class: dict, confusion: dict | None) -> list[dict]:
    """Per gold class: support, precision, recall, F1 and its most frequent wrong answer; lowest F1 first
    (ties: larger support first). Classes never seen in gold are left out."""
    rows = []
    for label, figures in (per_class or {}).items():
        if not figures.get("support"):
            continue
        mistakes = {p: n for p, n in ((confusion or {}).get(label) or {}).items() if p != label}
        # On a tie a real label says more than "(invalid)".
        top = max(mistakes.items(), key=lambda kv: (kv[1], kv[0] != INVALID)) if mistakes else None
        rows.append({"label": label, "support": figures["support"], "precision": figures["precision"],
                     "recall": figures["recall"], "f1": figures["f1"],
                     "confused_with": top[0] if top else None, "confused_count": top[1] if top else 0})
    rows.sort(key=lambda r: (r["f1"], -r["support"], r["label"]))
    return rows


def length_cuts(lengths: list[int], n_slices: int = 3) -> list[int]:
    """Upper bounds (inclusive) of up to n_slices length slices holding about equal counts: the lengths at
    the 1/n, 2/n, ... quantiles, duplicates dropped, the last one the maximum."""
    ordered = sorted(lengths)
    if not ordered:
        return []
    cuts = [ordered[max(0, math.ceil(len(ordered) * q / n_slices) - 1)] for q in range(1, n_slices)]
    return sorted(set(cuts + [ordered[-1]]))


def slices_by_length(per_example: list[dict], n_slices: int = 3) -> list[dict]:
    """Mean per-example score by input length (tertiles by default), each {slice, min_tokens, max_tokens, n,
    score}. Ties in length keep equal inputs together, so slices can hold unequal counts."""
    lengths = [int(r.get("input_tokens", 0)) for r in per_example]
    names = {3: ["short", "medium", "long"]}.get(n_slices)
    rows, low = [], None
    cuts = length_cuts(lengths, n_slices)
    for i, high in enumerate(cuts):
        members = [r for r, n in zip(per_example, lengths) if (low is None or n > low) and n <= high]
        scores = [float(r.get("score", 0.0)) for r in members]
        in_slice = [n for n in lengths if (low is None or n > low) and n <= high]
        name = names[i] if names and len(cuts) == n_slices else f"slice {i + 1}"
        rows.append({"slice": name, "min_tokens": min(in_slice), "max_tokens": max(in_slice), "n": len(members),
                     "score": sum(scores) / len(scores)})
        low = high
    return rows


def analyse(result: dict, k: int = WORST_K, n_slices: int = 3) -> dict:
    """{score_name, worst, by_label, by_length} for an eval result with per_example rows."""
    per_example = result.get("per_example") or []
    label_task = result.get("task") == "label"
    return {"score_name": _score_name(result),
            "has_confidence": any(r.get("confidence") is not None for r in per_example),
            "worst": worst_examples(per_example, label_task, k),
            "by_label": slices_by_label(result.get("per_class") or {}, result.get("confusion")) if label_task else [],
            "by_length": slices_by_length(per_example, n_slices)}


# --- display -----------------------------------------------------------------------------------


def _short(text, limit: int) -> str:
    text = " ".join(str("" if text is None else text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mark(row: dict, label_task: bool) -> str:
    if not label_task:
        return f"token F1 {row.get('score', 0.0):.2f}"
    if row.get("predicted") is None:
        return "no label"
    if row.get("confidence") is None:
        return "wrong"
    return f"p {row['confidence']:.2f} (gold {row.get('gold_probability') or 0.0:.2f})"


def failure_view(analysis: dict | None, labels_shown: int = 10) -> dict | None:
    """The report's "Where it fails" section as display strings: the hardest labels, the score per input
    length slice and the worst examples (None when there is no analysis)."""
    if not analysis:
        return None
    label_task = analysis.get("score_name") == "accuracy"
    by_label = [{"label": str(r["label"]), "support": str(r["support"]), "precision": _pct(r["precision"]),
                 "recall": _pct(r["recall"]), "f1": _pct(r["f1"]),
                 "confused_with": f"{r['confused_with']} ({r['confused_count']})" if r.get("confused_with") else ""}
                for r in (analysis.get("by_label") or [])[:labels_shown]]
    by_length = [{"slice": r["slice"], "tokens": f"{r['min_tokens']}–{r['max_tokens']}", "n": str(r["n"]),
                  "score": _pct(r["score"])} for r in analysis.get("by_length") or []]
    worst = [{"input": _short(r.get("input"), 160), "expected": _short(r.get("expected"), 80),
              "got": _short(r.get("got"), 80), "mark": _mark(r, label_task)} for r in analysis.get("worst") or []]
    return {"score_name": "accuracy" if label_task else "token F1", "by_label": by_label,
            "labels_total": len(analysis.get("by_label") or []), "by_length": by_length, "worst": worst,
            "worst_order": ("wrong answers, most confident first" if label_task and analysis.get("has_confidence")
                            else "wrong answers" if label_task else "lowest token F1 first")}
