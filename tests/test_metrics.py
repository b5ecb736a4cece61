"""Tests for hone.eval.metrics: hand-computed cases, an independent re-computation of macro-F1, and the
reference libraries (scikit-learn, sacrebleu, rouge-score) where one exists."""

import math
import random

import pytest

from hone.eval.metrics import (
    INVALID,
    TASK_METRICS,
    accuracy,
    bleu,
    brier_score,
    calibration_metrics,
    chrf,
    classification_metrics,
    exact_match,
    expected_calibration_error,
    field_scores,
    generation_metrics,
    match_label,
    normalize_answer,
    parse_json_object,
    perplexity,
    rouge,
    text_metrics,
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


# --- accuracy, macro / micro averages ----------------------------------------------------------


def test_accuracy():
    assert accuracy(["a", "b", None, "c"], ["a", "c", None, "c"]) == pytest.approx(2 / 4)  # None never right
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy(["a"], [])


def test_macro_and_micro_averages_hand_computed():
    # Same case as test_classification_metrics_hand_computed: a P .5 R .5; b P .5 R .5; c P 0 R 0.
    m = classification_metrics(["a", "b", "b", None, "a"], ["a", "a", "b", "b", "c"], ["a", "b", "c"])
    assert m["macro_precision"] == pytest.approx(1 / 3)
    assert m["macro_recall"] == pytest.approx(1 / 3)
    # micro: 2 hits, 4 answers that named a label, 5 examples -> P 1/2, R 2/5, F1 = 2PR/(P+R) = 4/9
    assert m["micro_precision"] == pytest.approx(0.5)
    assert m["micro_recall"] == pytest.approx(0.4)
    assert m["micro_f1"] == pytest.approx(4 / 9)


@pytest.mark.parametrize("seed", range(3))
def test_averages_match_sklearn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(seed)
    labels = [f"l{i}" for i in range(6)]
    golds = [rng.choice(labels[:5]) for _ in range(150)]
    preds = [rng.choice(labels) if rng.random() < 0.5 else g for g in golds]  # no invalid answers here
    m = classification_metrics(preds, golds, labels)
    for average in ("macro", "micro"):
        p, r, f, _ = metrics.precision_recall_fscore_support(golds, preds, average=average, zero_division=0)
        assert (m[f"{average}_precision"], m[f"{average}_recall"], m[f"{average}_f1"]) == pytest.approx((p, r, f))
    assert m["micro_f1"] == pytest.approx(m["accuracy"])  # single-label, no invalid answers
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(golds, preds))


# --- BLEU, chrF, ROUGE -------------------------------------------------------------------------

# The example in sacrebleu's README, with the scores it documents for its command line.
SACRE_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
SACRE_REFS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
              ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]


def test_bleu_and_chrf_match_sacrebleu_readme():
    import sacrebleu

    per_example = [list(refs) for refs in zip(*SACRE_REFS)]  # our layout: the references of each example
    assert bleu(SACRE_SYS, per_example) == pytest.approx(48.53, abs=0.005)
    assert chrf(SACRE_SYS, per_example) == pytest.approx(59.73, abs=0.005)
    assert bleu(SACRE_SYS, per_example) == pytest.approx(sacrebleu.corpus_bleu(SACRE_SYS, SACRE_REFS).score)
    assert chrf(SACRE_SYS, per_example) == pytest.approx(sacrebleu.corpus_chrf(SACRE_SYS, SACRE_REFS).score)


def test_bleu_hand_computed():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat": clipped n-gram precisions 5/6, 3/5, 2/4,
    # 1/3; equal lengths so no brevity penalty; BLEU = geometric mean = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4).
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected)
    assert bleu(["same words here now"], ["same words here now"]) == pytest.approx(100.0)
    assert bleu([], []) == 0.0
    with pytest.raises(ValueError):
        bleu(["a"], [])


def test_chrf_hand_computed():
    # hyp "ab", ref "abc" (beta 2): 1-grams P 2/2 R 2/3; 2-grams P 1/1 R 1/2; longer orders have no hyp
    # n-grams and are left out. Mean P = 1, mean R = 7/12 -> F2 = 5 * 1 * 7/12 / (4 * 1 + 7/12) = 35/55.
    assert chrf(["ab"], ["abc"]) == pytest.approx(100 * 35 / 55)
    assert chrf(["xyz"], ["abc"]) == 0.0


