"""Training methods. A method is what data it needs, how to batch it, its loss, and how to score it.

Each objective lives in its own module here (sft, cpt, preference, reward, rlhf, distill, contrastive) and
offers plain functions; the loop in train/loop.py and the run in train/run.py do the rest:

    validate(cfg) -> MethodData                read and check the data files (no model yet), line-numbered
    load(cfg) -> Loaded                        optional: the model to train (default: models.load.load_model)
    build(cfg, data, model, tokenizer, run_dir, log) -> Task   tokenise; what the loop and the report need
    PEFT_TASK                                  optional: the peft task type (default "CAUSAL_LM")

`Task` is everything the loop asks of a method. Its batches are any object with `.to(device)`,
`.target_weight` (what the step's summed loss is divided by, so accumulation equals one big batch) and
`.real_tokens` (for throughput). `loss_sum` returns the summed loss, or (loss, stats) where stats are sums
the loop divides by the same weight and logs beside the loss (e.g. DPO's reward accuracy).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hone.records import Problem

OBJECTIVE_MODULES = {"sft": "sft", "cpt": "cpt", "dpo": "preference", "orpo": "preference",
                     "simpo": "preference", "reward": "reward", "rlhf": "rlhf", "distill": "distill",
                     "contrastive": "contrastive"}


def method_module(objective: str):
    return importlib.import_module(f"hone.methods.{OBJECTIVE_MODULES[objective]}")


@dataclass
class Task:
    epoch_plan: Callable[[int], list[Any]]  # micro-batch specs of epoch e; depends only on (seed, e)
    collate: Callable[[Any], Any]           # spec -> batch (on CPU)
    # (model, batch) -> Tensor | (Tensor, {stat: sum}). It may set batch.real_tokens (the throughput count)
    # when that is known only as it runs (rlhf's sampled completions); the loop reads it afterwards.
    loss_sum: Callable[..., Any]
    held_out: list[Any]                     # collated batches for the validation loss (may be empty)
    tokens_per_epoch: int                   # an estimate, for the log line that opens training
    # (model) -> {"task", "n", "metrics", "primary"?, "examples"?: [{prompt, reference, output}]}: run on the
    # starting model and on the tuned one; the report compares them.
    evaluate: Callable[[Any], dict] | None = None
    stats: dict = field(default_factory=dict)  # data counts for the report (train_examples, rejected, ...)
    # Rows of labels for the report's examples and label tasks (SFT on text+label data).
    labels: list[str] = field(default_factory=list)
    # Run once the adapter is applied, before the first step (e.g. DPO caches reference log-probs).
    before_training: Callable[[Any], None] | None = None
    # The loss is nats per token (SFT, cpt, distill), so exp(loss) is a perplexity worth reporting.
    token_loss: bool = True
    # Stats logged on training rows to plot over steps in the report (rlhf: reward, kl).
    plot_stats: list[str] = field(default_factory=list)


@dataclass
class MethodData:
    """Validated records of a method's own shape, before tokenisation."""

    train: list[Any]
    held_out: list[Any]
    problems: list[Problem] = field(default_factory=list)
    held_out_source: str = "split"
    shapes: dict[str, int] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)


def batch_to(batch, device):
    """Move every tensor field of a dataclass batch to `device` (a no-op on CPU)."""
    if device.type == "cpu":
        return batch
    changes = {f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, **changes)


class RowError(Exception):
    """One row's problem, raised by a method's row parser and turned into a line-numbered Problem."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def read_method_rows(path: str | Path, parse: Callable[[dict], Any], needs: str) -> tuple[list, list[Problem]]:
    """Parse every row of a data file with `parse` (row -> record, or RowError). Returns (records, problems);
    each problem names the line and, for a missing field, which fields the method needs."""
    from hone.data.readers import clip_raw, read_rows

    records, problems = [], []
    source = str(path)
    for line, row in read_rows(path):
        if isinstance(row, Problem):
            problems.append(row)
            continue
        try:
            record = parse(row)
        except RowError as bad:
            message = bad.message if bad.code != "missing_field" else f"{bad.message}; this method needs {needs}"
            problems.append(Problem(source, line, bad.code, message, raw=clip_raw(str(row))))
            continue
        records.append((line, record))
    return records, problems


def text_field(row: dict, key: str, *alternatives: str) -> str:
    """A non-empty string field (the first of key/alternatives present), else RowError naming it."""
    for k in (key, *alternatives):
        if row.get(k) is not None:
            value = row[k]
            if not isinstance(value, str):
                raise RowError("bad_type", f"'{k}' must be a string, found {type(value).__name__}")
            if not value.strip():
                raise RowError("empty_content", f"'{k}' is empty")
            return value
    names = " or ".join(repr(k) for k in (key, *alternatives))
    raise RowError("missing_field", f"missing {names} (keys found: {', '.join(sorted(row)) or 'none'})")


def validate_method_data(cfg, parse: Callable[[dict], Any], needs: str,
                         key: Callable[[Any], str] | None = None) -> MethodData:
    """Read data.train (and data.validation, or carve a held-out split) with a method's row parser.

    Problems stop the run before any model loads unless data.skip_bad_lines is set. Records are
    (line, record) pairs' records; the held-out split is a deterministic hash split on `key(record)`.
    """
    from hone.train.prepare import SKIP_HINT, DataProblems, cap_records_by

    train, problems = read_method_rows(cfg.data.train, parse, needs)
    if not train:
        raise DataProblems(problems, f"{cfg.data.train}: no line is a valid example for method "
                                     f"'{cfg.method}', which needs {needs}.")
    if cfg.data.validation:
        held, more = read_method_rows(cfg.data.validation, parse, needs)
        problems += more
    if problems and not cfg.data.skip_bad_lines:  # the lines to fix come before any split problem
        raise DataProblems(problems, SKIP_HINT)
    if cfg.data.validation:
        held_out = cap_records_by([r for _, r in held], cfg.data.max_validation, cfg.train.seed, key or repr)
        train_records, source = [r for _, r in train], cfg.data.validation
    else:
        train_records, held_out = hash_split([r for _, r in train], cfg.data.validation_fraction,
                                             cfg.train.seed, cfg.data.max_validation, key or repr)
        source = f"{cfg.data.validation_fraction:.0%} of {cfg.data.train}"
    return MethodData(train_records, held_out, problems, source)


def hash_split(records: list, fraction: float, seed: int, cap: int, key: Callable[[Any], str]):
    """(train, held_out): the round(n * fraction) records with the lowest seeded content hash are held out
    (at least 1, at most `cap`; the rest of the held-out quota returns to train). Order is kept."""
    import hashlib

    if len(records) < 2:
        raise ValueError(f"cannot carve a held-out split from {len(records)} record(s): need at least 2; "
                         "add data or give data.validation")
    n_out = min(cap, max(1, min(len(records) - 1, round(len(records) * fraction))))
    scores = [hashlib.sha256(f"{seed}:{key(r)}".encode()).hexdigest() for r in records]
    out = set(sorted(range(len(records)), key=scores.__getitem__)[:n_out])
    return ([r for i, r in enumerate(records) if i not in out], [r for i, r in enumerate(records) if i in out])


def chunks(items: Iterable, size: int) -> list[list]:
    items = list(items)
    return [items[i:i + size] for i in range(0, len(items), size)]
