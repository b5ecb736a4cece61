"""The one training loop: optimisation, accumulation, precision, checkpoints, resume, logging, signals.

A method supplies a `Task` (hone.methods): its micro-batch plan, collate and `loss_sum(model, batch)`;
everything else lives here. Read it top to bottom: plan the batches, restore a checkpoint if resuming, then
for each optimizer step run its micro-batches (loss summed and divided by the step's total target weight,
so accumulation equals one large batch), check the gradient is finite, clip, step, log, evaluate,
checkpoint. With train.early_stopping on, each evaluation also updates the early-stopping state (kept in
the checkpoint's state, so a resumed run makes the same decisions), the best weights are kept apart from
the pruned step checkpoints (checkpoints/best.safetensors), and they are put back at the end.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hone.config import ConfigError, RunConfig
from hone.methods import Task, batch_to
from hone.train.checkpoint import load_checkpoint, save_checkpoint, trainable_state
from hone.train.device import autocast, pick_device, use_bf16
from hone.train.progress import Progress
from hone.train.runlog import RunLog


class TrainingFailed(RuntimeError):
    pass


class Interrupted(RuntimeError):
    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@dataclass
class LoopResult:
    steps: int
    seconds: float
    tokens: int
    tokens_per_second: float
    final_train_loss: float | None
    final_val_loss: float | None
    best_step: int | None
    epochs: float  # passes over the training tokens actually made (max_steps may cut them short)
    val_stats: dict = field(default_factory=dict)  # the method's own validation figures (last evaluation)
    # Early stopping: {metric, direction, best, best_step, bad_evals, stopped_step, restored_step}; {} when off.
    early_stop: dict = field(default_factory=dict)


def capped_perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so a diverged run still writes valid JSON (no Infinity)."""
    return math.exp(min(loss, 50))


def build_optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; no decay on norms and biases. Continued pretraining may move embeddings more slowly."""
    embed_ratio = cfg.cpt.embedding_lr_ratio if cfg.objective == "cpt" else 1.0
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = 0.0 if p.ndim < 2 or "norm" in name else cfg.train.weight_decay
            ratio = embed_ratio if ("embed" in name or "lm_head" in name) else 1.0
            groups.setdefault((decay, ratio), []).append(p)
    return torch.optim.AdamW([{"params": ps, "weight_decay": d, "lr": cfg.train.learning_rate * r}
                              for (d, r), ps in groups.items()],
                             lr=cfg.train.learning_rate, betas=tuple(cfg.train.betas))


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def plan_batches(task: Task, cfg: RunConfig) -> list:
    """All micro-batch specs of the run: whole epochs, a share of the last, or max_steps' worth."""
    return plan_run(task, cfg)[0]


def plan_run(task: Task, cfg: RunConfig) -> tuple[list, list[float]]:
    """The run's micro-batch specs and, for each, the epochs done once it is done (epoch e's i-th of n
    micro-batches: e + i/n). Epochs count micro-batches, not tokens: exact for every method, including those
    whose token count is known only as they run (rlhf's completions)."""
    batches: list = []
    done: list[float] = []

    def add(epoch: int, plan: list, take: int) -> None:
        batches.extend(plan[:take])
        done.extend(epoch + (i + 1) / len(plan) for i in range(min(take, len(plan))))

    epoch = -1
    for epoch in range(math.ceil(cfg.train.epochs)):
        plan = task.epoch_plan(epoch)
        share = min(1.0, cfg.train.epochs - epoch)
        add(epoch, plan, max(1, math.ceil(len(plan) * share)))
    if cfg.train.max_steps:
        need = cfg.train.max_steps * cfg.train.grad_accum
        while len(batches) < need:  # max_steps beyond the epochs: keep going with fresh epochs
            epoch += 1
            plan = task.epoch_plan(epoch)
            add(epoch, plan, len(plan))
        batches, done = batches[:need], done[:need]
    return batches, done


def every(n: int | None, total: int, times: int = 4) -> int:
    return n or max(1, math.ceil(total / times))


class SignalCatcher:
    """Turns SIGTERM / Ctrl-C into a flag the loop checks between steps (so it can checkpoint and exit)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def split_loss(out) -> tuple[torch.Tensor, dict]:
    """A method's loss_sum returns the loss, or (loss, {stat: sum over the batch})."""
    return out if isinstance(out, tuple) else (out, {})


def evaluate_loss(model, task: Task, device, bf16: bool) -> tuple[float | None, dict]:
    """Mean loss (and stats) per unit of target weight over the held-out batches, in a fixed order."""
    if not task.held_out:
        return None, {}
    was_training = model.training
    model.eval()
    total, weight, stats = 0.0, 0.0, {}
    with torch.no_grad():
        for batch in task.held_out:
            batch = batch_to(batch, device)
            with autocast(device, bf16):
                loss, batch_stats = split_loss(task.loss_sum(model, batch))
            total += float(loss)
            weight += batch.target_weight
            for k, v in batch_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
    model.train(was_training)
    if not weight:
        return None, {}
    return total / weight, {k: v / weight for k, v in stats.items()}


