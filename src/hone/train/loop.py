"""The one training loop: optimisation, accumulation, precision, checkpoints, resume, logging, signals.

A method supplies only `loss_sum(model, batch)`; everything else lives here. Read it top to bottom:
plan the batches, restore a checkpoint if resuming, then for each optimizer step run its micro-batches
(loss summed and divided by the step's total target weight, so accumulation equals one large batch),
check the gradient is finite, clip, step, log, evaluate, checkpoint.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hone.config import RunConfig
from hone.data.pack import MicroBatch, collate_rows, pack_rows, plan_epoch, row_length
from hone.data.template import Tokenized
from hone.methods.sft import sft_loss_sum
from hone.train.checkpoint import load_checkpoint, save_checkpoint
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


def capped_perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so a diverged run still writes valid JSON (no Infinity)."""
    return math.exp(min(loss, 50))


def build_optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.learning_rate,
                             betas=tuple(cfg.train.betas))


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def plan_batches(train: list[Tokenized], cfg: RunConfig) -> tuple[list[list[list[int]]], int]:
    """All micro-batches of the run (rows of example indices), and the row length."""
    row_len = row_length(train, cfg.data.max_seq_len)
    rows_per_batch = max(1, cfg.train.batch_tokens // row_len)
    batches: list[list[list[int]]] = []
    for epoch in range(math.ceil(cfg.train.epochs)):
        plan = plan_epoch(train, seed=cfg.train.seed, epoch=epoch, row_len=row_len, rows_per_batch=rows_per_batch)
        share = min(1.0, cfg.train.epochs - epoch)
        batches += plan[: max(1, math.ceil(len(plan) * share))]
    if cfg.train.max_steps:
        need = cfg.train.max_steps * cfg.train.grad_accum
        while len(batches) < need:  # max_steps beyond the epochs: keep going with fresh epochs
            epoch += 1
            batches += plan_epoch(train, seed=cfg.train.seed, epoch=epoch, row_len=row_len,
                                  rows_per_batch=rows_per_batch)
        batches = batches[:need]
    return batches, row_len


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


def evaluate_loss(model, held_out: list[Tokenized], row_len: int, rows_per_batch: int, pad_id: int,
                  device, bf16: bool, loss_sum=sft_loss_sum) -> float | None:
    """Mean loss per target token over the held-out set (packed like training, in a fixed order)."""
    if not held_out:
        return None
    eval_len = max(row_len, max(len(t.input_ids) for t in held_out))
    rows = pack_rows(held_out, list(range(len(held_out))), eval_len)
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(rows), rows_per_batch):
            batch = to_device(collate_rows(held_out, rows[i:i + rows_per_batch], eval_len, pad_id), device)
            with autocast(device, bf16):
                total += float(loss_sum(model, batch))
            weight += batch.target_weight
    model.train(was_training)
    return total / weight if weight else None


def to_device(batch: MicroBatch, device) -> MicroBatch:
    if device.type == "cpu":
        return batch
    return MicroBatch(batch.input_ids.to(device), batch.position_ids.to(device), batch.labels.to(device),
                      batch.weights.to(device), batch.real_tokens)


@dataclass
class LogWindow:
    """Training loss and throughput since the last log line (loss weighted by target tokens)."""

    loss: float = 0.0
    weight: float = 0.0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def mean_loss(self) -> float | None:
        return self.loss / self.weight if self.weight else None

    def tokens_per_second(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.start)


def forward_backward(model, micro: list[MicroBatch], loss_sum, device, bf16: bool) -> tuple[float, float]:
    """Accumulate one optimizer step's gradients. Each micro-batch's summed loss is divided by the target
    weight of the WHOLE step, so the gradient equals that of one large batch. Returns (loss, weight)."""
    step_weight = sum(b.target_weight for b in micro)
    step_loss = 0.0
    for batch in micro:
        with autocast(device, bf16):
            loss = loss_sum(model, batch) / step_weight
        loss.backward()
        step_loss += float(loss.detach())
    return step_loss, step_weight


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


