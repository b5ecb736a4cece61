"""Tests for hone.eval.report: files written, PNGs valid, verdict honest, HTML escaped, gaps tolerated."""

import copy
import html
import json

import pytest

from hone.eval.metrics import INVALID
from hone.eval.report import _rolling_mean, confusion_grid, read_loss_series, verdict, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = ["billing", "card_arrival", "refund"]

INFO = {
    "name": "support-intents",
    "status": "succeeded",
    "config_yaml": "model:\n  name: tiny\nlora:\n  r: 8\n",
    "data": {"train_examples": 360, "validation_examples": 40, "train_tokens": 51234, "target_tokens": 1440,
             "truncated": 0, "skipped": 0, "rejected": 0, "shapes": {"label": 360}, "labels": LABELS},
    "training": {"method": "lora", "steps": 120, "epochs": 2.0, "seconds": 754.2, "tokens_per_second": 812.5,
                 "trainable_params": 1_081_344, "total_params": 494_032_768, "device": "cpu", "precision": "bf16",
                 "final_train_loss": 0.412, "final_val_loss": 0.523, "val_perplexity": 1.687, "best_step": 100},
    "eval": {
        "task": "label", "n": 120,
        "base": {"accuracy": 0.25, "macro_f1": 0.2, "invalid": 30, "seconds": 12.5},
        "tuned": {"accuracy": 2 / 3, "macro_f1": 0.61, "invalid": 2, "seconds": 11.0},
        "base_confusion": {"billing": {"billing": 10, INVALID: 30}},
        "tuned_confusion": {"billing": {"billing": 35, "refund": 3, INVALID: 2},
                            "card_arrival": {"card_arrival": 30, "billing": 10},
                            "refund": {"refund": 15, "card_arrival": 25}},
        "labels": LABELS,
        "examples": [
            {"prompt": "Classify: <script>alert('x')</script> I was charged twice", "reference": "billing",
             "base": "It sounds like a refund", "tuned": "billing"},
            {"prompt": "Classify: where is my card? " + "long " * 500, "reference": "card_arrival",
             "base": "card arrival", "tuned": "refund"},
        ],
    },
}


def _write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _curve_rows(steps=120, val_every=20):
    rows = [{"step": s, "split": "train", "loss": 2.5 / (1 + 0.05 * s), "lr": 1e-4} for s in range(1, steps + 1)]
    rows += [{"step": s, "split": "validation", "loss": 2.6 / (1 + 0.04 * s)}
             for s in range(val_every, steps + 1, val_every)]
    rows.append({"step": steps, "split": "validation", "event": "no loss here"})  # ignored: no "loss"
    return rows


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "runs" / "support-intents"
    _write_metrics(path, _curve_rows())
    return path


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_full_label_report(run_dir):
    paths = write_report(run_dir, INFO)
    assert set(paths) == {"md", "html", "loss_plot", "base_vs_tuned_plot", "confusion_plot"}
    for key in ("loss_plot", "base_vs_tuned_plot", "confusion_plot"):
        assert paths[key].parent == run_dir / "plots"
        _assert_png(paths[key])
    page = paths["html"].read_text()
    expected = ("The tuned model beats the base model by +41.7 points of accuracy on 120 held-out examples "
                "(25.0% -> 66.7%).")
    assert verdict(INFO) == expected
    assert expected in html.unescape(page)
    for number in ("25.0%", "66.7%", "+41.7 pts", "61.0%", "+41.0 pts", "12m 34s", "1,081,344"):
        assert number in page
    assert page.count("data:image/png;base64,") == 3  # self-contained: plots inlined, not linked
    assert 'src="plots/' not in page
    assert "<details>" in page and "lora:" in page
    md = paths["md"].read_text()
    assert md.splitlines()[2] == f"**{expected}**"
    assert "![loss curves](plots/loss.png)" in md and "```yaml\nmodel:" in md


def test_html_and_md_escape_prompt(run_dir):
    paths = write_report(run_dir, INFO)
    page = paths["html"].read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "<script>" not in paths["md"].read_text().split("```text")[0]  # outside code fences, escaped too


def test_examples_marked_and_clipped(run_dir):
    page = write_report(run_dir, INFO)["html"].read_text()
    assert "✓ correct" in page  # tuned "billing"
    assert "✗ read as refund" in page  # base prose mentioning refund
    assert "characters omitted" in page  # the 2,500-character prompt was clipped
    assert page.count("long long") < 400


def test_data_counts_always_shown(run_dir):
    md = write_report(run_dir, INFO)["md"].read_text()
    for name in ("truncated records | 0", "skipped records | 0", "rejected records | 0", "label: 360"):
        assert name in md
    info = copy.deepcopy(INFO)
    del info["data"]["rejected"]  # a loop that forgot the field still shows it, as 0
    assert "rejected records | 0" in write_report(run_dir, info)["md"].read_text()


def test_eval_disabled_omits_sections(run_dir):
    info = {**INFO, "eval": None}
    paths = write_report(run_dir, info)
    assert set(paths) == {"md", "html", "loss_plot"}
    page = paths["html"].read_text()
    assert "Base vs tuned" not in page and "Confusion" not in page and "Examples" not in page
    assert "evaluation was not run" in page and "0.523" in page
    assert not (run_dir / "plots" / "confusion.png").exists()


def test_stale_plots_removed(run_dir):
    write_report(run_dir, INFO)
    assert (run_dir / "plots" / "confusion.png").exists()
    write_report(run_dir, {**INFO, "eval": None})
    assert not (run_dir / "plots" / "confusion.png").exists()


