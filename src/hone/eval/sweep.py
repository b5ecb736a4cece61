"""`hone sweep CONFIG.yaml`: hyperparameter search with Optuna, where every trial is a normal `hone train` run.

The config's `sweep:` section names the search space by dotted config key (`train.learning_rate: {low: 1e-4,
high: 3e-3, log: true}`, `lora.r: [4, 8, 16]`), the number of trials, the metric, the sampler and optional
pruning. The space is checked against RunConfig before any trial runs (an unknown key or a value the config
would reject stops the sweep with the key's name), and so is the data.

    sweep_dir/
      study.db              Optuna's study (SQLite): re-running the same command continues it
      <name>-trial-000/     one run directory per trial (report.html, metrics.jsonl, final/ ...)
      trials.jsonl          one row per trial: params, state, metric, val loss, seconds, run dir, error
      summary.md            trials ranked by the metric
      sweep.png             the metric per trial, and against the most important parameter
      best.yaml             the best trial's full config, ready for `hone train best.yaml`

A trial that fails is recorded with its error and the sweep goes on; a trial cut short (Ctrl-C, a killed
process) is resumed from its newest checkpoint when the sweep is run again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from hone.config import ConfigError, RunConfig, parse_config
from hone.eval.report import lower_is_better

STUDY_NAME = "hone-sweep"
FILES = {"db": "study.db", "trials": "trials.jsonl", "summary": "summary.md", "plot": "sweep.png",
         "best": "best.yaml"}
VAL_LOSS = "val_loss"
# Keys a trial may not change: they say where the trial's run directory goes, which the sweep decides.
FIXED_KEYS = ("name", "output_dir")


class SweepError(ConfigError):
    """A sweep that cannot run as configured (phrased for the user; exit code 2)."""


# --- the search space ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    key: str                       # dotted config key, e.g. train.learning_rate
    choices: tuple | None = None   # a list of values, or
    low: float | None = None       # a range
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def distribution(self, grid: bool = False):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None or grid:
            return CategoricalDistribution(self.values())
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def values(self) -> list:
        """Every value (for choices and the grid sampler); a float range needs a step."""
        if self.choices is not None:
            return list(self.choices)
        if not self.integer and self.step is None:
            raise SweepError(f"sweep.space.{self.key}: sampler grid needs a list of values or a range with a "
                             "step (or integer bounds)")
        n = int(math.floor((self.high - self.low) / (self.step or 1) + 1e-9)) + 1
        vals = [self.low + i * (self.step or 1) for i in range(n)]
        return [int(v) for v in vals] if self.integer else [round(v, 12) for v in vals]


def _number(value, where: str) -> float | int:
    # YAML reads 1e-4 (no dot) as a string; accept it as the number the user meant.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise SweepError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SweepError(f"{where}: expected a number, got {value!r}")
    return value


def parse_param(key: str, spec) -> Param:
    where = f"sweep.space.{key}"
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"{where}: the list of choices is empty")
        if len({json.dumps(v, sort_keys=True) for v in spec}) != len(spec):
            raise SweepError(f"{where}: the choices repeat a value")
        return Param(key, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: expected a list of choices or {{low, high, log?, step?}}, got {spec!r}")
    unknown = sorted(set(spec) - {"low", "high", "log", "step"})
    if unknown or "low" not in spec or "high" not in spec:
        raise SweepError(f"{where}: a range needs 'low' and 'high' (optional 'log', 'step')"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    step = _number(spec["step"], f"{where}.step") if spec.get("step") is not None else None
    log = bool(spec.get("log", False))
    integer = all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int))
    if not low < high:
        raise SweepError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise SweepError(f"{where}: a log range needs low > 0 (got {low})")
    if log and step is not None:
        raise SweepError(f"{where}: give either log or step, not both (Optuna samples one or the other)")
    if step is not None and step <= 0:
        raise SweepError(f"{where}: step must be positive (got {step})")
    return Param(key, low=low, high=high, log=log, step=step, integer=integer)


def check_key(key: str) -> None:
    """The dotted key must name a field of RunConfig (a leaf, not a whole section)."""
    from pydantic import BaseModel

    if key.split(".")[0] in FIXED_KEYS or key.startswith("sweep"):
        raise SweepError(f"sweep.space.{key}: the sweep sets this itself; it cannot be searched")
    model, walked = RunConfig, []
    for part in key.split("."):
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else None
        if fields is None:
            raise SweepError(f"sweep.space.{key}: '{'.'.join(walked)}' is a value, not a section")
        if part not in fields:
            near = ", ".join(sorted(fields)[:40])
            raise SweepError(f"sweep.space.{key}: unknown config key '{part}' under "
                             f"'{'.'.join(walked) or 'the top level'}' (known: {near})")
        walked.append(part)
        model = fields[part].annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        raise SweepError(f"sweep.space.{key}: names a whole section; name one of its keys, e.g. {key}."
                         f"{next(iter(model.model_fields))}")


def check_values(raw: dict, p: Param) -> None:
    """Every choice (or both range ends) must give a valid config."""
    candidates = p.values() if p.choices is not None else [p.low, p.high]
    for value in candidates:
        try:
            parse_config(set_key(raw, p.key, value), source="sweep")
        except ConfigError as e:
            detail = str(e).split("\n", 1)[-1].strip()
            raise SweepError(f"sweep.space.{p.key}: the value {value!r} makes an invalid config: {detail}") from None


def set_key(raw: dict, key: str, value) -> dict:
    """A deep copy of `raw` with the dotted key set (the value as given: no YAML parsing)."""
    copy = json.loads(json.dumps(raw))
    node = copy
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return copy


# --- the plan: everything checked before the first trial ----------------------------------------------


@dataclass
class SweepPlan:
    cfg: RunConfig
    raw: dict             # the base config as plain values, without its sweep section
    params: list[Param]
    metric: str | None    # None: the method's primary metric, learnt from the first trial
    direction: str
    sweep_dir: Path
    name: str
    trials: int


def resolve_metric(cfg: RunConfig) -> tuple[str | None, str]:
    """(metric, direction). The primary metric of every method is higher-is-better except cpt's perplexity;
    each finished trial is checked against that, so a method whose primary changes cannot go unnoticed."""
    s = cfg.sweep
    metric = s.metric
    if metric is None and not cfg.eval.enabled:
        metric = VAL_LOSS
    if metric is not None and metric != VAL_LOSS and not cfg.eval.enabled:
        raise SweepError(f"sweep.metric {metric!r} is a held-out metric but eval.enabled is false: enable eval "
                         f"or use sweep.metric: {VAL_LOSS}")
    if s.direction != "auto":
        return metric, s.direction
    if metric is None:
        return None, "minimize" if cfg.objective == "cpt" else "maximize"
    return metric, "minimize" if lower_is_better(metric) else "maximize"


def plan_sweep(cfg: RunConfig, *, out: Path | None = None, trials: int | None = None) -> SweepPlan:
    """Check the space, the metric and the data (no model loads), and say where everything goes."""
    from hone.methods import method_module

    if not cfg.sweep.space:
        raise SweepError("the config has no sweep space: add e.g.\n  sweep:\n    space:\n      "
                         "train.learning_rate: {low: 1e-4, high: 3e-3, log: true}\n      lora.r: [4, 8, 16]")
    raw = cfg.model_dump(mode="json")
    raw.pop("sweep")
    params = []
    for key, spec in cfg.sweep.space.items():
        check_key(key)
        params.append(parse_param(key, spec))
        check_values(raw, params[-1])
    metric, direction = resolve_metric(cfg)
    n = trials if trials is not None else cfg.sweep.trials
    if n < 1:
        raise SweepError(f"--trials must be at least 1 (got {n})")
    if cfg.sweep.sampler == "grid":
        n = min(n, math.prod(len(p.values()) for p in params))
    if cfg.sweep.pruning != "none" and cfg.train.eval_every is None:
        raise SweepError("sweep.pruning needs train.eval_every (validation loss every N steps) to judge trials "
                         "while they run")
    if cfg.data.prepare:
        from hone.train.run import run_prepare_stage

        cfg = run_prepare_stage(cfg)
        raw["data"] = cfg.model_dump(mode="json")["data"]
    method_module(cfg.objective).validate(cfg)  # bad data stops the sweep before any trial
    name = cfg.name or f"{Path(cfg.data.train).stem}-{cfg.method}"
    sweep_dir = out or Path(cfg.output_dir) / f"{name}-sweep"
    return SweepPlan(cfg, raw, params, metric, direction, Path(sweep_dir), name, n)


# --- the study -----------------------------------------------------------------------------------------


def open_study(plan: SweepPlan):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = plan.sweep_dir / FILES["db"]
    fresh = not db.is_file()
    if fresh and any(plan.sweep_dir.glob(f"{plan.name}-trial-*")):
        raise SweepError(f"{plan.sweep_dir} holds trial runs but no {FILES['db']}: pick another --out, or remove "
                         "the old trials")
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    identity = json.loads(json.dumps({  # as stored: plain JSON values
        "config": plan.raw, "space": {p.key: plan.cfg.sweep.space[p.key] for p in plan.params},
        "metric": plan.metric, "direction": plan.direction, "sampler": plan.cfg.sweep.sampler,
        "pruning": plan.cfg.sweep.pruning}))
    storage = "sqlite:///" + str(db.resolve())
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=plan.direction,
                                load_if_exists=True, sampler=make_sampler(plan, 0), pruner=make_pruner(plan))
    if fresh or "identity" not in study.user_attrs:
        study.set_user_attr("identity", identity)
    elif study.user_attrs["identity"] != identity:
        diffs = sorted(_diff_keys(study.user_attrs["identity"], identity))
        raise SweepError(f"{plan.sweep_dir} is a sweep of a different config (differs at: {', '.join(diffs)}); "
                         "run it with the config it started with (only sweep.trials may change), or use "
                         "another --out")
    return study


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def make_sampler(plan: SweepPlan, done: int):
    """The sampler, seeded per trial from (seed, trials done): a resumed sweep does not propose its first
    trials again (a seeded sampler restarts its random stream in every process). The seed is hashed because
    numpy's generators seeded 0 and 3 (say) draw nearly the same first number."""
    import hashlib

    import optuna

    s = plan.cfg.sweep
    seed = int(hashlib.sha256(f"{s.seed}:{done}".encode()).hexdigest()[:8], 16)
    if s.sampler in ("random", "grid"):  # grid: run_sweep enqueues each point; the sampler is never asked
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(plan: SweepPlan):
    import optuna

    if plan.cfg.sweep.pruning == "median":
        # Two finished trials before any is pruned: sweeps here are short, and one trial is a thin median.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=plan.cfg.sweep.pruning_warmup_steps)
    return optuna.pruners.NopPruner()


