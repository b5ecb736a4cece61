"""From the config's data files to tokenized train and held-out sets, with every rejection accounted for.

Two phases, so that data errors surface before a model is loaded: `validate_data` (no tokenizer; shapes,
fields, duplicates) and `tokenize_data` (chat template, loss masks, over-length handling).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from hone.config import DataConfig
from hone.data.split import split_records
from hone.data.template import Tokenized, ensure_chat_template, render_with_loss_mask
from hone.data.validate import format_problems, validate_file, write_rejects
from hone.records import Conversation, Problem


class DataProblems(ValueError):
    """Bad lines were found and the user did not ask to skip them."""

    def __init__(self, problems: list[Problem], hint: str):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the data:\n{format_problems(problems)}\n{hint}")


@dataclass
class ValidatedData:
    train: list[Conversation]
    held_out: list[Conversation]
    labels: list[str]
    shapes: dict[str, int]
    problems: list[Problem] = field(default_factory=list)
    held_out_source: str = "split"


@dataclass
class PreparedData:
    train: list[Tokenized]
    held_out: list[Tokenized]
    held_out_conversations: list[Conversation]
    labels: list[str]
    stats: dict


SKIP_HINT = "Fix these lines, or set data.skip_bad_lines=true to train without them (they go to rejects.jsonl)."


def validate_data(cfg: DataConfig, seed: int) -> ValidatedData:
    train = validate_file(cfg.train, instruction=cfg.instruction, dedupe=cfg.dedupe)
    problems = list(train.problems)
    if not train.records:
        raise DataProblems(problems, f"{cfg.train}: no line is a valid training example.")
    if cfg.validation:
        val = validate_file(cfg.validation, instruction=cfg.instruction, labels=train.labels or None,
                            dedupe=cfg.dedupe)
        problems += val.problems
        held_out, source = cap_records(val.records, cfg.max_validation, seed), cfg.validation
        train_records = train.records
    else:
        train_records, held_out = split_records(train.records, cfg.validation_fraction, seed, cfg.max_validation)
        source = f"{cfg.validation_fraction:.0%} of {cfg.train}"
    if problems and not cfg.skip_bad_lines:
        raise DataProblems(problems, SKIP_HINT)
    return ValidatedData(train_records, held_out, train.labels, dict(train.shapes), problems, source)


def cap_records(records: list[Conversation], n: int, seed: int) -> list[Conversation]:
    """A deterministic subset of at most n records (by content hash, so a sorted file is not biased)."""
    return cap_records_by(records, n, seed, lambda r: json.dumps(r.to_json(), sort_keys=True))


def cap_records_by(records: list, n: int, seed: int, key) -> list:
    """At most n records: those with the lowest seeded hash of key(record), in their original order."""
    if len(records) <= n:
        return records
    scores = [hashlib.sha256(f"{seed}:{key(r)}".encode()).hexdigest() for r in records]
    keep = set(sorted(range(len(records)), key=scores.__getitem__)[:n])
    return [r for i, r in enumerate(records) if i in keep]


def tokenize_data(data: ValidatedData, tokenizer, cfg: DataConfig, rejects_path: Path | None) -> PreparedData:
    ensure_chat_template(tokenizer)
    problems = list(data.problems)
    train, truncated, skipped = _tokenize_all(data.train, tokenizer, cfg, problems)
    held_out_pairs = [(c, render_with_loss_mask(tokenizer, c, loss_on=cfg.loss_on, max_seq_len=cfg.max_seq_len))
                      for c in data.held_out]
    held_out_pairs = [(c, t) for c, t in held_out_pairs if t.n_targets > 0]
    too_long = [p for p in problems if p.code == "too_long"]
    if too_long and cfg.on_too_long == "error":
        raise DataProblems(too_long, f"Raise data.max_seq_len (now {cfg.max_seq_len}) or set "
                                     "data.on_too_long to truncate or skip.")
    if problems and rejects_path is not None:
        write_rejects(rejects_path, problems)
    if not train:
        raise ValueError(f"{cfg.train}: every example was rejected; see {rejects_path}")
    stats = {
        "train_examples": len(train),
        "validation_examples": len(held_out_pairs),
        "validation_source": data.held_out_source,
        "train_tokens": sum(len(t.input_ids) for t in train),
        "target_tokens": sum(t.n_targets for t in train),
        "truncated": truncated,
        "skipped": skipped,
        "rejected": len(problems),
        "shapes": data.shapes,
        "labels": data.labels,
    }
    return PreparedData(train, [t for _, t in held_out_pairs], [c for c, _ in held_out_pairs], data.labels, stats)


def _tokenize_all(convs, tokenizer, cfg: DataConfig, problems: list[Problem]):
    out, truncated, skipped = [], 0, 0
    for conv in convs:
        tok = render_with_loss_mask(tokenizer, conv, loss_on=cfg.loss_on, max_seq_len=cfg.max_seq_len)
        if tok.truncated and cfg.on_too_long != "truncate":
            full = len(render_with_loss_mask(tokenizer, conv, loss_on=cfg.loss_on).input_ids)
            problems.append(Problem(conv.source, conv.line, "too_long",
                                    f"{full} tokens > data.max_seq_len={cfg.max_seq_len}"))
            skipped += 1
            continue
        if tok.n_targets == 0:
            why = ("truncation to data.max_seq_len removed every target token" if tok.truncated
                   else "no assistant message has a loss weight above 0")
            problems.append(Problem(conv.source, conv.line, "too_long" if tok.truncated else "no_targets", why))
            skipped += 1
            continue
        truncated += tok.truncated
        out.append(tok)
    return out, truncated, skipped
