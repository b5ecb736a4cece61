"""Banking77 few-shot benchmark: does fine-tuning on K examples per intent beat the base model?

What it measures: intent classification on Banking77 (customer-support queries, 77 intents). From
../shared/datasets/banking77/train.csv it carves, deterministically, a held-out set of H queries per intent
(default 3, so 231 queries; the same set whatever K is) and a training set of K other queries per intent
(default 10, so 770). It then runs hone's real pipeline (hone.train.run.run_training): evaluate the base
model on the held-out set, LoRA fine-tune, evaluate the tuned model on the same prompts, write the report.
Both models see the same instruction, which lists all 77 intent names, so the base model has a fair chance.
It prints accuracy, macro-F1 and unparseable answers for base and tuned, the difference, and the published
reference points.

How to run (from the project root, with the venv active):

    python bench/banking77.py                              # embedded SmolLM2-135M, K=10, 2 epochs
    python bench/banking77.py --k 5 --epochs 3 --json runs/b77.json
    python bench/banking77.py --resume                     # continue an interrupted run
    python -m hone.models.tiny /tmp/tiny_b77               # smoke test with a tiny random model:
    python bench/banking77.py --model /tmp/tiny_b77 --k 2 --held-out-per-intent 1 --epochs 1

Expected runtime with the defaults on a 2-core CPU in fp32 (nothing else running): about 2.5 hours. The
instruction lists the 77 intent names, so with the embedded model's tokenizer each example is ~600 tokens
(max_seq_len is raised from 512 to fit the longest, 663, rather than cut off the label being learned):
770 examples x 2 epochs is ~1.1M tokens processed in training at a measured ~150 tokens/s (~2 h), plus two
validation-loss passes and two generation passes over the 231 held-out queries (~25 min). The script prints
its own estimate from the real token counts before it starts (`--plan-only` prints it and stops). The tiny
smoke test takes about 2-5 minutes (its byte-level tokenizer makes ~1,400-token examples).

The data is read from ../shared/datasets (never copied into the project); the derived train and held-out
JSONL files go to the run's output folder, runs/banking77-k{K}/data/ by default (runs/ is not in git).
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
DEFAULT_MAX_SEQ_LEN = 512
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
    p.add_argument("--batch-tokens", type=int, default=4096, help="Tokens per micro-batch.")
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
        # hone's default instruction lists the labels ({labels}); max_validation keeps every held-out query.
        "data": {"train": str(train_path), "validation": str(held_path), "max_validation": n_held,
                 "max_seq_len": max_seq_len},
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


@dataclass
class Estimate:
    train_tokens: int          # real tokens per epoch
    processed_train: int       # tokens the model processes over the run, row padding included
    steps: int
    steps_per_epoch: int
    val_passes: int
    processed_val: int         # per validation-loss pass, padding included
    prompt_tokens: int         # held-out prompts, per generation pass
    decode_steps: int          # per generation pass
    truncated: int             # training examples longer than max_seq_len
    longest: int               # longest example (train or held-out), untruncated

    def seconds(self) -> dict[str, float]:
        fwd = TRAIN_TOKENS_PER_S * FORWARD_SPEEDUP
        return {"training": self.processed_train / TRAIN_TOKENS_PER_S,
                "validation loss": self.val_passes * self.processed_val / fwd,
                "generation (base + tuned)": 2 * (self.prompt_tokens / fwd + self.decode_steps * DECODE_STEP_S)}


@dataclass
class Rendered:
    """The examples as hone will tokenize them (untruncated), and the held-out prompts' token counts."""
    train: list
    held_out: list
    prompt_tokens: int


def render_examples(cfg, tokenizer) -> Rendered:
    """Tokenize with hone's own validation and templating; independent of max_seq_len and batching."""
    from hone.data.template import ensure_chat_template, render_prompt, render_with_loss_mask
    from hone.train.prepare import validate_data

    ensure_chat_template(tokenizer)
    data = validate_data(cfg.data, cfg.train.seed)
    return Rendered([render_with_loss_mask(tokenizer, c, loss_on=cfg.data.loss_on) for c in data.train],
                    [render_with_loss_mask(tokenizer, c, loss_on=cfg.data.loss_on) for c in data.held_out],
                    sum(len(render_prompt(tokenizer, c.prompt_messages())) for c in data.held_out))