def trial_config(plan: SweepPlan, params: dict, number: int) -> RunConfig:
    raw = plan.raw
    for key, value in params.items():
        raw = set_key(raw, key, value)
    raw.update(name=f"{plan.name}-trial-{number:03d}", output_dir=str(plan.sweep_dir))
    return parse_config(raw, source=f"sweep trial {number}")


def run_sweep(plan: SweepPlan, *, show_progress: bool = False, echo=print) -> dict:
    """Run (or continue) the sweep until plan.trials trials have finished; write the outputs. Returns the
    output paths and the ranked rows."""
    from optuna.trial import Trial, TrialState

    study = open_study(plan)
    distributions = {p.key: p.distribution(grid=plan.cfg.sweep.sampler == "grid") for p in plan.params}
    # Trials a killed sweep left running: continue their run directories (the loop resumes from a checkpoint).
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        echo(f"trial {stale.number}: resuming")
        # Trial(study, id) is how Optuna itself reattaches to a stored trial.
        run_trial(plan, study, Trial(study, stale._trial_id), show_progress, echo)
        write_outputs(plan, study)
    while True:
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                           TrialState.FAIL)))
        if done >= plan.trials:
            break
        study.sampler = make_sampler(plan, done)
        if plan.cfg.sweep.sampler == "grid":
            todo = next_grid_point(plan, study)
            if todo is None:
                break
            study.enqueue_trial(todo)  # ask() takes enqueued params before asking the sampler
        run_trial(plan, study, study.ask(distributions), show_progress, echo)
        write_outputs(plan, study)  # after every trial, so a sweep stopped midway has a current summary
    return write_outputs(plan, study)


