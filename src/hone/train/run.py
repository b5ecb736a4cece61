"""`hone train`: one run from config to report, laid out as DESIGN.md's run directory.

validate data (no model yet) -> load model -> tokenize -> evaluate the base model on held-out data ->
train (the loop) -> save final/ -> evaluate the tuned model -> report. Each finished phase leaves a file, so
`--resume` after a crash or SIGKILL repeats nothing that is done.
"""

from __future__ import annotations

import hashlib
import json
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
from hone.eval.runners import evaluate_task
from hone.models.load import load_model, save_hf_dir
from hone.train.checkpoint import latest_checkpoint
from hone.train.device import pick_device, use_bf16
from hone.train.loop import Interrupted, capped_perplexity, train_loop
from hone.train.prepare import PreparedData, tokenize_data, validate_data
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


# Methods that train a peft adapter over a frozen base (saved as an adapter in final/).
ADAPTER_METHODS = ("lora", "dora", "ia3")


def apply_method(model, cfg: RunConfig):
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, adapter_config(cfg))


def adapter_config(cfg: RunConfig):
    from peft import IA3Config, LoraConfig

    if cfg.method == "ia3":
        # peft's per-architecture defaults (for Llama: k_proj, v_proj and down_proj, the latter scaled on
        # its input), the placement the (IA)3 paper found best.
        return IA3Config(task_type="CAUSAL_LM")
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, use_dora=cfg.method == "dora",
                      task_type="CAUSAL_LM")


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_final(model, tokenizer, cfg: RunConfig, run_dir: Path) -> Path:
    final, tmp = run_dir / "final", run_dir / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.method in ADAPTER_METHODS:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    else:
        save_hf_dir(model, tokenizer, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def run_eval_once(run_dir: Path, name: str, model, tokenizer, data: PreparedData, cfg: RunConfig, bf16: bool):
    """Evaluate and cache to eval_<name>.json, so a resumed run does not repeat it."""
    path = run_dir / f"eval_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = evaluate_task(model, tokenizer, data.held_out_conversations, data.labels or None,
                           max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, bf16=bf16)
    path.write_text(json.dumps(result, indent=2))
    return result


def run_training(cfg: RunConfig, *, resume: bool = False, show_progress: bool = True) -> RunOutcome:
    if cfg.data.prepare:
        cfg = run_prepare_stage(cfg)
    run_dir = resolve_run_dir(cfg, resume)
    data = validate_data(cfg.data, cfg.train.seed)  # bad data stops us before any model is loaded
    if resume:
        check_resume_config(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    log = RunLog(run_dir)
    if not resume or not (run_dir / "manifest.json").is_file():
        write_manifest(run_dir, **initial_manifest(cfg))
    try:
        return _run(cfg, run_dir, data, log, show_progress)
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


def _run(cfg: RunConfig, run_dir: Path, data, log: RunLog, show_progress: bool) -> RunOutcome:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    loaded = load_model(cfg.model.base, allow_download=cfg.model.allow_download,
                        trust_remote_code=cfg.model.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    prepared = tokenize_data(data, tokenizer, cfg.data, run_dir / "rejects.jsonl")
    _log_data(log, prepared, run_dir)
    if prepared.labels:  # `hone eval RUN` renders prompts with the same label list
        (run_dir / "labels.json").write_text(json.dumps(prepared.labels))
    device = pick_device()
    bf16 = use_bf16(device, cfg.train.precision)
    model.to(device)
    base_eval = run_eval_once(run_dir, "base", model, tokenizer, prepared, cfg, bf16) if cfg.eval.enabled else None
    model = apply_method(model, cfg)
    trainable, total = count_params(model)
    resume_from = latest_checkpoint(run_dir)
    result = train_loop(model, tokenizer, prepared.train, prepared.held_out, cfg, run_dir, log,
                        resume_from=resume_from, show_progress=show_progress)
    final = save_final(model, tokenizer, cfg, run_dir)
    log.event("info", f"saved final weights to {final}")
    tuned_eval = run_eval_once(run_dir, "tuned", model, tokenizer, prepared, cfg, bf16) if cfg.eval.enabled else None
    training = {"method": cfg.method, "steps": result.steps, "epochs": result.epochs, "seconds": result.seconds,
                "tokens_per_second": result.tokens_per_second, "trainable_params": trainable,
                "total_params": total, "device": str(device), "precision": "bf16" if bf16 else "fp32",
                "final_train_loss": result.final_train_loss, "final_val_loss": result.final_val_loss,
                "val_perplexity": None if result.final_val_loss is None else capped_perplexity(result.final_val_loss), "best_step": result.best_step}
    info = build_report_info(cfg, run_dir, prepared, training, base_eval, tuned_eval)
    from hone.eval.report import write_report

    write_report(run_dir, info)
    write_manifest(run_dir, status="succeeded", ended=_now(), training=training)
    log.event("info", f"report: {run_dir / 'report.html'}")
    return RunOutcome(run_dir, "succeeded", {"training": training, "eval": info["eval"]})


def _log_data(log: RunLog, prepared: PreparedData, run_dir: Path) -> None:
    s = prepared.stats
    log.event("info", f"data: {s['train_examples']} train / {s['validation_examples']} held-out examples, "
                      f"{s['train_tokens']} tokens ({s['target_tokens']} trained on), {s['truncated']} truncated, "
                      f"{s['rejected']} rejected")
    if s["rejected"]:
        log.event("warn", f"{s['rejected']} example(s) rejected; reasons in {run_dir / 'rejects.jsonl'}")
    if s["truncated"]:
        log.event("warn", f"{s['truncated']} example(s) truncated to data.max_seq_len")


def build_report_info(cfg, run_dir, prepared: PreparedData, training, base_eval, tuned_eval) -> dict:
    info = {"name": run_dir.name, "status": "succeeded", "config_yaml": dump_config(cfg),
            "data": prepared.stats, "training": training, "eval": None}
    if base_eval and tuned_eval:
        convs = prepared.held_out_conversations
        examples = [{"prompt": c.prompt_messages()[-1].content if c.prompt_messages() else "",
                     "reference": c.reference(), "base": b, "tuned": t}
                    for c, b, t in zip(convs, base_eval["outputs"], tuned_eval["outputs"])]
        info["eval"] = {"task": tuned_eval["task"], "n": tuned_eval["n"],
                        "base": base_eval["metrics"], "tuned": tuned_eval["metrics"],
                        "base_confusion": base_eval.get("confusion"),
                        "tuned_confusion": tuned_eval.get("confusion"),
                        "labels": prepared.labels or None,
                        "examples": pick_examples(examples, cfg.eval.examples_in_report)}
    return info


def pick_examples(examples: list[dict], n: int) -> list[dict]:
    """Show where the models differ first (that is what a reader wants to see), then the rest."""
    differ = [e for e in examples if e["base"] != e["tuned"]]
    same = [e for e in examples if e["base"] == e["tuned"]]
    return (differ + same)[:n]

