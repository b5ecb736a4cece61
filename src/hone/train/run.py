"""`hone train`: one run from config to report, laid out as DESIGN.md's run directory.

validate data (no model yet) -> load model -> tokenize -> evaluate the base model on held-out data ->
train (the loop) -> save final/ -> evaluate the tuned model -> report. Each finished phase leaves a file, so
`--resume` after a crash or SIGKILL repeats nothing that is done.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from hone import __version__
from hone.config import RunConfig, dump_config
from hone.methods import Task, method_module
from hone.models.adapters import apply_weights, check_supported, count_params, save_weights
from hone.models.load import load_model
from hone.train.checkpoint import latest_checkpoint
from hone.train.device import pick_device, use_bf16
from hone.train.loop import Interrupted, capped_perplexity, train_loop
from hone.train.runlog import RunLog


class RunError(ValueError):
    pass


@dataclass
class RunOutcome:
    run_dir: Path
    status: str
    summary: dict


def resolve_run_dir(cfg: RunConfig, resume: bool) -> Path:
    root = Path(cfg.output_dir)
    base = cfg.name or f"{Path(cfg.data.prepare or cfg.data.train).stem}-{cfg.method}"
    candidates = [root / base] + sorted((p for p in root.glob(f"{base}-*") if p.name[len(base) + 1:].isdigit()),
                                        key=lambda p: int(p.name[len(base) + 1:]))
    existing = [p for p in candidates if p.exists()]
    if resume:
        if not existing:
            raise RunError(f"--resume: no run named '{base}' under {root}/ to resume")
        return existing[-1]
    if cfg.name and existing:
        raise RunError(f"{root / base} already exists: add --resume to continue it, or pick another name")
    if not existing:
        return root / base
    return root / f"{base}-{len(existing) + 1}"


def check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    now = cfg.model_dump(mode="json")
    diffs = sorted(_diff_keys(saved, now))
    if diffs:
        raise RunError(f"--resume: the config differs from the one {run_dir} started with, at: "
                       f"{', '.join(diffs)}. Resume with the same config, or start a new run.")


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(run_dir: Path, **updates) -> dict:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest.update(updates)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
    return manifest


def data_lineage(train_file: str) -> dict | None:
    """The `hone data` report that produced the training file, if any: the chain back to the raw export."""
    from hone.data.stage import report_path

    p = Path(train_file)
    for candidate in (report_path(p), p.parent / "split.report.json"):
        if candidate.is_file():
            try:
                return {"report": str(candidate), **json.loads(candidate.read_text())["lineage"]}
            except (json.JSONDecodeError, KeyError):
                return {"report": str(candidate), "error": "unreadable report"}
    return None


def initial_manifest(cfg: RunConfig) -> dict:
    import peft
    import transformers

    return {"hone": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "platform": platform.platform(),
            "command": sys.argv, "seed": cfg.train.seed, "device": str(pick_device()),
            "data": {"train": cfg.data.train, "train_sha256": file_sha256(cfg.data.train),
                     "validation": cfg.data.validation, "validation_sha256": file_sha256(cfg.data.validation),
                     "lineage": data_lineage(cfg.data.train)},
            "started": _now(), "status": "running"}


def save_final(model, tokenizer, cfg: RunConfig, run_dir: Path, module) -> Path:
    final, tmp = run_dir / "final", run_dir / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    getattr(module, "save", save_weights)(model, tokenizer, cfg, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def run_eval_once(run_dir: Path, name: str, task: Task, model, cfg: RunConfig) -> dict | None:
    """The method's held-out evaluation, cached to eval_<name>.json so a resumed run does not repeat it."""
    if not cfg.eval.enabled or task.evaluate is None:
        return None
    path = run_dir / f"eval_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = task.evaluate(model)
    path.write_text(json.dumps(result, indent=2))
    return result