def next_grid_point(plan: SweepPlan, study) -> dict | None:
    """The first combination (in a seeded shuffled order) no trial has tried yet. Optuna's GridSampler
    stops the study through optimize(), which this ask/tell loop does not use, so the grid is walked here."""
    import itertools
    import random

    keys = [p.key for p in plan.params]
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*(p.values() for p in plan.params))]
    random.Random(plan.cfg.sweep.seed).shuffle(grid)
    tried = [t.params for t in study.get_trials(deepcopy=False)]
    return next((g for g in grid if g not in tried), None)


def run_trial(plan: SweepPlan, study, trial, show_progress: bool, echo) -> None:
    """Train one trial and tell the study how it went. Ctrl-C leaves it running (a re-run resumes it)."""
    import optuna
    from optuna.trial import TrialState

    from hone.train.loop import Interrupted
    from hone.train.run import run_training, write_manifest

    cfg = trial_config(plan, trial.params, trial.number)
    run_dir = Path(cfg.output_dir) / cfg.name
    trial.set_user_attr("run_dir", str(run_dir))
    resume = (run_dir / "config.yaml").is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # died before it wrote anything worth keeping
    echo(f"trial {trial.number}: {_fmt_params(trial.params)}")
    start = time.perf_counter()
    try:
        with _report_validation(trial, plan.direction):
            run_training(cfg, resume=resume, show_progress=show_progress)
        value, metric, val_loss = trial_value(run_dir, plan)
    except Interrupted:
        raise
    except optuna.TrialPruned as e:
        write_manifest(run_dir, status="pruned", error=str(e))
        _finish(study, trial, start, state=TrialState.PRUNED, error=str(e))
        echo(f"trial {trial.number}: pruned ({e})")
        return
    except SweepError as e:
        _finish(study, trial, start, state=TrialState.FAIL, error=str(e))
        raise
    except Exception as e:  # noqa: BLE001 - a failed trial is recorded and the sweep goes on
        _finish(study, trial, start, state=TrialState.FAIL, error=f"{type(e).__name__}: {e}")
        echo(f"trial {trial.number}: failed: {e}")
        return
    trial.set_user_attr("metric", metric)
    trial.set_user_attr("val_loss", val_loss)
    _finish(study, trial, start, value=value)
    echo(f"trial {trial.number}: {metric} = {value:.4g}")


