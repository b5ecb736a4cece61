"""Tests for error analysis (hone.eval.analysis), label probabilities and eval.task in the runners, and the
report's "Where it fails" section: hand-made eval results for the pure parts, the tiny model for the rest."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from hone.eval.analysis import analyse, failure_view, length_cuts, slices_by_label, slices_by_length, worst_examples
from hone.eval.metrics import INVALID
from hone.eval.report import is_fraction_metric, lower_is_better, metric_table
from hone.records import Conversation, Message

# --- pure analysis -----------------------------------------------------------------------------


def _label_rows():
    return [
        {"input": "a", "input_tokens": 3, "reference": "x", "output": "x", "gold": "x", "predicted": "x",
         "score": 1.0, "confidence": 0.9, "gold_probability": 0.9},
        {"input": "b", "input_tokens": 5, "reference": "x", "output": "y", "gold": "x", "predicted": "y",
         "score": 0.0, "confidence": 0.4, "gold_probability": 0.3},
        {"input": "c", "input_tokens": 8, "reference": "y", "output": "??", "gold": "y", "predicted": None,
         "score": 0.0, "confidence": None, "gold_probability": 0.5},
        {"input": "d", "input_tokens": 8, "reference": "y", "output": "x", "gold": "y", "predicted": "x",
         "score": 0.0, "confidence": 0.8, "gold_probability": 0.1},
        {"input": "e", "input_tokens": 20, "reference": "y", "output": "y", "gold": "y", "predicted": "y",
         "score": 1.0, "confidence": 0.6, "gold_probability": 0.6},
    ]


def test_worst_label_examples_are_wrong_ones_most_confident_first():
    worst = worst_examples(_label_rows(), label_task=True, k=10)
    assert [w["input"] for w in worst] == ["d", "b", "c"]  # 0.8, 0.4, then the answer that named no label
    assert worst[0] == {"expected": "y", "got": "x", "index": 3, "input": "d", "input_tokens": 8, "score": 0.0,
                        "confidence": 0.8, "gold_probability": 0.1, "predicted": "x"}
    assert len(worst_examples(_label_rows(), label_task=True, k=2)) == 2


def test_worst_label_examples_without_probabilities_keep_input_order():
    rows = [{k: v for k, v in r.items() if k not in ("confidence", "gold_probability")} for r in _label_rows()]
    assert [w["input"] for w in worst_examples(rows, label_task=True)] == ["b", "c", "d"]


def test_worst_generation_examples_lowest_score_first():
    rows = [{"input": str(i), "input_tokens": 1, "reference": "r", "output": "o", "score": s}
            for i, s in enumerate([0.5, 0.1, 1.0, 0.1])]
    assert [w["index"] for w in worst_examples(rows, label_task=False, k=3)] == [1, 3, 0]


def test_slices_by_label_hardest_first_with_top_confusion():
    per_class = {"x": {"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2},
                 "y": {"precision": 1.0, "recall": 1 / 3, "f1": 0.5, "support": 3},
                 "z": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}}  # never gold: left out
    confusion = {"x": {"x": 1, "y": 1}, "y": {"y": 1, "x": 1, INVALID: 1}}
    rows = slices_by_label(per_class, confusion)
    assert [r["label"] for r in rows] == ["x", "y"]
    assert (rows[0]["confused_with"], rows[0]["confused_count"]) == ("y", 1)
    assert rows[1]["confused_with"] == "x"  # a tie with "(invalid)" goes to the real label
    assert rows[1]["support"] == 3 and rows[1]["recall"] == pytest.approx(1 / 3)


def test_length_cuts_and_slices_hand_computed():
    assert length_cuts([1, 2, 3, 4, 5, 6, 7, 8, 9]) == [3, 6, 9]
    assert length_cuts([5, 5, 5, 5]) == [5]  # one length: one slice
    assert length_cuts([]) == []
    # lengths 3 5 8 8 20: cuts at the 2nd and 4th smallest (5, 8) and the maximum
    rows = slices_by_length(_label_rows())
    assert [(r["slice"], r["min_tokens"], r["max_tokens"], r["n"]) for r in rows] == [
        ("short", 3, 5, 2), ("medium", 8, 8, 2), ("long", 20, 20, 1)]
    assert [r["score"] for r in rows] == [0.5, 0.0, 1.0]


def test_analyse_and_failure_view():
    result = {"task": "label", "per_example": _label_rows(),
              "per_class": {"x": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
                            "y": {"precision": 1.0, "recall": 1 / 3, "f1": 0.5, "support": 3}},
              "confusion": {"x": {"x": 1, "y": 1}, "y": {"y": 1, "x": 1, INVALID: 1}}}
    a = analyse(result, k=2)
    assert a["score_name"] == "accuracy" and a["has_confidence"]
    assert [w["input"] for w in a["worst"]] == ["d", "b"]
    assert len(a["by_label"]) == 2 and len(a["by_length"]) == 3
    view = failure_view(a)
    assert view["worst"][0]["mark"] == "p 0.80 (gold 0.10)"
    assert view["by_length"][0] == {"slice": "short", "tokens": "3–5", "n": "2", "score": "50.0%"}
    assert view["worst_order"] == "wrong answers, most confident first"
    assert failure_view(None) is None
    text = analyse({"task": "generation", "per_example": [{"input": "q", "input_tokens": 2, "reference": "r",
                                                           "output": "o", "score": 0.25}]})
    assert text["by_label"] == [] and failure_view(text)["worst"][0]["mark"] == "token F1 0.25"


def test_report_treats_ece_and_brier_as_lower_is_better():
    assert lower_is_better("ece") and lower_is_better("brier") and lower_is_better("tuned_ece")
    assert not lower_is_better("piece_accuracy") and not lower_is_better("prob_accuracy")
    assert is_fraction_metric("ece") and is_fraction_metric("micro_f1") and is_fraction_metric("prob_accuracy")
    assert not is_fraction_metric("brier") and not is_fraction_metric("bleu")
    rows = {r["key"]: r for r in metric_table({"base": {"ece": 0.30, "brier": 0.9, "accuracy": 0.5},
                                              "tuned": {"ece": 0.10, "brier": 1.1, "accuracy": 0.6}})}
    assert (rows["ece"]["delta"], rows["ece"]["tone"]) == ("-20.0 pts", "good")
    assert rows["brier"]["tone"] == "bad" and rows["accuracy"]["tone"] == "good"


# --- label probabilities on the tiny model -----------------------------------------------------

LABELS = ["billing", "shipping", "login", "card_arrival_delayed"]
PROMPTS = [[Message("system", "Classify the message."), Message("user", "my package is late")],
           [Message("user", "I was charged twice")]]


def _independent_log_probs(model, tokenizer, messages, labels):
    """One plain forward per label over the prompt + that label's answer, log-softmax in float64."""
    import torch

    from hone.data.template import render_prompt
    from hone.eval.runners import label_continuations

    prompt = render_prompt(tokenizer, messages)
    out = []
    for answer in label_continuations(tokenizer, messages, labels):
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        out.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer)))
    return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_label_probabilities_equal_independent_forward(tiny, one_torch_thread, use_cache):
    from hone.eval.runners import label_log_probs, softmax

    model, tokenizer = tiny
    got = label_log_probs(model, tokenizer, PROMPTS, LABELS, batch_size=3, use_cache=use_cache)  # 2 chunks
    for messages, row in zip(PROMPTS, got):
        expected = _independent_log_probs(model, tokenizer, messages, LABELS)
        assert row == pytest.approx(expected, abs=1e-4)
        probs, ref = softmax(row), softmax(expected)
        assert probs == pytest.approx(ref, abs=1e-5) and math.fsum(probs) == pytest.approx(1.0)


