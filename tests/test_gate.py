"""The evaluation gate: targets parsed at config time, checked after the run, shown in manifest, report and
terminal, and `hone train`'s exit code (0 passed, 2 a target naming no metric, 3 a target missed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hone.cli import app
from hone.config import ConfigError, parse_config, parse_target
from hone.train.run import gate_checks, gate_values

runner = CliRunner()


@pytest.mark.parametrize("text,expected", [("accuracy >= 0.85", ("accuracy", ">=", 0.85)),
                                           ("perplexity<=20", ("perplexity", "<=", 20.0)),
                                           ("  val_loss < 1e-1 ", ("val_loss", "<", 0.1)),
                                           ("forgetting == -0.5", ("forgetting", "==", -0.5))])
def test_parse_target(text, expected):
    assert parse_target(text) == expected


@pytest.mark.parametrize("target,message", [("accuracy => 0.85", "unknown operator '=>'"),
                                            ("accuracy ≥ 0.85", "unknown operator '≥'"),
                                            ("accuracy >= high", "cannot read target"),
                                            ("accuracy", "cannot read target")])
def test_bad_target_is_a_config_error_naming_it(target, message):
    with pytest.raises(ConfigError, match="eval.targets") as e:
        parse_config({"data": {"train": "x.jsonl"}, "eval": {"targets": ["perplexity <= 20", target]}})
    assert message in str(e.value) and repr(target) in str(e.value)


def test_checks_by_hand():
    values = {"accuracy": 0.85, "val_loss": 1.2, "perplexity": 21.0, "train_loss": None}
    gate = gate_checks(["accuracy >= 0.85", "accuracy > 0.85", "perplexity <= 20", "val_loss < 1.5"], values)
    assert [c["passed"] for c in gate["checks"]] == [True, False, False, True]
    assert not gate["passed"] and "error" not in gate
    assert gate_checks(["accuracy >= 0.85"], values) == {
        "passed": True, "checks": [{"target": "accuracy >= 0.85", "metric": "accuracy", "op": ">=",
                                    "threshold": 0.85, "value": 0.85, "passed": True}]}
    missing = gate_checks(["bleu >= 10", "train_loss < 1"], values)
    assert not missing["passed"]
    assert missing["error"] == ("eval.targets name metrics this run did not produce: bleu, train_loss; metrics "
                                "that exist: accuracy, perplexity, val_loss")
    assert not gate_checks(["val_loss < 5"], {"val_loss": float("nan")})["passed"]


def test_values_prefer_the_evaluations_own_figures():
    training = {"final_val_loss": 2.0, "final_train_loss": 1.0, "val_perplexity": 7.39}
    values = gate_values(training, {"metrics": {"accuracy": 0.5, "perplexity": 9.0, "confusion": {}}},
                         {"tuned_perplexity": 30.0, "change": 0.2})
    assert values == {"val_loss": 2.0, "train_loss": 1.0, "perplexity": 9.0, "val_perplexity": 7.39,
                      "general_perplexity": 30.0, "forgetting": 0.2, "accuracy": 0.5}


def _train(tiny_config, tmp_path, targets, **eval_cfg):
    cfg = dict(tiny_config, eval={"enabled": True, "max_new_tokens": 2, "targets": targets, **eval_cfg})
    cfg["train"] = {**tiny_config["train"], "max_steps": 2}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["train", str(path)], catch_exceptions=False)
    run_dir = next(Path(cfg["output_dir"]).iterdir())
    return result, run_dir


def test_missed_target_exits_3_and_is_reported(tiny_config, tmp_path, one_torch_thread):
    result, run_dir = _train(tiny_config, tmp_path, ["accuracy >= 0.99", "val_loss <= 1000"])
    assert result.exit_code == 3, result.output
    gate = json.loads((run_dir / "manifest.json").read_text())["gate"]
    assert gate["passed"] is False and [c["passed"] for c in gate["checks"]] == [False, True]
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "succeeded"  # the run itself did
    assert "gate: FAILED" in result.output and "missed" in result.output
    report = (run_dir / "report.md").read_text()
    assert "**Gate: FAILED.**" in report and "| accuracy >= 0.99 | 0 | MISSED |" in report
    assert "Gate: FAILED" in (run_dir / "report.html").read_text()


def test_met_targets_exit_0(tiny_config, tmp_path, one_torch_thread):
    result, run_dir = _train(tiny_config, tmp_path, ["val_loss <= 1000", "general_perplexity > 1"])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "manifest.json").read_text())["gate"]["passed"] is True
    assert "gate: passed" in result.output


def test_unknown_metric_is_refused_before_training(tiny_config, tmp_path):
    result, run_dir = _train(tiny_config, tmp_path, ["acuracy >= 0.9"])
    assert result.exit_code == 2
    assert "'acuracy'" in result.output and "metrics that exist:" in result.output
    assert "accuracy" in result.output.split("metrics that exist:")[1]
    assert not (run_dir / "checkpoints").exists()


def test_without_evaluation_only_training_figures_exist(tiny_config, tmp_path):
    result, run_dir = _train(tiny_config, tmp_path, ["accuracy >= 0.9"], enabled=False)
    assert result.exit_code == 2
    assert "eval.enabled is false" in result.output and "val_loss" in result.output
