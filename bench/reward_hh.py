"""A reward model on Anthropic hh-rlhf (harmless) pairs: held-out pairwise accuracy before and after.

    flock /tmp/hone-heavy.lock nice -n 19 .venv/bin/python bench/reward_hh.py [--train 160] [--epochs 1]
        [--adapter lora] [--lr 1e-3] [--out /tmp/reward/hh]

Trains `method: reward` on the embedded model (SmolLM2-135M-Instruct) over a subsample of the train side of
`hh_split` (bench/preference_hh.py, the split the dpo bench uses too) and scores the 200 held-out pairs
before (a fresh score head) and after. Beside it, the same pairs scored by answer length alone ("the
shorter answer is preferred"), the trivial baseline a reward model has to beat on this data.

Reads /work/shared/datasets/hh-rlhf-harmless/pairs.jsonl.gz in place; the files it writes (the subsample as
JSONL, the run directory) go under --out, outside the project. The text is offensive red-teaming dialogue,
so nothing here prints examples, and the run's report is not for showing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from preference_hh import HH_PAIRS, hh_split  # noqa: E402


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_config(args, train: Path, held: Path) -> dict:
    return {"name": f"reward-{args.adapter}-{args.train}", "output_dir": str(args.out / "runs"),
            "method": "reward", "adapter": args.adapter,
            "data": {"train": str(train), "validation": str(held), "max_seq_len": args.max_seq_len,
                     "max_validation": 10_000},
            "preference": {"max_prompt_tokens": args.max_prompt_tokens},
            "train": {"epochs": args.epochs, "learning_rate": args.lr, "batch_tokens": args.batch_tokens,
                      "warmup_ratio": 0.05, "log_every": 5, "threads": args.threads, "seed": args.seed,
                      # validation loss costs as much as the held-out evaluation: once, at the end
                      "eval_every": 100_000, "save_every": 100_000, "keep_checkpoints": 1},
            "eval": {"batch_size": 16, "examples_in_report": 0}}


def length_baseline(held_rows: list[dict], tokenizer, cfg) -> float:
    """Accuracy of 'the shorter answer (in tokens) is the preferred one'; ties count half."""
    from hone.methods.pairs import parse_pair, tokenize_pair

    right = 0.0
    for row in held_rows:
        t = tokenize_pair(tokenizer, parse_pair(row), cfg.preference.max_prompt_tokens, 10**9)
        c, r = len(t.chosen_ids), len(t.rejected_ids)
        right += 1.0 if c < r else 0.5 if c == r else 0.0
    return right / len(held_rows)


def interval(p: float, n: int) -> str:
    return f"± {1.96 * math.sqrt(p * (1 - p) / n):.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=160, help="train pairs (the first n of hh_split's train side)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--adapter", default="lora", help="lora or full")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per micro-batch (~7 GB here)")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--max-prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/reward/hh"))
    args = ap.parse_args()

    from hone.config import parse_config
    from hone.models.load import load_tokenizer
    from hone.train.run import run_training

    train_rows, held_rows = hh_split(HH_PAIRS, seed=args.seed)
    train = write_jsonl(args.out / f"train-{args.train}.jsonl", train_rows[:args.train])
    held = write_jsonl(args.out / "held.jsonl", held_rows)
    cfg = parse_config(run_config(args, train, held))
    run_dir = Path(cfg.output_dir) / cfg.name
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: remove it or pick another --out")
    start = time.perf_counter()
    outcome = run_training(cfg, show_progress=False)
    seconds = time.perf_counter() - start
    base = json.loads((run_dir / "eval_base.json").read_text())["metrics"]
    tuned = json.loads((run_dir / "eval_tuned.json").read_text())["metrics"]
    training = outcome.summary["training"]
    n = len(held_rows)
    shorter = length_baseline(held_rows, load_tokenizer(cfg.model.base)[0], cfg)
    print(f"hh-rlhf harmless, reward model on {cfg.model.base} ({args.adapter}), {args.train} train pairs, "
          f"{n} held-out pairs, {training['steps']} steps, {training['precision']}, {seconds:.0f} s wall "
          f"({training['tokens_per_second']:.0f} train tokens/s)")
    print(f"  pairwise accuracy   before {base['pairwise_accuracy']:.1%}   after {tuned['pairwise_accuracy']:.1%} "
          f"{interval(tuned['pairwise_accuracy'], n)}   (shorter-answer baseline {shorter:.1%})")
    print(f"  mean margin         before {base['mean_margin']:+.3f}   after {tuned['mean_margin']:+.3f}")
    print(f"  run: {run_dir}")


if __name__ == "__main__":
    main()