@dataclass
class LogWindow:
    """Training loss, method stats and throughput since the last log line (weighted by target weight)."""

    loss: float = 0.0
    weight: float = 0.0
    tokens: int = 0
    stats: dict = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, weight: float, stats: dict) -> None:
        self.loss, self.weight = self.loss + loss * weight, self.weight + weight
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0.0) + v

    def mean_loss(self) -> float | None:
        return self.loss / self.weight if self.weight else None

    def mean_stats(self) -> dict:
        return {k: v / self.weight for k, v in self.stats.items()} if self.weight else {}

    def tokens_per_second(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.start)


def forward_backward(model, micro: list, loss_sum, device, bf16: bool) -> tuple[float, float, dict]:
    """Accumulate one optimizer step's gradients. Each micro-batch's summed loss is divided by the target
    weight of the WHOLE step, so the gradient equals that of one large batch. Returns (loss, weight, stats
    summed over the step)."""
    step_weight = sum(b.target_weight for b in micro)
    step_loss, stats = 0.0, {}
    for batch in micro:
        with autocast(device, bf16):
            loss, batch_stats = split_loss(loss_sum(model, batch))
            loss = loss / step_weight
        loss.backward()
        step_loss += float(loss.detach())
        for k, v in batch_stats.items():
            stats[k] = stats.get(k, 0.0) + float(v)
    return step_loss, step_weight, stats


def apply_update(optimizer, state: dict, step: int, loss: float, grad_norm: float, max_nonfinite: int,
                 log: RunLog) -> bool:
    """Step the optimizer if loss and gradient are finite; otherwise skip, count, and fail after a streak."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["nonfinite_in_row"] = 0
        return True
    optimizer.zero_grad(set_to_none=True)
    state["nonfinite_in_row"] += 1
    log.event("warn", f"step {step}: non-finite loss or gradient (loss={loss}, grad_norm={grad_norm}); "
                      "update skipped")
    if state["nonfinite_in_row"] >= max_nonfinite:
        raise TrainingFailed(
            f"step {step}: {state['nonfinite_in_row']} non-finite losses/gradients in a row "
            f"(train.max_nonfinite={max_nonfinite}). Lower train.learning_rate or check the data around this "
            "step. No checkpoint was written for the failing steps.")
    return False


def record_validation(state: dict, val: tuple[float | None, dict], log: RunLog, token_loss: bool = True) -> None:
    loss, stats = val
    if loss is None:
        return
    state["last_val_loss"], state["last_val_stats"], state["last_val_step"] = loss, stats, state["step"]
    if state["best_val_loss"] is None or loss < state["best_val_loss"]:
        state["best_val_loss"], state["best_step"] = loss, state["step"]
    # exp(loss) is a perplexity only when the loss is nats per token; not for a preference or InfoNCE loss.
    extra = {"perplexity": capped_perplexity(loss)} if token_loss else {}
    log.metric({"step": state["step"], "split": "validation", "loss": loss, **extra, **stats})


# --- early stopping ---------------------------------------------------------------------------------------

BEST_WEIGHTS = "best.safetensors"  # under checkpoints/; not a step-NNNNNN dir, so pruning never removes it


def stop_direction(metric: str, mode: str) -> str | None:
    """'min' or 'max': losses, perplexities (and the like) fall as a model improves, scores rise. None for
    'primary' in auto mode: known once the first evaluation names the method's primary metric."""
    if mode != "auto":
        return mode
    if metric == "primary":
        return None
    from hone.eval.report import lower_is_better

    return "min" if metric == "val_loss" or lower_is_better(metric) else "max"


def new_early_stop(metric: str, direction: str) -> dict:
    """The early-stopping state: plain JSON, saved in every checkpoint's state.json."""
    return {"metric": metric, "direction": direction, "best": None, "best_step": None, "bad_evals": 0,
            "stopped_step": None}


def update_early_stop(es: dict, value: float | None, step: int, patience: int, min_delta: float) -> bool:
    """Record one evaluation; True when it is a new best. Marks es["stopped_step"] after `patience`
    evaluations in a row that did not beat the best by more than min_delta (a non-finite value never does)."""
    ok = value is not None and math.isfinite(value)
    if ok and es["best"] is None:
        improved = True
    elif ok:
        improved = (value < es["best"] - min_delta) if es["direction"] == "min" else (value > es["best"] + min_delta)
    else:
        improved = False
    if improved:
        es.update(best=value, best_step=step, bad_evals=0)
    else:
        es["bad_evals"] += 1
        if es["bad_evals"] >= patience:
            es["stopped_step"] = step
    return improved


