"""Early stopping and the overfitting watch: the decision rule by hand, then whole runs on the tiny model
(stopping restores the best weights, a task metric can be watched, a killed run resumes to the same
decisions and weights)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from test_loop import _hone, _wait_for, final_weights, metrics, run

from hone.train.loop import new_early_stop, stop_direction, update_early_stop


def decide(values, direction="min", patience=2, min_delta=0.0):
    es = new_early_stop("m", direction)
    improved = [update_early_stop(es, v, step, patience, min_delta) for step, v in enumerate(values, 1)
                if es["stopped_step"] is None]
    return es, improved


def test_patience_and_min_delta_by_hand():
    # 0.89 beats 0.90 by more than 0.005; 0.898 does not; then two evaluations without improvement stop it.
    es, improved = decide([1.0, 0.9, 0.95, 0.89, 0.898, 0.92, 0.5], min_delta=0.005)
    assert improved == [True, True, False, True, False, False]
    assert (es["best"], es["best_step"], es["stopped_step"], es["bad_evals"]) == (0.89, 4, 6, 2)


def test_higher_is_better_and_non_finite_never_improves():
    es, improved = decide([0.5, float("nan"), 0.7, 0.7, None], direction="max", patience=2)
    assert improved == [True, False, True, False, False]
    assert es["best_step"] == 3 and es["stopped_step"] == 5


def test_no_stop_while_improving():
    es, _ = decide([5, 4, 3, 2, 1], patience=1)
    assert es["stopped_step"] is None and es["best_step"] == 5


@pytest.mark.parametrize("metric,mode,expected", [("val_loss", "auto", "min"), ("accuracy", "auto", "max"),
                                                  ("domain_perplexity", "auto", "min"), ("token_f1", "auto", "max"),
                                                  ("accuracy", "min", "min"), ("primary", "auto", None)])
def test_direction(metric, mode, expected):
    assert stop_direction(metric, mode) == expected


def es_config(tiny_config, **es):
    cfg = dict(tiny_config)
    # A constant schedule makes "the weights after step B" independent of how long the run was planned.
    cfg["train"] = {**tiny_config["train"], "max_steps": 30, "eval_every": 2, "save_every": 2, "schedule": "constant",
                    "keep_checkpoints": 1, "early_stopping": {"enabled": True, **es}}
    return cfg


def test_stop_restores_best_weights(tiny_config, one_torch_thread):
    # min_delta larger than any change: the first evaluation is the best, and patience 3 stops at step 8.
    out = run(es_config(tiny_config, patience=3, min_delta=100.0))
    d = out.run_dir
    es = json.loads((d / "manifest.json").read_text())["training"]["early_stopping"]
    assert (es["best_step"], es["stopped_step"], es["restored_step"]) == (2, 8, 2)
    assert [r["step"] for r in metrics(d, "validation")] == [2, 4, 6, 8]
    assert max(r["step"] for r in metrics(d, "train")) == 8
    # Only the newest step checkpoint is kept, but the best weights survive beside it.
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["best.safetensors", "step-000008"]
    with safe_open(str(d / "checkpoints" / "best.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2"
    # final/ holds exactly what a run that simply trained for 2 steps ends with.
    short = dict(tiny_config, name="two-steps")
    short["train"] = {**es_config(tiny_config)["train"], "max_steps": 2, "early_stopping": {"enabled": False}}
    expected, got = final_weights(run(short).run_dir), final_weights(d)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # The figures reported describe the restored weights: their validation loss is step 2's.
    assert out.summary["training"]["final_val_loss"] == pytest.approx(metrics(d, "validation")[0]["loss"], abs=1e-6)
    report = (d / "report.md").read_text()
    assert "Stopped early at step 8" in report and "weights of step 2" in report


def test_restore_best_off_keeps_last_weights(tiny_config, one_torch_thread):
    out = run(es_config(tiny_config, patience=1, min_delta=100.0, restore_best=False))
    es = out.summary["training"]["early_stopping"]
    assert es["stopped_step"] == 4 and "restored_step" not in es
    assert not (out.run_dir / "checkpoints" / "best.safetensors").exists()


@pytest.mark.parametrize("metric", ["accuracy", "primary"])
def test_task_metric_is_evaluated_at_each_evaluation(tiny_config, metric, one_torch_thread):
    cfg = es_config(tiny_config, metric=metric, patience=2)
    cfg["train"]["max_steps"] = 6
    cfg["eval"] = {"enabled": True, "max_new_tokens": 2}
    out = run(cfg)
    rows = metrics(out.run_dir, "eval")
    es = out.summary["training"]["early_stopping"]
    assert es["metric"] == metric and es["watched"] == "accuracy" and es["direction"] == "max"
    assert [r["step"] for r in rows] == list(range(2, (es["stopped_step"] or 6) + 1, 2))
    assert all("accuracy" in r for r in rows)
    assert es["best"] == max(r["accuracy"] for r in rows)


def test_unknown_metric_is_refused_before_training(tiny_config):
    from hone.train.run import RunError

    cfg = es_config(tiny_config, metric="acuracy")
    cfg["eval"] = {"enabled": True, "max_new_tokens": 2}
    with pytest.raises(RunError, match=r"'acuracy'.*metrics that exist: primary, train_loss, val_loss.*accuracy"):
        run(cfg)
    assert not list(Path(cfg["output_dir"]).glob("*/checkpoints"))


def test_overfitting_watch_flags_rise_while_train_falls():
    from hone.eval.report import overfitting_watch

    series = {"train": [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0), (5, 0.8), (6, 0.6)],
              "validation": [(2, 2.0), (4, 1.8), (6, 2.1)]}
    w = overfitting_watch(series, threshold=0.10)
    assert (w["best_step"], w["final_step"]) == (4, 6)
    assert w["rise"] == pytest.approx(2.1 / 1.8 - 1)
    assert w["train_at_best"] == pytest.approx((1.5 + 1.0) / 2) and w["train_at_final"] == pytest.approx(0.7)
    assert w["flagged"] and [g["gap"] for g in w["gaps"]] == pytest.approx([-0.5, 0.55, 1.4])
    assert not overfitting_watch(series, threshold=0.20)["flagged"]  # 16.7% is under a 20% threshold
    rising_train = {"train": [(4, 1.0), (6, 1.2)], "validation": [(4, 1.8), (6, 2.1)]}
    assert not overfitting_watch(rising_train)["flagged"]  # both rise: not the overfitting pattern
    assert overfitting_watch({"train": [(1, 1.0)], "validation": []}) is None


# ---- kill and resume: the same decisions and the same weights --------------------------------------------

def _resume_cfg(tiny_config, tmp_path, output: str) -> Path:
    cfg = es_config(tiny_config, patience=4, min_delta=100.0)
    cfg.update(name="es-resumable", output_dir=str(tmp_path / output))
    cfg["train"].update(max_steps=120, save_every=5, eval_every=10, keep_checkpoints=2, log_every=10)
    cfg["lora"] = {"dropout": 0.1}  # dropout draws random numbers: resume must restore the RNG too
    path = tmp_path / f"{output}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_then_resume_makes_the_same_decisions(tiny_config, tmp_path):
    ref_cfg = yaml.safe_load(_resume_cfg(tiny_config, tmp_path, "reference").read_text())
    reference = run(ref_cfg).run_dir
    expected_es = json.loads((reference / "manifest.json").read_text())["training"]["early_stopping"]
    assert (expected_es["best_step"], expected_es["stopped_step"]) == (10, 50)

    cfg_path = _resume_cfg(tiny_config, tmp_path, "killed")
    run_dir = tmp_path / "killed" / "es-resumable"
    proc = _hone("train", str(cfg_path))
    _wait_for(run_dir / "checkpoints", "step-000035", proc)  # after the best (10), before the stop (50)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final").exists()
    resumed = _hone("train", str(cfg_path), "--resume")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    got_es = json.loads((run_dir / "manifest.json").read_text())["training"]["early_stopping"]
    assert got_es == expected_es
    expected, got = final_weights(reference), final_weights(run_dir)
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs after resume"