def estimate(cfg, rendered: Rendered) -> Estimate:
    """Exact token counts and step plan for this config, using hone's own packing and batch plan."""
    from hone.data.pack import pack_rows, plan_epoch
    from hone.data.template import Tokenized
    from hone.train.loop import every, plan_batches

    m = cfg.data.max_seq_len
    train, held = ([Tokenized(t.input_ids[:m], t.weights[:m], len(t.input_ids) > m) for t in part]
                   for part in (rendered.train, rendered.held_out))
    batches, row_len = plan_batches(train, cfg)
    rows_per_batch = max(1, cfg.train.batch_tokens // row_len)
    steps = math.ceil(len(batches) / cfg.train.grad_accum)
    per_epoch = plan_epoch(train, seed=cfg.train.seed, epoch=0, row_len=row_len, rows_per_batch=rows_per_batch)
    eval_every = every(cfg.train.eval_every, steps)
    eval_len = max(row_len, max(len(t.input_ids) for t in held))
    return Estimate(
        train_tokens=sum(len(t.input_ids) for t in train),
        processed_train=sum(len(rows) for rows in batches) * row_len,
        steps=steps, steps_per_epoch=math.ceil(len(per_epoch) / cfg.train.grad_accum),
        val_passes=sum(1 for s in range(1, steps + 1) if s % eval_every == 0 or s == steps),
        processed_val=len(pack_rows(held, list(range(len(held))), eval_len)) * eval_len,
        prompt_tokens=rendered.prompt_tokens,
        decode_steps=math.ceil(len(held) / cfg.eval.batch_size) * cfg.eval.max_new_tokens,
        truncated=sum(t.truncated for t in train),
        longest=max(len(t.input_ids) for t in rendered.train + rendered.held_out))


def print_estimate(est: Estimate, n_train: int, epochs: float, max_seq_len: int) -> None:
    parts = est.seconds()
    print(f"plan: {n_train} training examples, {est.train_tokens:,} tokens per epoch "
          f"(~{est.train_tokens / max(1, n_train):.0f} per example: the instruction lists all 77 intents), "
          f"{epochs:g} epoch(s), {est.steps} optimizer steps, max_seq_len {max_seq_len}, "
          f"validation loss {est.val_passes} time(s)")
    if est.truncated:
        print(f"warning: {est.truncated} training example(s) exceed max_seq_len={max_seq_len} and will be "
              "truncated (hone drops those left without their label)")
    print(f"time ESTIMATE (not a measurement), from ~{TRAIN_TOKENS_PER_S:.0f} tok/s measured for LoRA training "
          f"of the embedded 135M model on this 2-core CPU in fp32; forward-only passes assumed "
          f"{FORWARD_SPEEDUP:g}x faster; other models and busy CPUs differ:")
    print(f"  {'training':<26} ~{parts['training'] / 60:6.1f} min "
          f"({est.processed_train:,} tokens processed, row padding included)")
    for what in ("validation loss", "generation (base + tuned)"):
        print(f"  {what:<26} ~{parts[what] / 60:6.1f} min")
    print(f"  {'total':<26} ~{sum(parts.values()) / 60:6.1f} min, plus model loading")


# --- run and results -------------------------------------------------------------------------------------

def user_errors() -> tuple[type[Exception], ...]:
    """Errors phrased for the user (bad config, data, model path): exit code 2, no traceback."""
    from hone.config import ConfigError
    from hone.data.readers import DataError
    from hone.data.template import TemplateError
    from hone.models.load import ModelError
    from hone.train.prepare import DataProblems
    from hone.train.run import RunError

    return (ConfigError, DataError, DataProblems, ModelError, RunError, TemplateError, FileNotFoundError)


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


def wilson95(p: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval for an accuracy p over n queries (sound at 0% and 100%, unlike p +/- 2se)."""
    if not n:
        return float("nan"), float("nan")
    z2 = 1.96 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = 1.96 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def results(outcome, args, base: str, n_train: int, started: float) -> dict:
    ev = outcome.summary["eval"]
    keys = ("accuracy", "macro_f1", "invalid")
    b, t = ({k: ev[side][k] for k in keys} for side in ("base", "tuned"))
    return {"benchmark": "banking77", "model": base, "k": args.k, "held_out_per_intent": args.held_out_per_intent,
            "seed": args.seed, "epochs": args.epochs, "n_train": n_train, "n_held_out": ev["n"],
            "base": b, "tuned": t, "delta": {k: t[k] - b[k] for k in keys},
            "tuned_accuracy_95ci": wilson95(t["accuracy"], ev["n"]),
            "training": outcome.summary["training"], "run_dir": str(outcome.run_dir),
            "report": str(outcome.run_dir / "report.html"), "wall_seconds": time.time() - started,
            "reference_points": [{"what": w, "accuracy": a} for w, a in REFERENCE_POINTS]}


def print_results(res: dict) -> None:
    n = res["n_held_out"]
    print(f"\nBanking77, K={res['k']} per intent ({res['n_train']} training queries), "
          f"held-out {n} queries ({res['held_out_per_intent']} per intent, seed {res['seed']})")
    header = f"{'model':<8} {'accuracy':>9} {'macro-F1':>9} {'invalid':>8} {'n':>5}"
    print(header)
    print("-" * len(header))
    for side in ("base", "tuned"):
        m = res[side]
        print(f"{side:<8} {m['accuracy']:>9.1%} {m['macro_f1']:>9.1%} {m['invalid']:>8d} {n:>5d}")
    d = res["delta"]
    print(f"{'delta':<8} {d['accuracy'] * 100:>+8.1f}pt {d['macro_f1'] * 100:>+7.1f}pt {d['invalid']:>+8d}")
    lo, hi = wilson95(res["tuned"]["accuracy"], n)
    print(f"(tuned accuracy, 95% interval over {n} queries: {lo:.1%} to {hi:.1%}; "
          "'invalid' = answers naming no intent)")
    print("\nreference points (Casanueva et al. 2020 / leaderboards, official test split, "
          "not this held-out set):")
    for what, acc in REFERENCE_POINTS:
        print(f"  ~{acc:.1%}  {what}")
    tr = res["training"]
    print(f"\ntrained {tr['steps']} steps in {tr['seconds'] / 60:.1f} min ({tr['tokens_per_second']:.0f} tok/s, "
          f"{tr['device']}, {tr['precision']}); wall time {res['wall_seconds'] / 60:.1f} min")
    print(f"run directory: {res['run_dir']}")
    print(f"report: {res['report']} (and report.md)")


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
    res = results(outcome, args, base, n_train, started)
    print_results(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
