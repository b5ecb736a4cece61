"""Tests for hone.eval.metrics: hand-computed cases plus an independent re-computation of macro-F1."""

import math
import random

import pytest

from hone.eval.metrics import (
    INVALID,
    classification_metrics,
    exact_match,
    generation_metrics,
    match_label,
    normalize_answer,
    perplexity,
    token_f1,
)


# --- SQuAD normalisation, EM, F1 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Cat", "cat"),
        ("  An apple, a day!  ", "apple day"),
        ("theatre", "theatre"),  # articles only as whole words
        ("Hello,\n\tWorld.", "hello world"),
        ("", ""),
        ("a an the", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_hand_computed():
    # pred tokens {paris, france}, ref {paris}: P = 1/2, R = 1 -> F1 = 2/3
    assert token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    # duplicates count as a multiset: pred [x x y], ref [x y z]: common = 2, P = R = 2/3
    assert token_f1("x x y", "x y z") == pytest.approx(2 / 3)
    assert token_f1("cat", "dog") == 0.0
    assert token_f1("same words", "Same words.") == 1.0


def test_token_f1_empty_cases():
    assert token_f1("", "") == 1.0
    assert token_f1("the", "a") == 1.0  # both normalise to empty
    assert token_f1("", "paris") == 0.0
    assert token_f1("paris", "") == 0.0


# --- match_label -------------------------------------------------------------------------------

LABELS = ["card_arrival", "card_arrival_delayed", "billing", "lost-card", "refund"]


@pytest.mark.parametrize(
    "generated, expected",
    [
        ("card_arrival", "card_arrival"),
        ("Card Arrival", "card_arrival"),  # spaces == underscores, case-insensitive
        ("  billing. ", "billing"),
        ("lost card", "lost-card"),  # hyphen == space
        ("LOST_CARD", "lost-card"),
        ("card arrival delayed, because the post is slow", "card_arrival_delayed"),  # longest prefix
        ("card arrival - my card has not come", "card_arrival"),
        ("Billing\nExplanation: the customer was charged twice", "billing"),
        ("I think this is about billing.", "billing"),  # whole word inside prose
        ("The answer is card_arrival_delayed", "card_arrival_delayed"),  # nested label not a rival
        ("either billing or refund", None),  # two labels: ambiguous
        ("rebilling issue", None),  # not a whole word
        ("something else entirely", None),
        ("", None),
    ],
)
def test_match_label(generated, expected):
    assert match_label(generated, LABELS) == expected


def test_match_label_prefers_exact_over_prefix():
    assert match_label("no", ["no", "not_sure"]) == "no"
    assert match_label("not sure", ["no", "not_sure"]) == "not_sure"  # token prefix, not character prefix


def test_match_label_no_labels():
    assert match_label("billing", []) is None


# --- classification_metrics --------------------------------------------------------------------


def test_classification_metrics_hand_computed():
    labels = ["a", "b", "c"]
    golds = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", None, "a"]
    m = classification_metrics(preds, golds, labels)
    assert m["n"] == 5
    assert m["invalid"] == 1
    assert m["accuracy"] == pytest.approx(2 / 5)
    # a: tp 1, predicted 2, gold 2 -> P .5 R .5 F1 .5
    # b: tp 1, predicted 2, gold 2 -> P .5 R .5 F1 .5
    # c: tp 0, predicted 0, gold 1 -> 0 (zero_division=0)
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert m["confusion"] == {"a": {"a": 1, "b": 1}, "b": {"b": 1, INVALID: 1}, "c": {"a": 1}}


def test_macro_f1_ignores_labels_absent_from_gold_and_pred():
    m = classification_metrics(["a", "b"], ["a", "b"], ["a", "b", "never_seen"])
    assert m["macro_f1"] == 1.0
    assert m["per_class"]["never_seen"]["support"] == 0


def test_stray_prediction_counts_as_a_class():
    # sklearn includes every value seen in y_pred; a stray value drags macro-F1 down like any class.
    m = classification_metrics(["a", "zzz"], ["a", "a"], ["a"])
    assert set(m["per_class"]) == {"a", "zzz"}
    # a: P 1, R .5 -> F1 2/3; zzz: 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_classification_metrics_empty_and_mismatch():
    m = classification_metrics([], [], ["a"])
    assert (m["accuracy"], m["macro_f1"], m["n"], m["invalid"]) == (0.0, 0.0, 0, 0)
    with pytest.raises(ValueError):
        classification_metrics(["a"], [], ["a"])


def _reference_scores(preds, golds):
    """Straightforward re-implementation of sklearn's macro P/R/F1 (labels = union of gold and pred)."""
    classes = sorted({g for g in golds} | {p for p in preds if p is not None})
    out = {}
    for c in classes:
        tp = sum(1 for g, p in zip(golds, preds) if g == c and p == c)
        fp = sum(1 for g, p in zip(golds, preds) if g != c and p == c)
        fn = sum(1 for g, p in zip(golds, preds) if g == c and p != c)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0  # same as 2PR/(P+R), computed differently
        out[c] = (precision, recall, f1)
    macro = sum(v[2] for v in out.values()) / len(out)
    return out, macro


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_matches_reference_on_random_data(seed):
    rng = random.Random(seed)
    labels = [f"label_{i}" for i in range(8)]
    golds = [rng.choice(labels[:6]) for _ in range(200)]  # labels 6, 7 never gold
    preds = [rng.choice(labels + [None]) if rng.random() < 0.6 else g for g in golds]
    m = classification_metrics(preds, golds, labels)
    ref, ref_macro = _reference_scores(preds, golds)
    assert m["macro_f1"] == pytest.approx(ref_macro, abs=1e-12)
    for c, (precision, recall, f1) in ref.items():
        got = m["per_class"][c]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision, recall, f1), abs=1e-12)
    assert m["accuracy"] == pytest.approx(sum(g == p for g, p in zip(golds, preds)) / len(golds))
    assert m["invalid"] == preds.count(None)
    assert sum(sum(row.values()) for row in m["confusion"].values()) == len(golds)


# --- generation_metrics, perplexity ------------------------------------------------------------


def test_generation_metrics():
    m = generation_metrics(["Paris", "the Louvre museum", ""], ["paris", "Louvre", "Rome"])
    assert m["n"] == 3
    assert m["exact_match"] == pytest.approx(1 / 3)
    # F1s: 1, (P 1/2, R 1 -> 2/3), 0
    assert m["token_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert generation_metrics([], []) == {"exact_match": 0.0, "token_f1": 0.0, "n": 0}
    with pytest.raises(ValueError):
        generation_metrics(["a"], [])


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(42.0)) == pytest.approx(42.0)
    assert perplexity(1e6) == math.inf