def task_metric(model, task: Task, metric: str, step: int, log: RunLog) -> tuple[str, float]:
    """Run the method's held-out evaluation (costly: generation for sft), log its scalar metrics as an
    "eval" row of metrics.jsonl, and return (name, value) of the watched one ('primary': the metric the
    report's verdict is about, the method's own choice or else accuracy / token F1)."""
    result = task.evaluate(model)
    scalars = {k: v for k, v in (result.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    log.metric({"step": step, "split": "eval", **scalars})
    name = metric
    if metric == "primary":
        from hone.eval.report import primary_metric

        name = primary_metric({"task": result.get("task"), "primary": result.get("primary"), "tuned": scalars})
    if name not in scalars:
        raise ConfigError(f"train.early_stopping.metric: '{metric}' is not a metric this method's evaluation "
                          f"reports; metrics that exist: val_loss, primary, {', '.join(sorted(scalars))}")
    return name, float(scalars[name])


def save_best_weights(run_dir: Path, model, es: dict) -> Path:
    """checkpoints/best.safetensors, written to a temp file and renamed (atomic); its metadata names the step."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    path, tmp = root / BEST_WEIGHTS, root / f".best-{os.getpid()}.tmp"
    save_file(trainable_state(model), str(tmp),
              metadata={"step": str(es["best_step"]), "metric": es["metric"], "value": repr(es["best"])})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def restore_best_weights(run_dir: Path, model, es: dict) -> None:
    """Put the best evaluation's weights back. The file must be the one the state names: a run resumed
    from an earlier checkpoint rewrites it at the same step, so a mismatch means files were tampered with."""
    path = run_dir / "checkpoints" / BEST_WEIGHTS
    if not path.is_file():
        raise TrainingFailed(f"early stopping: {path} is missing; cannot restore the weights of step "
                             f"{es['best_step']}")
    with safe_open(str(path), "pt") as f:
        saved_step = int(f.metadata().get("step", -1))
    if saved_step != es["best_step"]:
        raise TrainingFailed(f"early stopping: {path} holds step {saved_step}, but the best was step "
                             f"{es['best_step']}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(path)).items():
            params[name].copy_(tensor)
    es["restored_step"] = saved_step


def watch_evaluation(model, task: Task, cfg: RunConfig, state: dict, run_dir: Path, log: RunLog) -> None:
    """One early-stopping decision at an evaluation step (after the validation loss was recorded)."""
    es_cfg, es = cfg.train.early_stopping, state["early_stop"]
    step = state["step"]
    if es["metric"] == "val_loss":
        value = state["last_val_loss"] if state.get("last_val_step") == step else None
    else:
        es["watched"], value = task_metric(model, task, es["metric"], step, log)
        es["direction"] = es["direction"] or stop_direction(es["watched"], "auto")
    if update_early_stop(es, value, step, es_cfg.patience, es_cfg.min_delta) and es_cfg.restore_best:
        save_best_weights(run_dir, model, es)
    if es["stopped_step"] is not None:
        best = "no finite value" if es["best"] is None else f"{es['best']:.6g} (step {es['best_step']})"
        log.event("info", f"early stopping at step {step}: {es['metric']} has not improved on {best} "
                          f"for {es['bad_evals']} evaluation(s) "
                          f"(patience {es_cfg.patience}, min_delta {es_cfg.min_delta})")


def finish_early_stop(model, task: Task, cfg: RunConfig, state: dict, run_dir: Path, log: RunLog,
                      device, bf16: bool) -> None:
    """At the end of training: restore the best weights (when asked) and re-measure the validation loss on
    them, so the figures reported describe the weights in final/."""
    es = state["early_stop"]
    if not cfg.train.early_stopping.restore_best or es["best_step"] is None:
        return
    if es["best_step"] == state["step"]:
        es["restored_step"] = es["best_step"]  # the last step is the best: the live weights are already it
        return
    restore_best_weights(run_dir, model, es)
    loss, stats = evaluate_loss(model, task, device, bf16)
    if loss is not None:
        state["last_val_loss"], state["last_val_stats"] = loss, stats
    log.event("info", f"restored the weights of step {es['restored_step']} (best {es['metric']} {es['best']:.6g})"
                      + (f"; their validation loss is {loss:.6g}" if loss is not None else ""))


def train_loop(model, task: Task, cfg: RunConfig, run_dir: Path, log: RunLog, *,
               resume_from: Path | None = None, show_progress: bool = True) -> LoopResult:
    tc = cfg.train
    device = pick_device()
    bf16 = use_bf16(device, tc.precision)
    model.to(device).train()
    batches, epochs_done = plan_run(task, cfg)

    def epochs_at(step: int) -> float:
        return round(epochs_done[min(len(epochs_done), step * tc.grad_accum) - 1], 4) if step else 0.0
    total_steps = math.ceil(len(batches) / tc.grad_accum)
    warmup = int(tc.warmup_ratio * total_steps)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, warmup, tc.schedule))
    eval_every, save_every = every(tc.eval_every, total_steps), every(tc.save_every, total_steps)

    state = {"step": 0, "tokens": 0, "seconds": 0.0, "nonfinite_in_row": 0, "best_val_loss": None,
             "best_step": None, "last_train_loss": None, "last_val_loss": None, "last_val_stats": {},
             "last_val_step": None, "early_stop": None}
    es_cfg = tc.early_stopping
    if es_cfg.enabled:
        state["early_stop"] = new_early_stop(es_cfg.metric, stop_direction(es_cfg.metric, es_cfg.mode))
    if resume_from is not None:
        state.update(load_checkpoint(resume_from, model, optimizer, scheduler))
        log.event("info", f"resumed from {resume_from.name} (step {state['step']} of {total_steps})")
    else:
        log.event("info", f"training: {total_steps} steps, {len(batches)} micro-batches (~{task.tokens_per_epoch:,} tokens "
                          f"per epoch), device {device}, "
                          f"{'bf16' if bf16 else 'fp32'}")

    def checkpoint() -> Path:
        return save_checkpoint(run_dir, state["step"], model, optimizer, scheduler, state, tc.keep_checkpoints)

    def log_train(window: LogWindow, grad_norm: float) -> LogWindow:
        """Log the training figures since the last log line; returns a fresh window."""
        state["last_train_loss"] = window.mean_loss()
        log.metric({"step": state["step"], "split": "train", "loss": window.mean_loss(),
                    "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "tokens_per_second": window.tokens_per_second(), "epoch": epochs_at(state["step"]),
                    **window.mean_stats()})
        return LogWindow()

    window = LogWindow()
    with SignalCatcher() as signals, Progress(total_steps, state["step"], enabled=show_progress) as progress:
        while state["step"] < total_steps and not (state["early_stop"] or {}).get("stopped_step"):
            step_start = time.perf_counter()
            specs = batches[state["step"] * tc.grad_accum:(state["step"] + 1) * tc.grad_accum]
            micro = [batch_to(task.collate(spec), device) for spec in specs]
            loss, weight, stats = forward_backward(model, micro, task.loss_sum, device, bf16)
            grad_norm = clip_gradients(model, tc.max_grad_norm)
            if apply_update(optimizer, state, state["step"] + 1, loss, grad_norm, tc.max_nonfinite, log):
                window.add(loss, weight, stats)
            scheduler.step()
            tokens = sum(b.real_tokens for b in micro)
            state["step"] += 1
            state["tokens"] += tokens
            state["seconds"] += time.perf_counter() - step_start
            window.tokens += tokens
            progress.update(state["step"], loss, tokens / max(1e-9, time.perf_counter() - step_start))
            last = state["step"] == total_steps
            logged = state["step"] % tc.log_every == 0 or last
            if logged:
                window = log_train(window, grad_norm)
            if state["step"] % eval_every == 0 or last:
                record_validation(state, evaluate_loss(model, task, device, bf16), log, task.token_loss)
                if es_cfg.enabled:
                    watch_evaluation(model, task, cfg, state, run_dir, log)
                    if state["early_stop"]["stopped_step"] is not None and not last:
                        last = True  # the stopping step is the run's last: logged and checkpointed as such
                        window = window if logged else log_train(window, grad_norm)
                if state["last_val_loss"] is not None:
                    progress.note(f"val loss {state['last_val_loss']:.4f}")
            # Mid-streak of non-finite steps, keep the last good checkpoint as the newest one.
            if (state["step"] % save_every == 0 or last) and state["nonfinite_in_row"] == 0:
                checkpoint()
            if signals.signum is not None:
                path = checkpoint()
                log.event("warn", f"stopped by {signal.Signals(signals.signum).name} at step {state['step']}; "
                                  f"checkpoint {path.name} saved; continue with --resume")
                raise Interrupted(signals.signum, path)

    if es_cfg.enabled:
        finish_early_stop(model, task, cfg, state, run_dir, log, device, bf16)
    return LoopResult(state["step"], state["seconds"], state["tokens"],
                      state["tokens"] / max(1e-9, state["seconds"]), state["last_train_loss"],
                      state["last_val_loss"], state["best_step"], round(epochs_at(state["step"]), 2),
                      state["last_val_stats"], state["early_stop"] or {})


def clip_gradients(model, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    return float(norm)
