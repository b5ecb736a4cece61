"""Contrastive fine-tuning on Banking77: does `method: contrastive` make MiniLM retrieve same-intent queries?

What it measures: retrieval of a customer query's intent-mate. From ../shared/datasets/banking77/train.csv
(read at run time, never copied into the project) it builds, deterministically (texts of each intent ordered
by a seeded SHA-256 of the text):

  held-out   per intent, one text is the intent's passage and the next H texts (default 3) are queries
             whose positive is that passage: 231 queries against a corpus of 77 passages, one per intent,
             so recall@1 is "the nearest passage has the query's intent"
  train      per intent, the next 2K texts (default K=20) as K disjoint (query, positive) pairs of two
             queries of that intent: 1,533 pairs (a few intents have fewer texts), none shared with the
             held-out set

Then it trains all-MiniLM-L6-v2 (hone's default model for this method) with the real command,
`hone train CONFIG`, and prints recall@1, recall@5 and MRR of the base and the tuned encoder on the held-out
queries (hone's own eval_base.json / eval_tuned.json), with the training time.

Why pairs of queries: Banking77 has no passages, and two queries of one intent are exactly what a support
search should match. In-batch negatives drawn from other pairs are sometimes of the same intent (with 77
intents and 32 pairs a batch, about a third of the rows see one); they are real false negatives that
text-level masking cannot see, and the figure is measured with them.

How to run (from the project root):

    python bench/contrastive_banking77.py --out /tmp/contrastive/b77      # ~10 minutes on a 2-core CPU
    python bench/contrastive_banking77.py --k 5 --epochs 1               # quicker, smaller
    python bench/contrastive_banking77.py --set train.threads=2          # any hone config override
    python bench/contrastive_banking77.py --out /tmp/contrastive/b77 --resume   # after an interruption

Exit codes: 0 done (or skipped because the dataset is absent), 1 the run failed, 2 bad input, 128+N
stopped by signal N (a checkpoint was saved: rerun with --resume).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = PROJECT_ROOT.parent / "shared" / "datasets" / "banking77" / "train.csv"
METRICS = (("recall_at_1", "recall@1"), ("recall_at_5", "recall@5"), ("mrr", "MRR"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_CSV, help="Banking77 train.csv (text,category).")
    p.add_argument("--out", type=Path, default=Path("runs") / "contrastive-banking77",
                   help="Output folder: data/, config.yaml and the hone run directory go here.")
    p.add_argument("--k", type=int, default=20, help="Training pairs per intent.")
    p.add_argument("--held-out-per-intent", type=int, default=3, help="Held-out queries per intent.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the text ordering and of training.")
    p.add_argument("--epochs", type=float, default=2, help="Passes over the training pairs.")
    p.add_argument("--lr", type=float, default=5e-5, help="Peak learning rate (every weight trains).")
    p.add_argument("--batch-size", type=int, default=32, help="Pairs per batch (in-batch negatives).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Any other hone config override (repeatable).")
    p.add_argument("--resume", action="store_true",
                   help="Continue the interrupted run in --out (same options); finished phases are not repeated.")
    args = p.parse_args(argv)
    if args.k < 1 or args.held_out_per_intent < 1:
        p.error("--k and --held-out-per-intent must be at least 1")
    return args


def texts_by_intent(csv_path: Path, seed: int) -> dict[str, list[str]]:
    """Distinct texts per intent, each intent's list in seeded-hash order (deterministic, not file order)."""
    groups: dict[str, set[str]] = defaultdict(set)
    with csv_path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("text", "").strip() and row.get("category"):
                groups[row["category"]].add(row["text"].strip())

    def rank(text: str) -> str:
        return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()

    return {intent: sorted(texts, key=rank) for intent, texts in sorted(groups.items())}


def build_pairs(groups: dict[str, list[str]], k: int, held_per_intent: int) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs); see the module docstring for the layout."""
    train, held = [], []
    for texts in groups.values():
        passage, queries = texts[0], texts[1:1 + held_per_intent]
        held += [{"query": q, "positive": passage} for q in queries]
        rest = texts[1 + held_per_intent:]
        train += [{"query": rest[i], "positive": rest[i + 1]} for i in range(0, min(2 * k, len(rest) - 1), 2)]
    return train, held


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(args, train: Path, held: Path, n_held: int) -> Path:
    cfg = {"name": "run", "output_dir": str(args.out), "method": "contrastive",
           "data": {"train": str(train), "validation": str(held), "max_validation": n_held},
           "contrastive": {"batch_size": args.batch_size, "max_seq_len": 64},
           "train": {"epochs": args.epochs, "learning_rate": args.lr, "warmup_ratio": 0.1, "seed": args.seed,
                     "log_every": 10, "keep_checkpoints": 1}}
    path = args.out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"skipped: Banking77 not found at {args.data} (this benchmark reads the shared dataset; "
              "point --data at its train.csv)")
        return 0
    groups = texts_by_intent(args.data, args.seed)
    train, held = build_pairs(groups, args.k, args.held_out_per_intent)
    if not train or len(held) < 2:
        print(f"error: {args.data} gave {len(train)} train and {len(held)} held-out pairs: too few", file=sys.stderr)
        return 2
    run_dir = args.out / "run"
    if run_dir.exists() != args.resume:
        why = "exists: pick another --out, or add --resume" if run_dir.exists() else "does not exist: nothing to resume"
        print(f"error: {run_dir} {why}", file=sys.stderr)
        return 2
    train_path = write_jsonl(args.out / "data" / "train.jsonl", train)
    held_path = write_jsonl(args.out / "data" / "held_out.jsonl", held)
    cfg_path = write_config(args, train_path, held_path, len(held))
    print(f"{len(groups)} intents: {len(train)} train pairs, {len(held)} held-out queries against "
          f"{len({h['positive'] for h in held})} passages\nconfig: {cfg_path}", flush=True)
    command = [sys.executable, "-m", "hone", "train", str(cfg_path)] + (["--resume"] if args.resume else [])
    for item in args.overrides:
        command += ["--set", item]
    started = time.time()
    code = run_hone(command)
    if code > 128:
        print("stopped; continue with the same command plus --resume", file=sys.stderr)
        return code
    if code != 0:
        return 2 if code == 2 else 1
    report(run_dir, time.time() - started)
    return 0


def run_hone(command: list[str]) -> int:
    """Run `hone train`, passing SIGTERM / Ctrl-C on so it checkpoints before it stops."""
    child = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    return child.wait()


def report(run_dir: Path, seconds: float) -> None:
    base = json.loads((run_dir / "eval_base.json").read_text())
    tuned = json.loads((run_dir / "eval_tuned.json").read_text())
    training = json.loads((run_dir / "manifest.json").read_text())["training"]
    print(f"\nheld-out: {tuned['n']} queries, corpus {tuned['corpus']} passages "
          f"({training['steps']} steps in {training['seconds']:.0f} s of training, {seconds:.0f} s in all)")
    print(f"{'metric':<10} {'base':>8} {'tuned':>8} {'change':>10}")
    for key, name in METRICS:
        b, t = base["metrics"][key], tuned["metrics"][key]
        print(f"{name:<10} {b:>8.1%} {t:>8.1%} {100 * (t - b):>+7.1f} pts")
    print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    sys.exit(main())