def _finish(study, trial, start: float, *, value=None, state=None, error: str | None = None) -> None:
    trial.set_user_attr("seconds", round(time.perf_counter() - start + trial.user_attrs.get("seconds", 0.0), 2))
    if error:
        trial.set_user_attr("error", error[:2000])
    study.tell(trial, value, state=state) if state is not None else study.tell(trial, value)


@contextlib.contextmanager
def _report_validation(trial, direction: str):
    """Report each validation loss the run logs to the trial, and stop the trial when the pruner says so.

    run_training builds its own RunLog, so for the length of one trial the name it uses is pointed at a
    subclass that also reports. (A `run_training(on_metric=...)` hook would make this unnecessary.)"""
    import optuna

    import hone.train.run as run_module

    original = run_module.RunLog
    sign = -1.0 if direction == "maximize" else 1.0  # the pruner compares in the study's direction

    class ReportingLog(original):
        def metric(self, row: dict) -> None:
            super().metric(row)
            loss = row.get("loss")
            if row.get("split") != "validation" or loss is None or not math.isfinite(loss):
                return
            trial.report(sign * loss, int(row["step"]))
            trial.set_user_attr("val_loss", loss)  # the table's val loss for a trial that gets pruned
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {loss:.4f} at step {row['step']} is worse than the "
                                         "median of earlier trials")

    run_module.RunLog = ReportingLog
    try:
        yield
    finally:
        run_module.RunLog = original


