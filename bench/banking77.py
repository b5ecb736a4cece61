"""Banking77 few-shot benchmark: does fine-tuning on K examples per intent beat prompting the base model?

What it measures: intent classification on Banking77 (customer-support queries, 77 intents). From
../shared/datasets/banking77/train.csv it carves, deterministically, a held-out set of H queries per intent
(default 3, so 231 queries; the same set whatever K is) and a training set of K other queries per intent
(default 10, so 770). Three rows are scored on the same held-out queries with the same greedy decoding:

  base, label list in prompt (zero-shot)   the base model given all 77 intent names in its instruction
                                           (hone's default label instruction): its best fair chance, and
                                           what a user gets from prompting alone
  base, short prompt                       the base model with the tuned model's short prompt (the
                                           same-prompt control: what the weights learned, not the prompt)
  tuned (LoRA), short prompt               after hone's real pipeline (hone.train.run.run_training)

Why a short prompt ("Classify the intent of this banking customer query. Answer with the intent name
only."): fine-tuning moves the task knowledge (which intents exist, how they are spelled) into the weights,
so the tuned model's prompt no longer needs the label list. With the embedded model's tokenizer that cuts a
request from ~590 prompt tokens to ~44 (13x), and that saving (tokens and seconds per request) is part of
the result, so the table shows it beside accuracy. It also makes a training example ~52 tokens instead of
~600, which is what makes this benchmark affordable on a CPU.

Per row: accuracy, macro-F1, invalid answers (naming no intent), mean prompt tokens per request, and seconds
per request (batched generation wall time / queries: batches of 16 for the short prompt, as hone evaluates,
and 8 for the ~590-token label-list prompts). Then the tuned model's difference from the better base row,
95% Wilson intervals, and published reference points (another test split, so context, not a comparison).

How to run (from the project root, with the venv active):

    python bench/banking77.py                              # embedded SmolLM2-135M, K=10, 2 epochs
    python bench/banking77.py --plan-only                  # split, token counts and time estimate; no model
    python bench/banking77.py --k 5 --epochs 3 --json runs/b77.json
    python bench/banking77.py --resume                     # continue an interrupted run; done phases are reused
    python -m hone.models.tiny /tmp/tiny_b77               # smoke test with a tiny random model:
    python bench/banking77.py --model /tmp/tiny_b77 --k 1 --held-out-per-intent 1 --epochs 1

Expected runtime with the defaults on a 2-core CPU in fp32 (nothing else running): about 18-20 minutes, an
ESTIMATE the script prints from the real token counts before it starts: training 770 short examples x 2
epochs (86k tokens processed at a measured ~150 tokens/s, ~10 min), two validation-loss passes, two
short-prompt generation passes and one label-list pass over the 231 held-out queries (~8 min, of which
~5.6 for the label-list prompts; from the *assumption*, not measured, that forward-only passes run ~3x
faster than training and a decoding step takes ~0.1 s), plus loading the model twice. The tiny smoke test
takes a few minutes (its byte-level tokenizer makes long examples).

The data is read from ../shared/datasets (never copied into the project); the derived train and held-out
JSONL files go to the run's output folder, runs/banking77-k{K}/data/ by default (runs/ is not in git). The
label-list result is cached in the run directory (eval_base_label_list.json), beside hone's eval_base.json
and eval_tuned.json, so a rerun with --resume repeats nothing.
Exit codes: 0 done, 1 the run failed, 2 bad input (data missing, bad option), 128+N interrupted by signal N.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "datasets" / "banking77"
N_INTENTS = 77
DEFAULT_MAX_SEQ_LEN = 256
# No {labels} placeholder: the tuned model is trained and asked without the label list (see the docstring).
SHORT_INSTRUCTION = ("Classify the intent of this banking customer query. "
                     "Answer with the intent name only.")
LABEL_LIST_BATCH = 8               # prompts per generation batch for the ~590-token label-list prompts
LABEL_LIST_CACHE = "eval_base_label_list.json"
# Measured on this project's 2-core CPU (fp32, LoRA on the embedded model): tokens processed per second in
# training. Forward-only passes (validation loss, prompt prefill) are *assumed* ~3x faster, and one batched
# decoding step ~0.1 s; neither was measured, so the estimate is a rough guide, not a promise.
TRAIN_TOKENS_PER_S = 150.0
FORWARD_SPEEDUP = 3.0
DECODE_STEP_S = 0.1
# Casanueva et al. (2020), on Banking77's official test split (3,080 queries); see shared/datasets/README.md.
REFERENCE_POINTS = [
    ("dedicated intent classifiers, 10 examples per intent (paper)", 0.85),
    ("dedicated intent classifiers, full training data (paper)", 0.93),
    ("leaderboard best, full training data (reported as about 94-95%)", 0.945),
]
ROWS = (("base_label_list", "base, label list in prompt (zero-shot)"),
        ("base_short", "base, short prompt"),
        ("tuned_short", "tuned (LoRA), short prompt"))
ROW_METRICS = ("accuracy", "macro_f1", "invalid", "prompt_tokens_per_request", "seconds_per_request")


def label_list_instruction() -> str:
    """hone's default instruction for text+label data; it lists the labels ({labels})."""
    from hone.config import DataConfig

    return DataConfig.model_fields["instruction"].default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--k", type=int, default=10, help="Training examples per intent.")
    p.add_argument("--held-out-per-intent", type=int, default=3, help="Held-out examples per intent.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the split hash and of training.")
    p.add_argument("--model", default=None, help="Base model: any hone-loadable name or local path "
                                                 "(default: the embedded smollm2-135m-instruct).")
    p.add_argument("--epochs", type=float, default=2, help="Passes over the training examples.")
    p.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate (LoRA).")
    p.add_argument("--batch-tokens", type=int, default=2048, help="Tokens per micro-batch.")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"Longest example in tokens (default {DEFAULT_MAX_SEQ_LEN}, raised automatically to fit "
                        "the longest example, since truncation would cut off the label being learned).")
    p.add_argument("--max-new-tokens", type=int, default=12, help="Longest generated answer at evaluation.")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="Folder holding train.csv.")
    p.add_argument("--out", type=Path, default=None,
                   help="Output folder: data/ and the hone run directory go here (default runs/banking77-k{K}).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Any other hone config override, e.g. --set train.threads=2 (repeatable).")
    p.add_argument("--resume", action="store_true", help="Continue the newest run for this model in --out.")
    p.add_argument("--plan-only", action="store_true",
                   help="Write the split, print the plan and time estimate, and stop before loading the model.")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="Also write the results as JSON here.")
    args = p.parse_args(argv)
    if args.k < 1 or args.held_out_per_intent < 1:
        p.error("--k and --held-out-per-intent must be at least 1")
    if args.out is None:
        args.out = Path("runs") / f"banking77-k{args.k}"
    return args