def run_training(cfg: RunConfig, *, resume: bool = False, show_progress: bool = True) -> RunOutcome:
    if cfg.data.prepare:
        cfg = run_prepare_stage(cfg)
    run_dir = resolve_run_dir(cfg, resume)
    module = method_module(cfg.objective)
    data = module.validate(cfg)  # bad data stops us before any model is loaded
    check_supported(cfg)  # as does a qlora run on a device whose bitsandbytes cannot run 4-bit layers
    read_forgetting_text(cfg)  # and a missing or bad general-text file
    if resume:
        check_resume_config(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    log = RunLog(run_dir)
    if not resume or not (run_dir / "manifest.json").is_file():
        write_manifest(run_dir, **initial_manifest(cfg))
    try:
        return _run(cfg, module, run_dir, data, log, show_progress)
    except Interrupted:
        write_manifest(run_dir, status="interrupted")
        raise
    except Exception as e:
        log.event("error", f"run failed: {e}")
        write_manifest(run_dir, status="failed", error=str(e), ended=_now())
        raise


def run_prepare_stage(cfg: RunConfig) -> RunConfig:
    """Run the data.prepare recipe and point data.train/validation at its outputs (the same recipe and
    sources give the same files, so a resumed run sees the data it started with)."""
    from hone.data.recipe import prepare

    files = prepare(Path(cfg.data.prepare))["files"]
    data = cfg.data.model_copy(update={"train": files["train"],
                                       "validation": files.get("validation", cfg.data.validation)})
    return cfg.model_copy(update={"data": data})


def load_for_training(cfg: RunConfig, module):
    """The method's own loader (a reward head, an encoder, a shrunk student), else the base model.

    qlora: first check that bitsandbytes' 4-bit layers run on this device (a clear error before any model
    loads), then load the base with 4-bit NF4 linear layers (a method's own model is quantised in place,
    its extra modules such as a score head kept in full precision)."""
    from hone.models.adapters import load_quantized, quantize_in_place

    if hasattr(module, "load"):
        loaded = module.load(cfg)
        if cfg.weights == "qlora":
            quantize_in_place(loaded.model, cfg, keep=getattr(module, "MODULES_TO_SAVE", None) or ())
        return loaded
    if cfg.weights == "qlora":
        return load_quantized(cfg)
    return load_model(cfg.model.base, allow_download=cfg.model.allow_download,
                      trust_remote_code=cfg.model.trust_remote_code)


def _run(cfg: RunConfig, module, run_dir: Path, data, log: RunLog, show_progress: bool) -> RunOutcome:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    loaded = load_for_training(cfg, module)
    model, tokenizer = loaded.model, loaded.tokenizer
    device = pick_device()
    model.to(device)
    task = module.build(cfg, data, model, tokenizer, run_dir, log)
    _log_data(log, task.stats, run_dir)
    if task.labels:  # `hone eval RUN` renders prompts with the same label list
        (run_dir / "labels.json").write_text(json.dumps(task.labels))
    base_eval = run_eval_once(run_dir, "base", task, model, cfg)
    forgetting = forgetting_check(cfg, run_dir, "base", model, tokenizer, base_eval, task)
    check_metric_names(cfg, task, base_eval, forgetting)  # a target naming no metric stops us before training
    model = apply_weights(model, cfg, getattr(module, "PEFT_TASK", "CAUSAL_LM"),
                          getattr(module, "MODULES_TO_SAVE", None))
    if task.before_training:
        task.before_training(model)
    trainable, total = count_params(model)  # after before_training: it may unfreeze (cpt's embeddings)
    result = train_loop(model, task, cfg, run_dir, log, resume_from=latest_checkpoint(run_dir),
                        show_progress=show_progress)
    final = save_final(model, tokenizer, cfg, run_dir, module)
    log.event("info", f"saved final weights to {final}")
    tuned_eval = run_eval_once(run_dir, "tuned", task, model, cfg)
    forgetting = forgetting_check(cfg, run_dir, "tuned", model, tokenizer, tuned_eval, task)
    training = {"method": cfg.method, "objective": cfg.objective, "weights": cfg.weights, "steps": result.steps,
                "epochs": result.epochs, "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                "trainable_params": trainable, "total_params": total, "device": str(device),
                "precision": "bf16" if use_bf16(device, cfg.train.precision) else "fp32",
                "peak_memory_mb": peak_memory_mb(device),
                "final_train_loss": result.final_train_loss, "final_val_loss": result.final_val_loss,
                "val_perplexity": None if result.final_val_loss is None or not task.token_loss
                else capped_perplexity(result.final_val_loss),
                "best_step": result.best_step, "validation": result.val_stats, "plot_stats": task.plot_stats,
                **iteration_figures(cfg, run_dir, result, log)}
    gate = gate_checks(cfg.eval.targets, gate_values(training, tuned_eval, forgetting)) if cfg.eval.targets else None
    info = build_report_info(cfg, run_dir, task, training, base_eval, tuned_eval)
    info.update(gate=gate, forgetting=forgetting)
    from hone.eval.report import write_report

    write_report(run_dir, info)
    write_manifest(run_dir, status="succeeded", ended=_now(), training=training, gate=gate, forgetting=forgetting)
    _log_verdicts(log, gate, forgetting)
    log.event("info", f"report: {run_dir / 'report.html'}")
    return RunOutcome(run_dir, "succeeded", {"training": training, "eval": info["eval"], "gate": gate,
                                             "forgetting": forgetting})


def _log_verdicts(log: RunLog, gate: dict | None, forgetting: dict | None) -> None:
    if forgetting and forgetting.get("flagged"):
        log.event("warn", f"forgetting: general-text perplexity {forgetting['base_perplexity']:.4g} -> "
                          f"{forgetting['tuned_perplexity']:.4g} ({100 * forgetting['change']:+.1f}%, threshold "
                          f"{100 * forgetting['threshold']:.0f}%)")
    if gate:
        missed = [c["target"] for c in gate["checks"] if not c["passed"]]
        log.event("info" if gate["passed"] else "warn",
                  "gate passed" if gate["passed"] else f"gate failed: {', '.join(missed)}"
                  + (f" ({gate['error']})" if gate.get("error") else ""))


def peak_memory_mb(device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on a GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _log_data(log: RunLog, s: dict, run_dir: Path) -> None:
    if "train_examples" in s:
        log.event("info", f"data: {s['train_examples']} train / {s.get('validation_examples', 0)} held-out "
                          f"examples, {s.get('train_tokens', 0)} tokens, {s.get('truncated', 0)} truncated, "
                          f"{s.get('rejected', 0)} rejected")
    if s.get("rejected"):
        log.event("warn", f"{s['rejected']} example(s) rejected; reasons in {run_dir / 'rejects.jsonl'}")
    if s.get("truncated"):
        log.event("warn", f"{s['truncated']} example(s) truncated to {s.get('max_seq_len_key', 'data.max_seq_len')}")


def build_report_info(cfg, run_dir, task: Task, training, base_eval, tuned_eval) -> dict:
    info = {"name": run_dir.name, "status": "succeeded", "config_yaml": dump_config(cfg),
            "data": task.stats, "training": training, "eval": None}
    if base_eval and tuned_eval:
        examples = [report_example(b, t) for b, t in zip(base_eval.get("examples") or [],
                                                          tuned_eval.get("examples") or [])]
        info["eval"] = {"task": tuned_eval["task"], "n": tuned_eval["n"], "primary": tuned_eval.get("primary"),
                        "base": base_eval["metrics"], "tuned": tuned_eval["metrics"],
                        "base_confusion": base_eval.get("confusion"),
                        "tuned_confusion": tuned_eval.get("confusion"),
                        "labels": task.labels or None,
                        "examples": pick_examples(examples, cfg.eval.examples_in_report)}
    return info


def report_example(base: dict, tuned: dict) -> dict:
    """One held-out example for the report: both answers, the method's own marks when it judges its outputs
    (rlhf's reward, contrastive's retrieval), and the teacher's answer for distillation."""
    row = {"prompt": base["prompt"], "reference": base["reference"], "base": base["output"], "tuned": tuned["output"]}
    for side, ex in (("base", base), ("tuned", tuned)):
        if ex.get("judged"):
            row[f"{side}_judged"] = ex["judged"]
    if tuned.get("teacher") is not None:
        row["extra"] = [{"side": "teacher", "text": tuned["teacher"]}]
    return row


def pick_examples(examples: list[dict], n: int) -> list[dict]:
    """Show where the models differ first (that is what a reader wants to see), then the rest."""
    differ = [e for e in examples if e["base"] != e["tuned"]]
    same = [e for e in examples if e["base"] == e["tuned"]]
    return (differ + same)[:n]



# --- forgetting check and evaluation gate ------------------------------------------------------------------

CAUSAL_LM_OBJECTIVES = ("sft", "cpt", "dpo", "orpo", "simpo", "rlhf", "distill")  # not reward, contrastive


def forgetting_text_path(cfg: RunConfig) -> Path | None:
    """The general-text file of the forgetting check, or None when the check is off for this run."""
    from hone.methods import cpt

    if cfg.eval.general_text is None or not cfg.eval.enabled or cfg.objective not in CAUSAL_LM_OBJECTIVES:
        return None
    if cfg.objective == "cpt":  # cpt measures general perplexity in its own evaluation, on cpt.general_text
        return cpt.general_text_path(cfg)
    return cpt.GENERAL_TEXT if cfg.eval.general_text == "builtin" else Path(cfg.eval.general_text)


def read_forgetting_text(cfg: RunConfig) -> list[str]:
    """The general documents (cpt's row parser; any bad line stops the run before a model loads)."""
    from hone.methods.cpt import NEEDS, parse_document
    from hone.methods import read_method_rows
    from hone.train.prepare import DataProblems

    path = forgetting_text_path(cfg)
    if path is None or cfg.objective == "cpt":  # cpt.validate reads and checks its own file
        return []
    if not path.is_file():
        raise RunError(f"eval.general_text: {path} does not exist (a .jsonl/.csv/.parquet file of {{text}} rows; "
                       "'builtin' for the general-English sample shipped with hone; null turns the forgetting "
                       "check off)")
    rows, problems = read_method_rows(path, parse_document, NEEDS)
    if problems or not rows:
        raise DataProblems(problems, f"eval.general_text: {path} must hold {NEEDS}.")
    return [text for _, text in rows]


def general_perplexity(cfg: RunConfig, model, tokenizer, docs: list[str]) -> tuple[float | None, int]:
    """(perplexity, tokens) of the general text, packed and scored exactly as method cpt scores it."""
    from hone.methods.cpt import mean_token_loss, pack_documents, separator_id
    from hone.methods.sft import packed_batches

    block = cfg.data.max_seq_len
    blocks, tokens = pack_documents(tokenizer, docs, block, separator_id(tokenizer, None), cfg.cpt.general_max_tokens)
    batches = packed_batches(blocks, block, max(1, cfg.train.batch_tokens // block), tokenizer.pad_token_id)
    device = pick_device()
    was_training = model.training
    model.eval()  # no dropout in a measurement
    loss = mean_token_loss(model, batches, device, use_bf16(device, cfg.train.precision))
    model.train(was_training)
    return (None if loss is None else capped_perplexity(loss)), tokens


def forgetting_check(cfg: RunConfig, run_dir: Path, side: str, model, tokenizer, ev: dict | None,
                     task: Task) -> dict | None:
    """Measure general-text perplexity for `side` ("base" before the adapter is applied, "tuned" after
    training) into forgetting.json (so a resumed run does not repeat it); after "tuned", flag the run when
    perplexity rose by more than eval.forgetting_threshold. cpt's numbers come from its own evaluation."""
    path = forgetting_text_path(cfg)
    cache = run_dir / "forgetting.json"
    if path is None:
        return None
    fg = json.loads(cache.read_text()) if cache.is_file() else {"file": str(path), "threshold": cfg.eval.forgetting_threshold}
    key = f"{side}_perplexity"
    if key not in fg:
        if cfg.objective == "cpt":
            fg[key] = ((ev or {}).get("metrics") or {}).get("general_perplexity")
            fg["tokens"] = task.stats.get("general_tokens")
        else:
            fg[key], fg["tokens"] = general_perplexity(cfg, model, tokenizer, read_forgetting_text(cfg))
    if side == "tuned" and fg.get("base_perplexity") and fg.get("tuned_perplexity") is not None:
        fg["change"] = fg["tuned_perplexity"] / fg["base_perplexity"] - 1
        fg["flagged"] = fg["change"] > fg["threshold"]
    cache.write_text(json.dumps(fg, indent=2))
    return fg


TRAINING_METRICS = ("val_loss", "train_loss", "perplexity", "val_perplexity")


def known_metric_names(cfg: RunConfig, task: Task, base_eval: dict | None, forgetting: dict | None) -> list[str]:
    """Metrics this run will produce, as far as is known before training (for targets and early stopping)."""
    names = ["train_loss"]
    if task.held_out:
        names += ["val_loss"] + (["perplexity", "val_perplexity"] if task.token_loss else [])
    if forgetting is not None:
        names += ["general_perplexity", "forgetting"]
    names += [k for k, v in ((base_eval or {}).get("metrics") or {}).items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return list(dict.fromkeys(names))


def check_metric_names(cfg: RunConfig, task: Task, base_eval: dict | None, forgetting: dict | None) -> None:
    """Before training: every gate target and the early-stopping metric name a metric the run produces."""
    from hone.config import parse_target

    names = known_metric_names(cfg, task, base_eval, forgetting)
    hint = "" if cfg.eval.enabled else " (eval.enabled is false, so the held-out evaluation's metrics are not made)"
    for target in cfg.eval.targets:
        metric = parse_target(target)[0]
        if metric not in names:
            raise RunError(f"eval.targets: {target!r} names '{metric}', which this run does not produce{hint}; "
                           f"metrics that exist: {', '.join(names)}")
    es = cfg.train.early_stopping
    if not es.enabled:
        return
    if es.metric == "val_loss" and not task.held_out:
        raise RunError("train.early_stopping.metric val_loss: this run has no held-out batches to compute it on")
    if es.metric != "val_loss" and task.evaluate is None:
        raise RunError(f"train.early_stopping.metric '{es.metric}': method {cfg.method} has no held-out task "
                       "evaluation; use val_loss")
    if es.metric not in ("val_loss", "primary") and base_eval is not None and es.metric not in names:
        raise RunError(f"train.early_stopping.metric '{es.metric}' is not a metric this run produces; metrics that "
                       f"exist: {', '.join(['primary', *names])}")


def gate_values(training: dict, tuned_eval: dict | None, forgetting: dict | None) -> dict:
    """Every figure a target may name: training figures, the forgetting check, then the held-out metrics
    (which win on a shared name, e.g. an evaluation's own perplexity)."""
    values = {"val_loss": training.get("final_val_loss"), "train_loss": training.get("final_train_loss"),
              "perplexity": training.get("val_perplexity"), "val_perplexity": training.get("val_perplexity")}
    if forgetting:
        values.update(general_perplexity=forgetting.get("tuned_perplexity"), forgetting=forgetting.get("change"))
    values.update({k: v for k, v in ((tuned_eval or {}).get("metrics") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return values


OPERATORS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
             "<": lambda a, b: a < b, "==": lambda a, b: a == b}


def gate_checks(targets: list[str], values: dict) -> dict:
    """{passed, checks: [{target, metric, op, threshold, value, passed}], error?}. A metric with no value
    fails its check, and `error` says which and lists the metrics that exist."""
    from hone.config import parse_target

    checks, missing = [], []
    for target in targets:
        metric, op, threshold = parse_target(target)
        value = values.get(metric)
        ok = value is not None and math.isfinite(value) and OPERATORS[op](value, threshold)
        if value is None:
            missing.append(metric)
        checks.append({"target": target, "metric": metric, "op": op, "threshold": threshold, "value": value,
                       "passed": bool(ok)})
    gate = {"passed": all(c["passed"] for c in checks), "checks": checks}
    if missing:
        have = sorted(k for k, v in values.items() if v is not None)
        gate["error"] = (f"eval.targets name metrics this run did not produce: {', '.join(missing)}; metrics "
                         f"that exist: {', '.join(have)}")
    return gate


def iteration_figures(cfg: RunConfig, run_dir: Path, result, log: RunLog) -> dict:
    """training{} entries for the report and manifest: early stopping's decisions and the overfitting watch."""
    from hone.eval.report import overfitting_watch, read_loss_series

    es_cfg = cfg.train.early_stopping
    es = {**result.early_stop, "patience": es_cfg.patience, "min_delta": es_cfg.min_delta} if result.early_stop else None
    watch = overfitting_watch(read_loss_series(run_dir / "metrics.jsonl"), es_cfg.overfit_threshold)
    if watch and watch["flagged"]:
        log.event("warn", f"overfitting: validation loss ended {100 * watch['rise']:.1f}% above its best (step "
                          f"{watch['best_step']}) while training loss kept falling")
    return {"early_stopping": es, "overfitting": watch}