def trial_value(run_dir: Path, plan: SweepPlan) -> tuple[float, str, float | None]:
    """(value, metric name, final val loss) from a finished run directory."""
    from hone.eval.report import primary_metric

    manifest = json.loads((run_dir / "manifest.json").read_text())
    val_loss = (manifest.get("training") or {}).get("final_val_loss")
    if plan.metric == VAL_LOSS:
        if val_loss is None:
            raise SweepError(f"sweep.metric is {VAL_LOSS} but {run_dir} logged no validation loss (no held-out "
                             "data?)")
        return float(val_loss), VAL_LOSS, val_loss
    tuned_file = run_dir / "eval_tuned.json"
    tuned = json.loads(tuned_file.read_text()) if tuned_file.is_file() else None
    if tuned is None:
        raise SweepError(f"{run_dir} has no held-out evaluation (eval_tuned.json); set sweep.metric: {VAL_LOSS}")
    metrics = {k: v for k, v in tuned["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metric = plan.metric or primary_metric({"task": tuned["task"], "primary": tuned.get("primary"),
                                            "tuned": metrics})
    if metric not in metrics:
        raise SweepError(f"sweep.metric {metric!r} is not among the metrics this method reports "
                         f"({', '.join(sorted(metrics))})")
    if plan.metric is None and (lower_is_better(metric) != (plan.direction == "minimize")):
        raise SweepError(f"the method's primary metric {metric!r} is not {plan.direction}d; set sweep.metric and "
                         "sweep.direction explicitly")
    return float(metrics[metric]), metric, val_loss


# --- outputs ---------------------------------------------------------------------------------------------


def trial_rows(study, direction: str) -> list[dict]:
    """One row per trial, ranked: completed trials best first (ties: lower val loss), then pruned, failed, running."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"trial": t.number, "state": t.state.name.lower(), "params": t.params,
                     # a pruned trial's Optuna value is its last (signed) validation loss, not the metric
                     "metric": t.user_attrs.get("metric"), "value": t.value if t.state.name == "COMPLETE" else None,
                     "val_loss": t.user_attrs.get("val_loss"), "seconds": t.user_attrs.get("seconds"),
                     "run_dir": t.user_attrs.get("run_dir"), "error": t.user_attrs.get("error")})
    sign = -1 if direction == "maximize" else 1
    order = {"complete": 0, "pruned": 1, "fail": 2, "running": 3, "waiting": 4}
    # Equal metrics are common on small held-out sets (accuracy moves in steps of 1/n): lower val loss first.
    rows.sort(key=lambda r: (order.get(r["state"], 5), sign * r["value"] if r["value"] is not None else 0,
                             r["val_loss"] if r["val_loss"] is not None else math.inf, r["trial"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank if r["state"] == "complete" else None
    return rows


def importances(study, params: list[Param]) -> dict[str, float]:
    """Optuna's parameter importances (its default evaluator), or {} with too few completed trials to say."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(params) == 1:
        return {params[0].key: 1.0}
    if len(complete) < 2:
        return {}
    try:
        with warnings.catch_warnings():  # "importances will be equal" on a handful of trials: the table says so
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # e.g. every completed trial has the same params
        return {}


def write_outputs(plan: SweepPlan, study) -> dict:
    rows = trial_rows(study, plan.direction)
    imp = importances(study, plan.params)
    d = plan.sweep_dir
    _atomic_write(d / FILES["trials"], "".join(json.dumps(r) + "\n" for r in rows))
    best = next((r for r in rows if r["state"] == "complete"), None)
    paths = {"trials": d / FILES["trials"], "summary": d / FILES["summary"]}
    if best:
        _atomic_write(d / FILES["best"], best_yaml(plan, best))
        paths["best"] = d / FILES["best"]
    if plot_sweep(rows, plan.params, imp, plan.direction, d / FILES["plot"]):
        paths["plot"] = d / FILES["plot"]
    _atomic_write(d / FILES["summary"], summary_markdown(plan, rows, imp, best))
    return {"paths": paths, "rows": rows, "best": best, "importances": imp}


def best_yaml(plan: SweepPlan, best: dict) -> str:
    """The best trial's resolved config with a fresh name, the original output_dir and absolute data paths."""
    raw = yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text())
    raw.pop("sweep", None)
    raw.update(name=f"{plan.name}-best", output_dir=plan.cfg.output_dir)
    for key in ("train", "validation", "prepare"):
        if raw["data"].get(key) and Path(raw["data"][key]).exists():
            raw["data"][key] = str(Path(raw["data"][key]).resolve())
    resolved = parse_config(raw, source="best trial").model_dump(mode="json")
    resolved.pop("sweep")  # best.yaml is a training config; `hone train` needs no sweep section
    head = (f"# best trial {best['trial']} of the sweep in {plan.sweep_dir}: {best['metric']} = "
            f"{best['value']:.4g} with {_fmt_params(best['params'])}\n# train it: hone train {FILES['best']}\n")
    return head + yaml.safe_dump(resolved, sort_keys=False)