def record_validation(state: dict, val: float | None, log: RunLog) -> None:
    if val is None:
        return
    state["last_val_loss"] = val
    if state["best_val_loss"] is None or val < state["best_val_loss"]:
        state["best_val_loss"], state["best_step"] = val, state["step"]
    log.metric({"step": state["step"], "split": "validation", "loss": val, "perplexity": capped_perplexity(val)})


def train_loop(model, tokenizer, train: list[Tokenized], held_out: list[Tokenized], cfg: RunConfig,
               run_dir: Path, log: RunLog, *, resume_from: Path | None = None,
               loss_sum=sft_loss_sum, show_progress: bool = True) -> LoopResult:
    tc = cfg.train
    device = pick_device()
    bf16 = use_bf16(device, tc.precision)
    model.to(device).train()
    batches, row_len = plan_batches(train, cfg)
    rows_per_batch = max(1, tc.batch_tokens // row_len)
    total_steps = math.ceil(len(batches) / tc.grad_accum)
    warmup = int(tc.warmup_ratio * total_steps)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, warmup, tc.schedule))
    eval_every, save_every = every(tc.eval_every, total_steps), every(tc.save_every, total_steps)
    pad_id, epoch_tokens = tokenizer.pad_token_id, sum(len(t.input_ids) for t in train)

    state = {"step": 0, "tokens": 0, "seconds": 0.0, "nonfinite_in_row": 0, "best_val_loss": None,
             "best_step": None, "last_train_loss": None, "last_val_loss": None}
    if resume_from is not None:
        state.update(load_checkpoint(resume_from, model, optimizer, scheduler))
        log.event("info", f"resumed from {resume_from.name} (step {state['step']} of {total_steps})")
    else:
        log.event("info", f"training: {total_steps} steps, {len(batches)} micro-batches of up to "
                          f"{rows_per_batch}x{row_len} tokens, device {device}, {'bf16' if bf16 else 'fp32'}")

    def checkpoint() -> Path:
        return save_checkpoint(run_dir, state["step"], model, optimizer, scheduler, state, tc.keep_checkpoints)

    window = LogWindow()
    with SignalCatcher() as signals, Progress(total_steps, state["step"], enabled=show_progress) as progress:
        while state["step"] < total_steps:
            step_start = time.perf_counter()
            rows = batches[state["step"] * tc.grad_accum:(state["step"] + 1) * tc.grad_accum]
            micro = [to_device(collate_rows(train, r, row_len, pad_id), device) for r in rows]
            loss, weight = forward_backward(model, micro, loss_sum, device, bf16)
            grad_norm = clip_gradients(model, tc.max_grad_norm)
            if apply_update(optimizer, state, state["step"] + 1, loss, grad_norm, tc.max_nonfinite, log):
                window.loss, window.weight = window.loss + loss * weight, window.weight + weight
            scheduler.step()
            tokens = sum(b.real_tokens for b in micro)
            state["step"] += 1
            state["tokens"] += tokens
            state["seconds"] += time.perf_counter() - step_start
            window.tokens += tokens
            progress.update(state["step"], loss, tokens / max(1e-9, time.perf_counter() - step_start))
            last = state["step"] == total_steps

            if state["step"] % tc.log_every == 0 or last:
                state["last_train_loss"] = window.mean_loss()
                log.metric({"step": state["step"], "split": "train", "loss": window.mean_loss(),
                            "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                            "tokens_per_second": window.tokens_per_second(),
                            "epoch": round(state["tokens"] / max(1, epoch_tokens), 4)})
                window = LogWindow()
            if state["step"] % eval_every == 0 or last:
                record_validation(state, evaluate_loss(model, held_out, row_len, rows_per_batch, pad_id, device,
                                                       bf16, loss_sum), log)
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

    return LoopResult(state["step"], state["seconds"], state["tokens"],
                      state["tokens"] / max(1e-9, state["seconds"]), state["last_train_loss"],
                      state["last_val_loss"], state["best_step"], round(state["tokens"] / max(1, epoch_tokens), 2))


def clip_gradients(model, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    return float(norm)
