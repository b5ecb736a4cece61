"""`hone sweep` on the tiny model: the space is checked before any trial, trials are run directories, the
study resumes, failures are recorded, pruning stops a trial, and the outputs (table, plot, best.yaml) agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hone.config import ConfigError, parse_config
from hone.eval.sweep import (FILES, SweepError, _report_validation, open_study, parse_param, plan_sweep,
                             run_sweep, trial_rows)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sweep_cfg(tiny_config, tmp_path, **sweep):
    raw = dict(tiny_config)
    raw["train"] = {**raw["train"], "max_steps": 3, "save_every": 3, "eval_every": 3}
    raw["sweep"] = {"space": {"train.learning_rate": {"low": "1e-3", "high": 1e-2, "log": True},
                              "lora.r": [2, 4]}, "trials": 3, **sweep}
    return parse_config(raw)


def read_trials(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / FILES["trials"]).read_text().splitlines()]


@pytest.mark.parametrize("space, needle", [
    ({"train.learning_rat": [1e-3]}, "unknown config key 'learning_rat' under 'train'"),
    ({"lora": [1]}, "names a whole section"),
    ({"lora.r.x": [1]}, "'lora.r' is a value"),
    ({"lora.r": [4, 0]}, "lora.r: the value 0 makes an invalid config"),
    ({"train.learning_rate": {"low": 0, "high": 1e-3, "log": True}}, "log range needs low > 0"),
    ({"train.learning_rate": {"low": 1e-2, "high": 1e-3}}, "must be below high"),
    ({"train.learning_rate": {"low": "fast", "high": 1e-3}}, "train.learning_rate.low: expected a number"),
    ({"train.schedule": ["cosine", "sideways"]}, "train.schedule: the value 'sideways'"),
    ({"name": ["a", "b"]}, "the sweep sets this itself"),
])
def test_space_errors_name_the_key(tiny_config, tmp_path, space, needle):
    cfg = parse_config({**tiny_config, "sweep": {"space": space}})
    with pytest.raises(SweepError, match=None) as e:
        plan_sweep(cfg, out=tmp_path / "s")
    assert needle in str(e.value)
    assert not (tmp_path / "s").exists()  # nothing ran


def test_param_kinds():
    assert parse_param("train.epochs", {"low": 1, "high": 3}).integer
    lr = parse_param("train.learning_rate", {"low": "1e-4", "high": 3e-3, "log": True})
    assert (lr.low, lr.integer, lr.log) == (1e-4, False, True)
    assert parse_param("train.epochs", {"low": 1, "high": 2, "step": 0.5}).values() == [1.0, 1.5, 2.0]
    with pytest.raises(SweepError, match="needs a list of values or a range with a step"):
        lr.values()


def test_dotted_keys_under_sweep_are_the_space(tiny_config):
    cfg = parse_config({**tiny_config, "sweep": {"lora.r": [2, 4], "trials": 2}})
    assert cfg.sweep.space == {"lora.r": [2, 4]} and cfg.sweep.trials == 2
    with pytest.raises(ConfigError, match="sweep.trial"):
        parse_config({**tiny_config, "sweep": {"trial": 2}})


def test_sweep_runs_ranks_and_resumes(tiny_config, tmp_path):
    cfg = sweep_cfg(tiny_config, tmp_path)
    plan = plan_sweep(cfg, out=tmp_path / "s")
    assert plan.metric == "val_loss" and plan.direction == "minimize"  # eval disabled in tiny_config
    result = run_sweep(plan, echo=lambda m: None)
    rows = read_trials(plan.sweep_dir)
    assert [r["state"] for r in rows] == ["complete"] * 3
    values = [r["value"] for r in rows]
    assert values == sorted(values) and [r["rank"] for r in rows] == [1, 2, 3]
    for r in rows:  # each trial is a normal run directory with the trial's params in its config
        run_dir = Path(r["run_dir"])
        assert run_dir.name == f"{plan.name}-trial-{r['trial']:03d}"
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["lora"]["r"] == r["params"]["lora.r"]
        assert saved["train"]["learning_rate"] == pytest.approx(r["params"]["train.learning_rate"])
        assert 1e-3 <= saved["train"]["learning_rate"] <= 1e-2
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["training"]["final_val_loss"] == pytest.approx(r["val_loss"]) == pytest.approx(r["value"])
    best = yaml.safe_load((plan.sweep_dir / FILES["best"]).read_text())
    assert "sweep" not in best and best["name"] == f"{plan.name}-best"
    assert best["lora"]["r"] == rows[0]["params"]["lora.r"]
    parse_config(best)  # ready for `hone train`
    summary = (plan.sweep_dir / FILES["summary"]).read_text()
    assert f"Best: trial {rows[0]['trial']}" in summary and "| rank | trial | state | train.learning_rate" in summary
    assert (plan.sweep_dir / FILES["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert result["best"]["trial"] == rows[0]["trial"]

    run_sweep(plan_sweep(cfg, out=tmp_path / "s"), echo=lambda m: None)  # finished: nothing reruns
    assert read_trials(plan.sweep_dir) == rows
    more = run_sweep(plan_sweep(cfg, out=tmp_path / "s", trials=4), echo=lambda m: None)
    assert len(more["rows"]) == 4
    params = [tuple(sorted(r["params"].items())) for r in more["rows"]]
    assert len(set(params)) == 4  # the resumed sampler does not propose earlier trials again

    changed = sweep_cfg(tiny_config, tmp_path)
    changed.sweep.space["lora.r"] = [2, 8]
    with pytest.raises(SweepError, match="differs at: space.lora.r"):
        run_sweep(plan_sweep(changed, out=tmp_path / "s"), echo=lambda m: None)


def test_failed_trial_is_recorded_and_sweep_goes_on(tiny_config, tmp_path):
    tiny_config["data"]["on_too_long"] = "error"
    cfg = sweep_cfg(tiny_config, tmp_path, sampler="grid", trials=5)
    cfg.sweep.space.clear()
    cfg.sweep.space["data.max_seq_len"] = [16, 256]  # 16 tokens cannot hold a toy example: that trial fails
    plan = plan_sweep(cfg, out=tmp_path / "g")
    assert plan.trials == 2  # capped at the grid's size
    run_sweep(plan, echo=lambda m: None)
    rows = {r["params"]["data.max_seq_len"]: r for r in read_trials(plan.sweep_dir)}
    assert rows[256]["state"] == "complete" and rows[256]["rank"] == 1
    assert rows[16]["state"] == "fail" and "max_seq_len" in rows[16]["error"]
    assert "## Failed and pruned trials" in (plan.sweep_dir / FILES["summary"]).read_text()


def test_a_trial_left_running_is_continued(tiny_config, tmp_path):
    plan = plan_sweep(sweep_cfg(tiny_config, tmp_path, trials=1), out=tmp_path / "r")
    study = open_study(plan)
    stale = study.ask({p.key: p.distribution() for p in plan.params})  # as if the process died mid-trial
    run_sweep(plan, echo=lambda m: None)
    rows = read_trials(plan.sweep_dir)
    assert len(rows) == 1 and rows[0]["trial"] == stale.number and rows[0]["state"] == "complete"
    assert rows[0]["params"] == stale.params


def test_pruning_stops_a_worse_trial(tmp_path):
    import optuna

    import hone.train.run as run_module
    from hone.train.runlog import RunLog

    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = study.ask()
    first.report(1.0, 3)
    study.tell(first, 1.0)
    trial = study.ask()
    with _report_validation(trial, "minimize"):
        log = run_module.RunLog(tmp_path)
        log.metric({"step": 3, "split": "train", "loss": 9.0})  # training rows are not judged
        with pytest.raises(optuna.TrialPruned, match="validation loss 5.0000 at step 3"):
            log.metric({"step": 3, "split": "validation", "loss": 5.0})
    assert run_module.RunLog is RunLog  # restored after the trial
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # the run's log is still written
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    pruned = [r for r in trial_rows(study, "minimize") if r["state"] == "pruned"]
    assert pruned[0]["value"] is None and pruned[0]["val_loss"] == 5.0 and pruned[0]["rank"] is None


def test_pruning_needs_eval_every(tiny_config, tmp_path):
    tiny_config["train"]["eval_every"] = None
    cfg = parse_config({**tiny_config, "sweep": {"space": {"lora.r": [2, 4]}, "pruning": "median"}})
    with pytest.raises(SweepError, match="train.eval_every"):
        plan_sweep(cfg)


def test_cli_sweep(tiny_config, tmp_path):
    from hone.cli import app

    raw = dict(tiny_config)
    raw["train"] = {**raw["train"], "max_steps": 2, "save_every": 2, "eval_every": 2}
    raw["sweep"] = {"lora.r": [2, 4], "trials": 2, "sampler": "grid"}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "best:" in res.output and len(read_trials(tmp_path / "c")) == 2
    bad = CliRunner().invoke(app, ["sweep", str(path), "--set", "sweep.space.lora.alpha=[0, 1]"])
    assert bad.exit_code == 2 and "lora.alpha: the value 0" in bad.output