def test_no_metrics_file_no_validation_rows(tmp_path):
    paths = write_report(tmp_path / "empty", INFO)
    assert "loss_plot" not in paths and "Loss curves" not in paths["html"].read_text()
    _write_metrics(tmp_path / "trainonly", [{"step": 1, "split": "train", "loss": 2.0}, {"step": 2, "split": "train"}])
    with (tmp_path / "trainonly" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "split": "tra')  # a run killed mid-write leaves a partial line
    paths = write_report(tmp_path / "trainonly", INFO)
    _assert_png(paths["loss_plot"])
    assert read_loss_series(tmp_path / "trainonly" / "metrics.jsonl") == {"train": [(1, 2.0)], "validation": []}


def test_no_base_results(run_dir):
    info = copy.deepcopy(INFO)
    info["eval"]["base"] = None
    info["eval"]["base_confusion"] = None
    paths = write_report(run_dir, info)
    assert verdict(info) == ("The tuned model scores 66.7% accuracy on 120 held-out examples; the base model "
                             "was not evaluated, so there is no comparison.")
    _assert_png(paths["base_vs_tuned_plot"])
    assert "The base model was not evaluated." in paths["html"].read_text()


@pytest.mark.parametrize(
    "tuned, expected",
    [
        (0.2, "The tuned model did not improve on the base model: accuracy fell by 5.0 points on 120 held-out "
              "examples (25.0% -> 20.0%)."),
        (0.2504, "The tuned model did not improve on the base model: accuracy stayed at 25.0% on 120 held-out "
                 "examples."),
    ],
)
def test_honest_verdict_when_not_better(run_dir, tuned, expected):
    info = copy.deepcopy(INFO)
    info["eval"]["tuned"]["accuracy"] = tuned
    assert verdict(info) == expected
    assert expected in html.unescape(write_report(run_dir, info)["html"].read_text())


def test_generation_task_uses_token_f1(run_dir):
    info = copy.deepcopy(INFO)
    info["eval"] = {
        "task": "generation", "n": 1,
        "base": {"exact_match": 0.0, "token_f1": 0.5, "seconds": 3.0},
        "tuned": {"exact_match": 1.0, "token_f1": 1.0, "seconds": 2.5},
        "base_confusion": None, "tuned_confusion": None, "labels": None,
        "examples": [{"prompt": "Capital of France?", "reference": "Paris", "base": "Paris, France", "tuned": "Paris"}],
    }
    paths = write_report(run_dir, info)
    assert "confusion_plot" not in paths
    assert verdict(info) == ("The tuned model beats the base model by +50.0 points of token F1 on 1 held-out "
                             "example (50.0% -> 100.0%).")
    page = paths["html"].read_text()
    assert "✓ exact match" in page and "✗ token F1 0.67" in page
    assert '<td class="num good">-0.5</td>' in page  # seconds: shown plainly, not as a percentage


def test_minimal_info_does_not_crash(tmp_path):
    paths = write_report(tmp_path / "bare", {})
    page = paths["html"].read_text()
    assert "n/a" in page and "evaluation was not run" in page
    weird = {"eval": {"task": "label", "base": {"accuracy": "oops"}, "tuned": {}, "examples": [{}]}, "data": None}
    paths = write_report(tmp_path / "weird", weird)
    assert "no comparable score" in paths["md"].read_text()


def test_confusion_grid_adds_invalid_column_last():
    rows, cols, grid = confusion_grid({"a": {"b": 2, INVALID: 1}, "c": {"stray": 1}}, ["a", "b"])
    assert rows == ["a", "b", "c"]
    assert cols == ["a", "b", "c", "stray", INVALID]
    assert grid == [[0, 2, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0]]


def test_many_labels_confusion(tmp_path):
    labels = [f"intent_label_number_{i:02d}" for i in range(80)]
    confusion = {g: {g: 3, labels[(i + 1) % 80]: 1, INVALID: i % 2} for i, g in enumerate(labels)}
    info = copy.deepcopy(INFO)
    info["eval"].update(labels=labels, tuned_confusion=confusion, examples=[])
    paths = write_report(tmp_path / "many", info)
    _assert_png(paths["confusion_plot"])


def test_rolling_mean_is_centred_and_shrinks_at_edges():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert list(_rolling_mean(values, 3)) == pytest.approx([1.5, 2.0, 3.0, 17 / 3, 7.0])


def test_method_primary_metric_and_lower_is_better_verdicts():
    """Methods name their own primary metric; perplexity-like metrics improve by falling."""
    from hone.eval.report import is_fraction_metric, judge

    ppl = {"eval": {"n": 20, "primary": "domain_perplexity", "base": {"domain_perplexity": 30.2, "accuracy": 0.5},
                    "tuned": {"domain_perplexity": 12.5, "accuracy": 0.4}}}
    assert judge(ppl) == ("The tuned model beats the base model: domain perplexity fell (30.2 -> 12.5) on 20 "
                          "held-out examples.", "good")
    ppl["eval"]["tuned"]["domain_perplexity"] = 31.0
    assert judge(ppl)[1] == "bad" and "rose (30.2 -> 31)" in judge(ppl)[0]
    reward = {"eval": {"n": 5, "primary": "mean_reward", "base": {"mean_reward": 0.3}, "tuned": {"mean_reward": 0.3}}}
    assert judge(reward)[1] == "bad" and "stayed at 0.3" in judge(reward)[0]
    assert all(map(is_fraction_metric, ["preference_accuracy", "recall_at_5", "mrr", "teacher_agreement"]))
    assert not any(map(is_fraction_metric, ["domain_perplexity", "mean_reward", "logp_margin"]))