def test_label_answer_ends_with_end_of_turn(tiny):
    from hone.eval.runners import label_continuations

    _, tokenizer = tiny
    answers = label_continuations(tokenizer, PROMPTS[0], ["card", "card arrival"])
    assert all(a[-1] == tokenizer.eos_token_id for a in answers)
    assert tokenizer.decode(answers[1], skip_special_tokens=True) == "card arrival"


# --- evaluate_task with eval.task --------------------------------------------------------------


def _labelled(n=6):
    texts = ["charged twice on my invoice", "where is my package", "cannot sign in", "payment failed again",
             "courier lost the delivery", "password locked out"]
    golds = ["billing", "shipping", "login"] * 2
    return [Conversation([Message("user", texts[i % 6]), Message("assistant", golds[i % 6])], label=golds[i % 6])
            for i in range(n)]


def _free_text():
    pairs = [("capital of France?", "Paris"), ("two plus two?", "four"), ("colour of the sky?", "blue sky")]
    return [Conversation([Message("user", q), Message("assistant", a)]) for q, a in pairs]


def test_classification_task_scores_labels_and_calibration(tiny, one_torch_thread):
    from hone.eval.runners import evaluate_task, label_probabilities

    model, tokenizer = tiny
    convs = _labelled()
    labels = ["billing", "login", "shipping"]
    result = evaluate_task(model, tokenizer, convs, labels, max_new_tokens=3, calibration_bins=5,
                           task="classification")
    assert result["task"] == "label" and result["task_type"] == "classification" and result["primary"] == "accuracy"
    m = result["metrics"]
    assert list(m)[:8] == ["accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall", "ece", "brier",
                           "prob_accuracy"]
    probs = label_probabilities(model, tokenizer, [c.prompt_messages() for c in convs], labels)
    golds = [labels.index(c.label) for c in convs]
    top = [max(range(3), key=row.__getitem__) for row in probs]
    assert m["prob_accuracy"] == pytest.approx(sum(t == g for t, g in zip(top, golds)) / len(convs))
    assert 0.0 <= m["ece"] <= 1.0 and 0.0 <= m["brier"] <= 2.0
    for saved, row in zip(result["label_probabilities"], probs):
        assert saved == pytest.approx(row, abs=1e-5)
    rows = result["per_example"]
    assert len(rows) == 6 and rows[0]["input"] == "charged twice on my invoice" and rows[0]["input_tokens"] > 0
    assert all(r["confidence"] is None or 0 < r["confidence"] <= 1 for r in rows)
    assert rows[1]["gold_probability"] == pytest.approx(probs[1][labels.index("shipping")], abs=1e-5)
    a = result["analysis"]
    assert a["score_name"] == "accuracy" and sum(s["n"] for s in a["by_length"]) == 6
    assert len(a["worst"]) == sum(r["score"] == 0 for r in rows)
    json.dumps(result)  # saved as eval_*.json