def test_rouge_hand_computed():
    # ref 6 tokens, pred "the cat sat": unigrams P 1 R 1/2 -> F 2/3; bigrams P 2/2 R 2/5 -> F 4/7;
    # LCS 3 -> as unigrams. Second pair identical after stemming ("cats running" ~ "cat run").
    m = rouge(["the cat sat", "Cats running"], ["the cat sat on the mat", "cat runs"])
    assert m["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["rouge2"] == pytest.approx((4 / 7 + 1) / 2)
    assert m["rougeL"] == pytest.approx((2 / 3 + 1) / 2)


def test_rouge_matches_rouge_score():
    from rouge_score import rouge_scorer

    preds, refs = ["a quick brown fox", "jumped over dogs"], ["the quick brown fox jumps", "it jumps over the dog"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / 2
    assert rouge(preds, refs)["rougeL"] == pytest.approx(expected)


# --- JSON field scores -------------------------------------------------------------------------


def test_parse_json_object():
    assert parse_json_object('{"a": 1}') == {"a": 1}
    assert parse_json_object('Sure! ```json\n{"a": {"b": 2}}\n```') == {"a": {"b": 2}}
    assert parse_json_object("[1, 2]") is None
    assert parse_json_object("no json here") is None


def test_field_scores_hand_computed():
    refs = ['{"name": "Ann Lee", "city": "Paris", "age": 30}', '{"order": {"id": 7, "status": "late"}}']
    preds = ['{"name": "ann  lee", "city": "Rome", "age": 30, "extra": true}', "not json"]
    m = field_scores(preds, refs)
    # pairs: ref 3 + 2 = 5; pred 4 + 0 = 4; matches name (case/space-insensitive) and age = 2
    assert m == pytest.approx({"field_precision": 2 / 4, "field_recall": 2 / 5, "field_f1": 2 * 0.5 * 0.4 / 0.9})
    assert field_scores(["x"], ["plain text reference"]) is None


# --- calibration -------------------------------------------------------------------------------


def test_expected_calibration_error_hand_computed():
    conf = [0.95, 0.9, 0.85, 0.6, 0.55, 0.3]
    correct = [True, True, False, True, False, False]
    # 10 bins: [0.9,1.0) holds .95 .9 (acc 1, conf .925) -> |1-.925| = .075, weight 2/6
    # [0.8,0.9) .85 (acc 0) -> .85, 1/6; [0.6,0.7) .6 (acc 1) -> .4, 1/6; [0.5,0.6) .55 (acc 0) -> .55, 1/6;
    # [0.3,0.4) .3 (acc 0) -> .3, 1/6
    expected = (2 * 0.075 + 0.85 + 0.4 + 0.55 + 0.3) / 6
    assert expected_calibration_error(conf, correct, 10) == pytest.approx(expected)
    # 2 bins: [0,.5) holds .3 (acc 0) -> .3; [.5,1] holds the other five: acc 3/5, conf .77 -> .17
    assert expected_calibration_error(conf, correct, 2) == pytest.approx((0.3 + 5 * 0.17) / 6)
    # one bin: |accuracy - mean confidence|
    assert expected_calibration_error(conf, correct, 1) == pytest.approx(abs(3 / 6 - sum(conf) / 6))
    assert expected_calibration_error([1.0, 0.0], [True, False], 4) == 0.0  # the edges are perfectly calibrated
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [], 10)


def test_brier_score_hand_computed():
    probs = [[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]
    # row 1 gold 0: .3^2 + .2^2 + .1^2 = .14; row 2 gold 2: .5^2 + .5^2 + 1 = 1.5
    assert brier_score(probs, [0, 2]) == pytest.approx((0.14 + 1.5) / 2)
    assert brier_score([[1.0, 0.0]], [0]) == 0.0
    assert brier_score([[0.0, 1.0]], [0]) == 2.0


def test_calibration_metrics():
    probs = [[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]
    m = calibration_metrics(probs, [0, 1, 2], n_bins=10)
    assert m["prob_accuracy"] == pytest.approx(2 / 3)  # argmax right on rows 1 and 3
    assert m["ece"] == pytest.approx(expected_calibration_error([0.7, 0.5, 0.8], [True, False, True], 10))
    assert m["brier"] == pytest.approx(brier_score(probs, [0, 1, 2]))


# --- metric sets -------------------------------------------------------------------------------


def test_text_metrics_picks_what_is_asked():
    preds, refs = ["the cat sat", '{"a": 1}'], ["the cat sat", '{"a": 2}']
    assert list(text_metrics(preds, refs, ["rougeL", "exact_match", "accuracy"])) == ["rougeL", "exact_match"]
    gen = text_metrics(preds, refs, TASK_METRICS["generation"])
    assert set(gen) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "token_f1"}
    # field scores need every reference to be JSON: here one is not, so they are left out
    assert "field_f1" not in text_metrics(preds, refs, TASK_METRICS["extraction"])
    assert text_metrics(['{"a": 2}'], ['{"a": 2}'], ["field_f1"]) == {"field_f1": 1.0}