def summary_markdown(plan: SweepPlan, rows: list[dict], imp: dict, best: dict | None) -> str:
    keys = [p.key for p in plan.params]
    metric = (best or {}).get("metric") or plan.metric or "primary metric"
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    lines = [f"# Sweep: {plan.name}", "",
             f"{len(rows)} trial(s): {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} "
             f"failed. Metric: **{metric}** ({plan.direction}), sampler {plan.cfg.sweep.sampler} "
             f"(seed {plan.cfg.sweep.seed}), pruning {plan.cfg.sweep.pruning}.", ""]
    if best:
        lines += [f"Best: trial {best['trial']}, {metric} = {_fmt(best['value'])} with {_fmt_params(best['params'])}."
                  f" Its config: `{FILES['best']}` (`hone train {plan.sweep_dir / FILES['best']}`).", ""]
    header = ["rank", "trial", "state", *keys, metric, "val loss", "seconds", "run dir"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["rank"] or ""), str(r["trial"]), r["state"], *[_fmt(r["params"].get(k)) for k in keys],
                 _fmt(r["value"]), _fmt(r["val_loss"]), _fmt(r["seconds"]), f"`{r['run_dir']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    if imp:
        lines += ["", "Parameter importance (Optuna's importance evaluator; rough with few trials): "
                  + ", ".join(f"{k} {v:.0%}" for k, v in sorted(imp.items(), key=lambda kv: -kv[1])) + "."]
    errors = [r for r in rows if r["error"]]
    if errors:
        lines += ["", "## Failed and pruned trials", ""]
        lines += [f"- trial {r['trial']} ({r['state']}): {r['error'].splitlines()[0]}" for r in errors]
    lines += ["", f"![sweep]({FILES['plot']})", ""]
    return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def plot_sweep(rows: list[dict], params: list[Param], imp: dict, direction: str, path: Path) -> Path | None:
    """Two panels: the metric per trial (with the best so far), and the metric against the most important
    parameter. Matplotlib's Agg canvas directly, as in report.py (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, NullFormatter

    done = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: r["trial"])
    if not done:
        return None
    metric = done[0]["metric"]
    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    xs, ys = [r["trial"] for r in done], [r["value"] for r in done]
    pick = max if direction == "maximize" else min
    best_so_far = [pick(ys[:i + 1]) for i in range(len(ys))]
    left.plot(xs, ys, "o", color="#2b6cb0", label="trial")
    left.step(xs, best_so_far, where="post", color="#dd6b20", label="best so far")
    labelled = set()
    for r in rows:  # failed / pruned trials: a mark on the axis, so gaps are explained
        if r["state"] in ("fail", "pruned"):
            left.axvline(r["trial"], color="#c53030" if r["state"] == "fail" else "#9aa5b1", lw=0.8, ls=":",
                         label=None if r["state"] in labelled else r["state"].replace("fail", "failed"))
            labelled.add(r["state"])
    left.set(xlabel="trial", ylabel=metric, title=f"{metric} per trial ({direction})")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.legend(loc="best", fontsize=8)
    key = max(imp, key=imp.get) if imp else params[0].key
    param = next(p for p in params if p.key == key)
    values = [r["params"].get(key) for r in done]
    if param.choices is not None or any(isinstance(v, (str, bool)) for v in values):
        labels = [str(v) for v in (param.choices or sorted(set(values), key=str))]
        right.set_xticks(range(len(labels)), labels)
        right.plot([labels.index(str(v)) for v in values], ys, "o", color="#2b6cb0")
    else:
        right.plot(values, ys, "o", color="#2b6cb0")
        if param.log:
            right.set_xscale("log")
            right.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide over a short range
        right.set_xlim(param.low, param.high)  # the whole range searched, so its coverage shows
    share = f" (importance {imp[key]:.0%})" if imp and len(params) > 1 else ""
    right.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key}{share}")
    fig.tight_layout()
    fig.savefig(path)
    return path