def test_auto_without_labels_is_qa_as_before(tiny, one_torch_thread):
    from hone.eval.runners import evaluate_task

    model, tokenizer = tiny
    labelled = evaluate_task(model, tokenizer, _labelled(3), ["billing", "login", "shipping"], max_new_tokens=2)
    assert labelled["task_type"] == "classification" and {"accuracy", "macro_f1", "micro_f1"} <= set(labelled["metrics"])
    assert "ece" not in labelled["metrics"] and "label_probabilities" not in labelled  # auto: no scoring pass
    result = evaluate_task(model, tokenizer, _free_text(), None, max_new_tokens=3)
    assert result["task"] == "generation" and result["task_type"] == "qa" and result["primary"] == "token_f1"
    assert [k for k in result["metrics"] if k in ("exact_match", "token_f1", "bleu", "accuracy")] == [
        "exact_match", "token_f1"]
    assert result["analysis"]["score_name"] == "token_f1" and len(result["analysis"]["worst"]) == 3


def test_generation_task_and_metric_override(tiny, one_torch_thread):
    from hone.eval.runners import evaluate_task

    model, tokenizer = tiny
    gen = evaluate_task(model, tokenizer, _free_text(), None, max_new_tokens=3, task="generation")
    assert {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "token_f1"} <= set(gen["metrics"])
    assert gen["primary"] == "rougeL" and "exact_match" not in gen["metrics"]
    picked = evaluate_task(model, tokenizer, _labelled(3), ["billing", "login", "shipping"], max_new_tokens=2,
                           metric_names=["macro_f1", "chrf"])
    assert "ece" not in picked["metrics"] and "label_probabilities" not in picked  # no scoring pass asked for
    assert list(picked["metrics"])[:2] == ["macro_f1", "chrf"] and picked["primary"] == "macro_f1"
    assert picked["task"] == "label"  # still a label task: confusion matrix and per-class figures
    qa = evaluate_task(model, tokenizer, _labelled(3), ["billing", "login", "shipping"], max_new_tokens=2, task="qa")
    assert qa["task"] == "generation" and "accuracy" not in qa["metrics"]