# --- data: read, split, write ----------------------------------------------------------------------------

class BenchError(ValueError):
    """Bad input to the benchmark (data file, options), phrased for the user: exit code 2."""


def read_banking77(csv_path: Path) -> tuple[list[tuple[str, str]], int]:
    """(text, intent) rows in file order, and how many repeats of an earlier text were dropped.

    A repeated query (4 in train.csv, differing only in surrounding spaces) could otherwise land on both
    sides of the split, and hone would reject it as a duplicate anyway.
    """
    rows, seen, dropped = [], set(), 0
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"text", "category"} - set(reader.fieldnames or [])
        if missing:
            raise BenchError(f"{csv_path} lacks column(s) {', '.join(sorted(missing))}; "
                             "expected the Banking77 header text,category")
        for row in reader:
            text, intent = (row["text"] or "").strip(), (row["category"] or "").strip()
            if not text or not intent:
                dropped += 1
                continue
            if text in seen:
                dropped += 1
                continue
            seen.add(text)
            rows.append((text, intent))
    return rows, dropped


def split_key(text: str, seed: int) -> bytes:
    # sha256, never Python's hash(): the same file and seed give the same split in any process.
    return hashlib.sha256(f"{seed}\0{text}".encode("utf-8")).digest()


def split_per_intent(rows: list[tuple[str, str]], k: int, h: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Per intent, rank texts by hash: the first h are held out, the next k are training examples."""
    by_intent: dict[str, list[str]] = defaultdict(list)
    for text, intent in rows:
        by_intent[intent].append(text)
    short = {i: len(t) for i, t in by_intent.items() if len(t) < k + h}
    if short:
        worst = min(short.values())
        raise BenchError(f"{len(short)} intent(s) have fewer than k + held-out = {k + h} queries "
                         f"(smallest: {worst}); lower --k or --held-out-per-intent")
    train, held_out = [], []
    for intent in sorted(by_intent):
        ranked = sorted(by_intent[intent], key=lambda t: (split_key(t, seed), t))
        held_out += [{"text": t, "label": intent} for t in ranked[:h]]
        train += [{"text": t, "label": intent} for t in ranked[h:h + k]]
    overlap = {r["text"] for r in train} & {r["text"] for r in held_out}
    assert not overlap, f"train and held-out share {len(overlap)} queries"
    return train, held_out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- config and estimate ---------------------------------------------------------------------------------

def model_slug(base: str) -> str:
    name = Path(base).name if os.sep in base or Path(base).exists() else base
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).stem if name.endswith(".gguf") else name) or "model"


def next_free(root: Path, base: str) -> str:
    if not (root / base).exists():
        return base
    n = 2
    while (root / f"{base}-{n}").exists():
        n += 1
    return f"{base}-{n}"


def user_set(args, key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in args.overrides)


def build_config(args, base: str, train_path: Path, held_path: Path, n_held: int, name: str,
                 max_seq_len: int, eval_every: int | None = None):
    from hone.config import apply_overrides, parse_config

    raw = {
        "name": name, "output_dir": str(args.out), "method": "lora",
        "model": {"base": base},
        # The short instruction (no label list) for training and for both short-prompt evaluations;
        # max_validation keeps every held-out query.
        "data": {"train": str(train_path), "validation": str(held_path), "max_validation": n_held,
                 "max_seq_len": max_seq_len, "instruction": SHORT_INSTRUCTION},
        "train": {"epochs": args.epochs, "learning_rate": args.lr, "batch_tokens": args.batch_tokens,
                  "seed": args.seed, **({"eval_every": eval_every} if eval_every else {})},
        "eval": {"max_new_tokens": args.max_new_tokens},
    }
    return parse_config(apply_overrides(raw, list(args.overrides)), source="bench/banking77.py")


def load_tokenizer(base: str):
    """The base model's tokenizer alone (cheap), or None when it cannot be found that way."""
    from transformers import AutoTokenizer

    from hone.config import EMBEDDED_MODEL
    from hone.models.load import embedded_model_dir

    try:
        if base == EMBEDDED_MODEL:
            return AutoTokenizer.from_pretrained(embedded_model_dir())
        p = Path(base).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        for d in (p / "final", p):
            if (d / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(d)
    except Exception:  # the estimate is optional; the run itself reports a real loading error
        return None
    return None


def held_out_conversations(held_path, instruction: str, labels: list[str], dedupe: bool = True) -> list:
    """The held-out queries as hone renders them with this instruction, in file order."""
    from hone.data.validate import format_problems, validate_file

    report = validate_file(held_path, instruction=instruction, labels=labels, dedupe=dedupe)
    if report.problems:
        raise BenchError(f"{held_path}: {len(report.problems)} problem(s):\n{format_problems(report.problems)}")
    return report.records


def prompt_lengths(tokenizer, conversations) -> list[int]:
    """Prompt tokens per request: the chat-rendered conversation up to the answer, as generation sees it."""
    from hone.data.template import ensure_chat_template, render_prompt

    ensure_chat_template(tokenizer)
    return [len(render_prompt(tokenizer, c.prompt_messages())) for c in conversations]


@dataclass
class Estimate:
    n_held: int
    train_tokens: int          # real tokens per epoch
    processed_train: int       # tokens the model processes over the run, row padding included
    steps: int
    steps_per_epoch: int
    val_passes: int
    processed_val: int         # per validation-loss pass, padding included
    prompt_tokens: int         # held-out prompts with the short instruction, per generation pass
    decode_steps: int          # per short-prompt generation pass
    listed_prompt_tokens: int  # held-out prompts with the 77-label list (one pass, base model)
    listed_decode_steps: int
    truncated: int             # training examples longer than max_seq_len
    longest: int               # longest example (train or held-out), untruncated

    def seconds(self) -> dict[str, float]:
        fwd = TRAIN_TOKENS_PER_S * FORWARD_SPEEDUP
        return {"training": self.processed_train / TRAIN_TOKENS_PER_S,
                "validation loss": self.val_passes * self.processed_val / fwd,
                "generation, short prompt (base + tuned)":
                    2 * (self.prompt_tokens / fwd + self.decode_steps * DECODE_STEP_S),
                "generation, label list (base)":
                    self.listed_prompt_tokens / fwd + self.listed_decode_steps * DECODE_STEP_S}


@dataclass
class Rendered:
    """The examples as hone will tokenize them (untruncated), and the held-out prompts' lengths."""
    train: list
    held_out: list
    prompts: list[int]         # short instruction
    listed_prompts: list[int]  # hone's default instruction, listing the labels


def render_examples(cfg, tokenizer) -> Rendered:
    """Tokenize with hone's own validation and templating; independent of max_seq_len and batching."""
    from hone.data.template import ensure_chat_template, render_with_loss_mask
    from hone.train.prepare import validate_data

    ensure_chat_template(tokenizer)
    data = validate_data(cfg.data, cfg.train.seed)
    listed = held_out_conversations(cfg.data.validation, label_list_instruction(), data.labels, cfg.data.dedupe)
    return Rendered([render_with_loss_mask(tokenizer, c, loss_on=cfg.data.loss_on) for c in data.train],
                    [render_with_loss_mask(tokenizer, c, loss_on=cfg.data.loss_on) for c in data.held_out],
                    prompt_lengths(tokenizer, data.held_out), prompt_lengths(tokenizer, listed))


def estimate(cfg, rendered: Rendered) -> Estimate:
    """Exact token counts and step plan for this config, using hone's own packing and batch plan."""
    from hone.data.pack import pack_rows, plan_epoch, row_length
    from hone.methods.sft import packed_task
    from hone.data.template import Tokenized
    from hone.train.loop import every, plan_batches

    m = cfg.data.max_seq_len
    train, held = ([Tokenized(t.input_ids[:m], t.weights[:m], len(t.input_ids) > m) for t in part]
                   for part in (rendered.train, rendered.held_out))
    row_len = row_length(train, cfg.data.max_seq_len)
    batches = plan_batches(packed_task(train, [], cfg, 0), cfg)
    rows_per_batch = max(1, cfg.train.batch_tokens // row_len)
    steps = math.ceil(len(batches) / cfg.train.grad_accum)
    per_epoch = plan_epoch(train, seed=cfg.train.seed, epoch=0, row_len=row_len, rows_per_batch=rows_per_batch)
    eval_every = every(cfg.train.eval_every, steps)
    eval_len = max(row_len, max(len(t.input_ids) for t in held))
    n = len(held)
    return Estimate(
        n_held=n, train_tokens=sum(len(t.input_ids) for t in train),
        processed_train=sum(len(rows) for rows in batches) * row_len,
        steps=steps, steps_per_epoch=math.ceil(len(per_epoch) / cfg.train.grad_accum),
        val_passes=sum(1 for s in range(1, steps + 1) if s % eval_every == 0 or s == steps),
        processed_val=len(pack_rows(held, list(range(n)), eval_len)) * eval_len,
        prompt_tokens=sum(rendered.prompts),
        decode_steps=math.ceil(n / cfg.eval.batch_size) * cfg.eval.max_new_tokens,
        listed_prompt_tokens=sum(rendered.listed_prompts),
        listed_decode_steps=math.ceil(len(rendered.listed_prompts) / LABEL_LIST_BATCH) * cfg.eval.max_new_tokens,
        truncated=sum(t.truncated for t in train),
        longest=max(len(t.input_ids) for t in rendered.train + rendered.held_out))


def print_estimate(est: Estimate, n_train: int, epochs: float, max_seq_len: int) -> None:
    parts = est.seconds()
    short, listed = est.prompt_tokens / max(1, est.n_held), est.listed_prompt_tokens / max(1, est.n_held)
    print(f"plan: {n_train} training examples, {est.train_tokens:,} tokens per epoch "
          f"(~{est.train_tokens / max(1, n_train):.0f} per example with the short prompt), "
          f"{epochs:g} epoch(s), {est.steps} optimizer steps, max_seq_len {max_seq_len}, "
          f"validation loss {est.val_passes} time(s)")
    print(f"prompt per request (held-out mean): short prompt ~{short:.0f} tokens; with the 77-label list "
          f"~{listed:.0f} tokens ({listed / max(short, 1e-9):.1f}x)")
    if est.truncated:
        print(f"warning: {est.truncated} training example(s) exceed max_seq_len={max_seq_len} and will be "
              "truncated (hone drops those left without their label)")
    print(f"time ESTIMATE (not a measurement): training from ~{TRAIN_TOKENS_PER_S:.0f} tok/s measured for LoRA "
          f"training of the embedded 135M model on this 2-core CPU in fp32; forward-only passes ASSUMED "
          f"{FORWARD_SPEEDUP:g}x faster and a decoding step ~{DECODE_STEP_S:g} s (not measured); "
          "other models and busy CPUs differ:")
    print(f"  {'training':<40} ~{parts['training'] / 60:6.1f} min "
          f"({est.processed_train:,} tokens processed, row padding included)")
    for what in list(parts)[1:]:
        print(f"  {what:<40} ~{parts[what] / 60:6.1f} min")
    print(f"  {'total':<40} ~{sum(parts.values()) / 60:6.1f} min, plus model loading (twice)")


# --- run and results -------------------------------------------------------------------------------------

def user_errors() -> tuple[type[Exception], ...]:
    """Errors phrased for the user (bad config, data, model path): exit code 2, no traceback."""
    from hone.config import ConfigError
    from hone.data.readers import DataError
    from hone.data.template import TemplateError
    from hone.models.load import ModelError
    from hone.train.prepare import DataProblems
    from hone.train.run import RunError

    return (BenchError, ConfigError, DataError, DataProblems, ModelError, RunError, TemplateError,
            FileNotFoundError)


def run(cfg, resume: bool):
    from hone.train.loop import Interrupted, TrainingFailed
    from hone.train.run import run_training

    try:
        return run_training(cfg, resume=resume)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as e:
        print(f"stopped; checkpoint {e.checkpoint}. Continue with the same options plus --resume",
              file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    except (TrainingFailed, ValueError) as e:  # ValueError: e.g. every example rejected; see the run dir
        print(f"error: run failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def eval_label_list(cfg, run_dir: Path, labels: list[str]) -> dict:
    """Score the base model zero-shot with every label in its prompt; cached in the run directory.

    Also counts prompt tokens per request for both prompts with the real loaded tokenizer.
    """
    path = run_dir / LABEL_LIST_CACHE
    if path.is_file():
        print(f"label-list evaluation: reusing {path}")
        return json.loads(path.read_text())
    import torch

    from hone.eval.runners import evaluate_task
    from hone.models.load import load_model
    from hone.train.device import pick_device, use_bf16

    instruction = label_list_instruction()
    listed = held_out_conversations(cfg.data.validation, instruction, labels, cfg.data.dedupe)
    short = held_out_conversations(cfg.data.validation, cfg.data.instruction, labels, cfg.data.dedupe)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    loaded = load_model(cfg.model.base, allow_download=cfg.model.allow_download,
                        trust_remote_code=cfg.model.trust_remote_code)
    listed_len, short_len = prompt_lengths(loaded.tokenizer, listed), prompt_lengths(loaded.tokenizer, short)
    device = pick_device()
    bf16 = use_bf16(device, cfg.train.precision)
    loaded.model.to(device)
    print(f"\nscoring the base model zero-shot with all {len(labels)} labels in the prompt: {len(listed)} queries, "
          f"~{sum(listed_len) / max(1, len(listed)):.0f} prompt tokens each ...", flush=True)
    result = evaluate_task(loaded.model, loaded.tokenizer, listed, labels, max_new_tokens=cfg.eval.max_new_tokens,
                           batch_size=LABEL_LIST_BATCH, bf16=bf16)
    cached = {"instruction": instruction, "batch_size": LABEL_LIST_BATCH, "max_new_tokens": cfg.eval.max_new_tokens,
              "prompt_tokens_per_request": sum(listed_len) / max(1, len(listed)),
              "short_prompt_tokens_per_request": sum(short_len) / max(1, len(short)), "result": result}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cached, indent=2))
    os.replace(tmp, path)
    return cached


def wilson95(p: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval for an accuracy p over n queries (sound at 0% and 100%, unlike p +/- 2se)."""
    if not n:
        return float("nan"), float("nan")
    z2 = 1.96 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = 1.96 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def table_row(label: str, metrics: dict, prompt_tokens: float) -> dict:
    return {"row": label, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "invalid": metrics["invalid"], "prompt_tokens_per_request": prompt_tokens,
            "seconds_per_request": metrics["seconds_per_example"]}


def results(outcome, listed: dict, args, cfg, base: str, n_train: int, started: float) -> dict:
    ev = outcome.summary["eval"]
    short_tokens = listed["short_prompt_tokens_per_request"]
    rows = dict(zip([k for k, _ in ROWS], (
        table_row(ROWS[0][1], listed["result"]["metrics"], listed["prompt_tokens_per_request"]),
        table_row(ROWS[1][1], ev["base"], short_tokens),
        table_row(ROWS[2][1], ev["tuned"], short_tokens))))
    # The better base row: by accuracy, then macro-F1, then fewer invalid answers.
    best = max(("base_label_list", "base_short"),
               key=lambda k: (rows[k]["accuracy"], rows[k]["macro_f1"], -rows[k]["invalid"]))
    n, n_listed = ev["n"], listed["result"]["n"]
    return {"benchmark": "banking77", "model": base, "k": args.k, "held_out_per_intent": args.held_out_per_intent,
            "seed": args.seed, "epochs": args.epochs, "n_train": n_train, "n_held_out": n,
            "n_held_out_label_list": n_listed,
            "instructions": {"short": cfg.data.instruction, "label_list": listed["instruction"]},
            "batch_size": {"short": cfg.eval.batch_size, "label_list": listed["batch_size"]},
            "rows": rows, "best_base": best,
            "delta_tuned_vs_best_base": {m: rows["tuned_short"][m] - rows[best][m] for m in ROW_METRICS},
            "accuracy_95ci": {"tuned_short": wilson95(rows["tuned_short"]["accuracy"], n),
                              best: wilson95(rows[best]["accuracy"], n_listed if best == "base_label_list" else n)},
            "training": outcome.summary["training"], "run_dir": str(outcome.run_dir),
            "report": str(outcome.run_dir / "report.html"),
            "label_list_eval": str(outcome.run_dir / LABEL_LIST_CACHE), "wall_seconds": time.time() - started,
            "reference_points": [{"what": w, "accuracy": a} for w, a in REFERENCE_POINTS]}


def print_results(res: dict) -> None:
    n = res["n_held_out"]
    print(f"\nBanking77, K={res['k']} per intent ({res['n_train']} training queries), "
          f"held-out {n} queries ({res['held_out_per_intent']} per intent, seed {res['seed']})")
    if res["n_held_out_label_list"] != n:
        print(f"warning: the label-list row scored {res['n_held_out_label_list']} queries, the others {n}")
    header = (f"{'':<40} {'accuracy':>9} {'macro-F1':>9} {'invalid':>8} {'prompt tok/req':>15} "
              f"{'s/req':>7}")
    print(header)
    print("-" * len(header))
    for key, _ in ROWS:
        r = res["rows"][key]
        print(f"{r['row']:<40} {r['accuracy']:>9.1%} {r['macro_f1']:>9.1%} {r['invalid']:>8d} "
              f"{r['prompt_tokens_per_request']:>15.1f} {r['seconds_per_request']:>7.3f}")
    d, best = res["delta_tuned_vs_best_base"], res["best_base"]
    print(f"{'tuned - best base (' + best.replace('base_', '').replace('_', ' ') + ')':<40} "
          f"{d['accuracy'] * 100:>+8.1f}pt {d['macro_f1'] * 100:>+7.1f}pt {d['invalid']:>+8d} "
          f"{d['prompt_tokens_per_request']:>+15.1f} {d['seconds_per_request']:>+7.3f}")
    ci = res["accuracy_95ci"]
    print("accuracy, 95% Wilson interval: "
          + "; ".join(f"{res['rows'][k]['row']} {lo:.1%} to {hi:.1%}" for k, (lo, hi) in ci.items()))
    print("('invalid' = answers naming no intent; s/req = batched generation time / queries, batches of "
          f"{res['batch_size']['short']} short and {res['batch_size']['label_list']} label-list prompts)")
    print("\nreference points (Casanueva et al. 2020 / leaderboards, official test split, "
          "not this held-out set):")
    for what, acc in REFERENCE_POINTS:
        print(f"  ~{acc:.1%}  {what}")
    tr = res["training"]
    print(f"\ntrained {tr['steps']} steps in {tr['seconds'] / 60:.1f} min ({tr['tokens_per_second']:.0f} tok/s, "
          f"{tr['device']}, {tr['precision']}); wall time {res['wall_seconds'] / 60:.1f} min")
    print(f"run directory: {res['run_dir']}")
    print(f"report: {res['report']} (and report.md; base and tuned, short prompt)")
    print(f"label-list evaluation: {res['label_list_eval']}")


def prepare_split(args, csv_path: Path) -> tuple[Path, Path, int, int]:
    """Carve and write the split; returns (train file, held-out file, train size, held-out size)."""
    rows, dropped = read_banking77(csv_path)
    intents = {i for _, i in rows}
    if len(intents) != N_INTENTS:
        print(f"warning: {csv_path} has {len(intents)} intents, expected {N_INTENTS}", file=sys.stderr)
    train, held_out = split_per_intent(rows, args.k, args.held_out_per_intent, args.seed)
    data_dir = args.out / "data"
    h, s = args.held_out_per_intent, args.seed
    train_path = write_jsonl(data_dir / f"train-k{args.k}-h{h}-seed{s}.jsonl", train)
    held_path = write_jsonl(data_dir / f"held_out-h{h}-seed{s}.jsonl", held_out)
    print(f"data: {len(rows)} queries over {len(intents)} intents from {csv_path} ({dropped} repeated or empty "
          f"dropped)\n  train {len(train)} -> {train_path}\n  held-out {len(held_out)} -> {held_path}")
    return train_path, held_path, len(train), len(held_out)


def plan_run(args, base: str, train_path: Path, held_path: Path, n_held: int, name: str):
    """The run's config fitted to the model's tokenizer, and its estimate (None without a tokenizer)."""
    def make(max_seq_len: int, eval_every: int | None = None):
        return build_config(args, base, train_path, held_path, n_held, name, max_seq_len, eval_every)

    cfg = make(args.max_seq_len or DEFAULT_MAX_SEQ_LEN)
    tokenizer = load_tokenizer(base)
    if tokenizer is None:
        print("(could not load the tokenizer on its own: no estimate, and max_seq_len is not fitted)")
        return cfg, None
    rendered = render_examples(cfg, tokenizer)
    est = estimate(cfg, rendered)
    seq = cfg.data.max_seq_len
    if est.longest > seq and args.max_seq_len is None and not user_set(args, "data.max_seq_len"):
        # The label is the last thing in an example: truncation would cut exactly what is being learned.
        seq = -(-est.longest // 64) * 64
        print(f"note: the longest example is {est.longest} tokens with this model's tokenizer; max_seq_len "
              f"raised from {cfg.data.max_seq_len} to {seq} (set --max-seq-len to override)")
        cfg = make(seq)
        est = estimate(cfg, rendered)  # rows are longer now: fewer examples per step, more steps
    if not user_set(args, "train.eval_every"):
        # Validation loss once per epoch (not hone's 4 times a run): each pass costs minutes on a small CPU.
        cfg = make(seq, est.steps_per_epoch)
        est = estimate(cfg, rendered)
    return cfg, est


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    csv_path = args.data_dir / "train.csv"
    if not csv_path.is_file():
        print(f"error: Banking77 data not found: {csv_path}\nThis benchmark reads the shared dataset "
              f"(../shared/datasets/banking77/train.csv from the project root); point --data-dir at the folder "
              "holding train.csv. The data is never copied into the project.", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from hone.config import EMBEDDED_MODEL

    hf_logging.set_verbosity_error()
    started = time.time()
    base = args.model or EMBEDDED_MODEL
    try:
        train_path, held_path, n_train, n_held = prepare_split(args, csv_path)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = model_slug(base) if args.resume else next_free(args.out, model_slug(base))
    try:
        cfg, est = plan_run(args, base, train_path, held_path, n_held, name)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if est is not None:
        print_estimate(est, n_train, cfg.train.epochs, cfg.data.max_seq_len)
    if args.plan_only:
        return 0
    print(f"run: {args.out / name} ({'resuming' if args.resume else 'new'}), base model {base}\n", flush=True)

    outcome = run(cfg, args.resume)
    if not outcome.summary.get("eval"):
        print(f"evaluation was disabled (eval.enabled=false): nothing to compare. Run: {outcome.run_dir}")
        return 0
    labels = outcome.summary["eval"].get("labels") or json.loads((outcome.run_dir / "labels.json").read_text())
    try:
        listed = eval_label_list(cfg, outcome.run_dir, labels)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped during the label-list evaluation; training and the short-prompt evaluations are saved. "
              "Continue with the same options plus --resume", file=sys.stderr)
        return 130
    res = results(outcome, listed, args, cfg, base, n_train, started)
    print_results(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
