"""What the one loop and the report take from a method's Task, beyond its loss: epochs counted by
micro-batches, perplexity only for token losses, the method's own marks on examples, extra answers, method
facts and method statistics over steps; and what the loaders and data checks say when used the wrong way."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from hone.config import parse_config
from hone.eval.report import write_report
from hone.methods import Task, validate_method_data
from hone.train.loop import plan_run, record_validation
from hone.train.prepare import DataProblems
from hone.train.run import report_example


def _task(plans: dict[int, list]) -> Task:
    return Task(epoch_plan=lambda e: plans.get(e, ["x"] * 4), collate=lambda s: s, loss_sum=None, held_out=[],
                tokens_per_epoch=0)


def _cfg(**train):
    return parse_config({"data": {"train": "unused.jsonl"}, "train": train})


def test_epochs_count_micro_batches_even_when_epochs_differ_in_length():
    task = _task({0: ["a"] * 4, 1: ["b"] * 2})
    batches, done = plan_run(task, _cfg(epochs=2))
    assert batches == ["a"] * 4 + ["b"] * 2
    assert done == [0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    batches, done = plan_run(task, _cfg(epochs=1.5))  # half of epoch 1's two micro-batches
    assert done == [0.25, 0.5, 0.75, 1.0, 1.5]
    batches, done = plan_run(task, _cfg(max_steps=3, grad_accum=3))  # nine micro-batches: into epoch 2
    assert len(batches) == 9 and done[-1] == pytest.approx(2 + 3 / 4)


class _Log:
    def __init__(self):
        self.rows = []

    def metric(self, row):
        self.rows.append(row)


@pytest.mark.parametrize("token_loss", [True, False])
def test_validation_perplexity_only_for_token_losses(token_loss):
    state = {"step": 4, "best_val_loss": None, "best_step": None}
    log = _Log()
    record_validation(state, (0.7, {"reward_accuracy": 0.6}), log, token_loss)
    assert ("perplexity" in log.rows[0]) == token_loss
    assert log.rows[0]["reward_accuracy"] == 0.6 and state["best_step"] == 4


def test_report_uses_the_methods_marks_extra_answers_facts_and_stats(tmp_path):
    base = {"prompt": "refund me", "reference": "refund", "output": "no",
            "judged": {"ok": False, "mark": "✗ reward 0.00"}}
    tuned = {"prompt": "refund me", "reference": "refund", "output": "Cancellation is a refund.",
             "judged": {"ok": True, "mark": "✓ reward 1.00"}, "teacher": "refund"}
    example = report_example(base, tuned)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": s, "split": "train", "loss": 0.1, "reward": s / 10, "kl": s / 100} for s in range(1, 6)]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    info = {"name": "r", "status": "succeeded", "config_yaml": "",
            "data": {"train_examples": 3, "method_facts": {"distillation mode": "logits", "teacher parameters": 1234}},
            "training": {"method": "rlhf", "plot_stats": ["reward", "kl", "not_logged"]},
            "eval": {"task": "rlhf", "n": 1, "primary": "mean_reward", "base": {"mean_reward": 0.0},
                     "tuned": {"mean_reward": 1.0}, "examples": [example]}}
    paths = write_report(run_dir, info)
    md = paths["md"].read_text()
    assert "✓ reward 1.00" in md and "✗ reward 0.00" in md
    assert "token F1" not in md  # the reference comparison is not used when the method judged
    assert "| teacher | refund |" in md
    assert "| distillation mode | logits |" in md and "| teacher parameters | 1,234 |" in md
    assert "method_stats_plot" in paths and paths["method_stats_plot"].read_bytes()[:4] == b"\x89PNG"
    assert "Method statistics" in paths["html"].read_text()


def test_no_method_stats_plot_without_stats(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    info = {"name": "r", "status": "succeeded", "config_yaml": "", "data": {}, "training": {"plot_stats": ["kl"]},
            "eval": None}
    assert "method_stats_plot" not in write_report(run_dir, info)


@pytest.mark.parametrize("method, pointer", [("reward", "load_scorer"), ("contrastive", "load_encoder")])
def test_loading_a_non_generating_run_points_at_its_loader(tmp_path, method, pointer):
    from hone.models.load import ModelError, load_model

    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"method": method, "model": {"base": "x"}}))
    with pytest.raises(ModelError, match=pointer):
        load_model(str(run_dir))


def test_line_problems_come_before_a_too_small_split(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + '{"prompt": "x"}\n')
    cfg = SimpleNamespace(data=SimpleNamespace(train=str(data), validation=None, validation_fraction=0.1,
                                               max_validation=100, skip_bad_lines=False),
                          train=SimpleNamespace(seed=0), method="dpo")

    def parse(row):
        if "chosen" not in row:
            from hone.methods import RowError
            raise RowError("missing_field", "needs 'chosen' and 'rejected'")
        return row

    with pytest.raises(DataProblems) as err:
        validate_method_data(cfg, parse, "'chosen' and 'rejected'")
    assert f"{data}:2:" in str(err.value)


@pytest.mark.parametrize("name, lower", [("latency_per_request", True), ("prompt_tokens_per_request", True),
                                         ("seconds_per_example", True), ("ece", True), ("accuracy", False),
                                         ("tokens_per_second", False), ("recall_at_1", False)])
def test_cost_metrics_read_as_lower_is_better(name, lower):
    from hone.eval.report import lower_is_better

    assert lower_is_better(name) == lower