def test_extraction_task_scores_json_fields(tiny, one_torch_thread):
    from hone.eval.runners import evaluate_task

    model, tokenizer = tiny
    convs = [Conversation([Message("user", f"order {i} is late"), Message("assistant", json.dumps({"order": i}))])
             for i in range(3)]
    result = evaluate_task(model, tokenizer, convs, None, max_new_tokens=3, task="extraction")
    assert list(result["metrics"])[:5] == ["exact_match", "token_f1", "field_precision", "field_recall", "field_f1"]
    assert result["primary"] == "field_f1" and result["task_type"] == "extraction"
    plain = evaluate_task(model, tokenizer, _free_text(), None, max_new_tokens=2, task="extraction")
    assert "field_f1" not in plain["metrics"] and plain["primary"] == "exact_match"


def test_classification_without_labels_is_an_error(tiny):
    from hone.eval.runners import evaluate_task

    model, tokenizer = tiny
    with pytest.raises(ValueError, match="3 of 3 records have no label"):
        evaluate_task(model, tokenizer, _free_text(), None, task="classification")
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_task(model, tokenizer, _free_text(), None, task="summarise")


def test_config_rejects_bad_metrics():
    from hone.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="unknown metric"):
        parse_config({"data": {"train": "x.jsonl"}, "eval": {"metrics": ["acuracy"]}})
    with pytest.raises(ConfigError, match="need a label task"):
        parse_config({"data": {"train": "x.jsonl"}, "eval": {"task": "generation", "metrics": ["brier"]}})


# --- whole runs: hone train / hone eval on the tiny model --------------------------------------


def test_train_report_has_calibration_and_where_it_fails(tiny_config, one_torch_thread):
    from hone.config import parse_config
    from hone.train.run import run_training

    tiny_config["eval"] = {"enabled": True, "max_new_tokens": 3, "calibration_bins": 5, "general_text": None,
                           "task": "classification"}
    tiny_config["train"]["max_steps"] = 2
    outcome = run_training(parse_config(tiny_config), show_progress=False)
    run_dir = outcome.run_dir
    tuned = json.loads((run_dir / "eval_tuned.json").read_text())
    assert {"ece", "brier", "prob_accuracy", "micro_f1"} <= set(tuned["metrics"])
    assert tuned["analysis"]["by_label"] and len(tuned["per_example"]) == 30
    assert "analysis" in json.loads((run_dir / "eval_base.json").read_text())
    md = (run_dir / "report.md").read_text()
    assert "## Where it fails (tuned)" in md and "| ECE (calibration error) |" in md and "| Brier score |" in md
    assert "By input length" in md and "Hardest labels (3 of 3" in md
    html = (run_dir / "report.html").read_text()
    assert "Where it fails" in html and "most often answered instead" in html
    assert (run_dir / "plots" / "confusion.png").is_file()


def test_sft_classification_on_unlabelled_data_fails_before_model_loads(tiny_config, tmp_path):
    from hone.config import ConfigError, parse_config
    from hone.train.run import run_training

    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(20)]
    data = tmp_path / "free.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_config["data"] = {"train": str(data)}
    tiny_config["model"]["base"] = str(tmp_path / "no-such-model")  # never reached
    tiny_config["eval"] = {"enabled": True, "task": "classification"}
    with pytest.raises(ConfigError, match="held-out records have no label"):
        run_training(parse_config(tiny_config), show_progress=False)


def test_cli_eval_task_option(tiny_model_dir, toy_files, tmp_path):
    from hone.cli import app

    runner = CliRunner()
    out = tmp_path / "e.json"
    args = ["eval", str(tiny_model_dir), "--data", str(toy_files[1]), "--max-examples", "4",
            "--max-new-tokens", "2", "--out", str(out)]
    result = runner.invoke(app, args + ["--task", "qa"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["task_type"] == "qa" and "accuracy" not in saved["metrics"] and "analysis" in saved
    result = runner.invoke(app, args + ["--metrics", "accuracy,ece", "--calibration-bins", "4"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert set(json.loads(out.read_text())["metrics"]) >= {"accuracy", "ece"}
    bad = runner.invoke(app, args + ["--task", "generation", "--metrics", "ece"], catch_exceptions=False)
    assert bad.exit_code == 2 and "--metrics: ece need a label task" in bad.output
    free = tmp_path / "free.jsonl"
    free.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(3)))
    nolabels = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(free), "--task", "classification"],
                             catch_exceptions=False)
    assert nolabels.exit_code == 2 and "no label" in nolabels.output
