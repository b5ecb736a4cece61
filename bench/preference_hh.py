"""Preference tuning on Anthropic hh-rlhf (harmless) pairs: held-out preference accuracy before and after.

What it measures: the embedded SmolLM2-135M-Instruct, tuned with `method: dpo` (and optionally simpo / orpo)
on a seeded subsample of real human preference pairs, scored on 200 held-out pairs before and after: how
often the model gives the chosen (less harmful) answer a higher log-probability than the rejected one (summed
over answer tokens, and per token), the mean log-prob margin, and for dpo the implicit reward vs the
reference. Everything is measured by `hone train` itself (eval_base.json / eval_tuned.json of each run).

    .venv/bin/python bench/preference_hh.py                         # dpo, 96 train / 100 held-out, 1 epoch
    .venv/bin/python bench/preference_hh.py --methods dpo,simpo --train 200 --out /tmp/dpo/hh
    .venv/bin/python bench/preference_hh.py --model /tmp/tiny --train 20 --held 20   # smoke test

Reads /work/shared/datasets/hh-rlhf-harmless/pairs.jsonl.gz in place (never copied into the project; its
content is offensive by design, so nothing here prints examples); the derived train/held-out JSONL files go
to --out. `hh_split` is the one deterministic split of it: the reward-model bench imports it so both benches
train and score on the same pairs. Skips (exit 0) when the dataset is absent.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HH_PAIRS = Path("/work/shared/datasets/hh-rlhf-harmless/pairs.jsonl.gz")
HELD_OUT = 200
TRAIN_CANDIDATES = 1600


def hh_split(path: str | Path = HH_PAIRS, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train_rows, held_rows): raw JSON rows of the pairs file, split by a seeded content hash.

    Rows that are not usable pairs (parse_pair rejects them) are dropped first, so both lists are valid
    `dpo`/`reward` data. The HELD_OUT rows with the lowest hash are held out; the next TRAIN_CANDIDATES are
    train candidates, in hash order, so taking the first n of them is a seeded random subsample.
    """
    from hone.methods import RowError
    from hone.methods.pairs import parse_pair

    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                parse_pair(row)
            except RowError:
                continue
            rows.append(row)
    order = sorted(rows, key=lambda r: hashlib.sha256(
        f"{seed}:{r['chosen']}\x00{r['rejected']}".encode()).hexdigest())
    return order[HELD_OUT:HELD_OUT + TRAIN_CANDIDATES], order[:HELD_OUT]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_config(args, method: str, train: Path, held: Path) -> dict:
    cfg = {"name": f"hh-{method}", "output_dir": str(args.out / "runs"), "method": method,
           "model": {"base": args.model},
           "data": {"train": str(train), "validation": str(held), "max_validation": args.held,
                    "max_seq_len": args.max_seq_len},
           "preference": {"max_prompt_tokens": args.max_prompt_tokens},
           "train": {"epochs": args.epochs, "learning_rate": args.lr, "batch_tokens": args.batch_tokens,
                     "grad_accum": args.grad_accum, "log_every": 2, "eval_every": 10_000, "save_every": 10_000,
                     "threads": args.threads, "warmup_ratio": 0.1}}
    if method == "dpo":
        cfg["preference"]["beta"] = args.beta
    return cfg


def run_method(args, method: str, train: Path, held: Path) -> dict:
    """One `hone train` run in a child process (the real CLI); returns its evaluations and timings."""
    cfg_path = args.out / f"hh-{method}.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(args, method, train, held), sort_keys=False))
    run_dir = args.out / "runs" / f"hh-{method}"
    if run_dir.exists() and not args.resume:
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "hone", "train", str(cfg_path)] + (["--resume"] if run_dir.exists() else [])
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method}: hone train failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {"base": json.loads((run_dir / "eval_base.json").read_text()),
            "tuned": json.loads((run_dir / "eval_tuned.json").read_text()),
            "training": manifest["training"], "wall_seconds": time.perf_counter() - start, "run_dir": str(run_dir)}


ROWS = [("preference_accuracy", "pct"), ("normalized_preference_accuracy", "pct"), ("logp_margin", "num"),
        ("normalized_logp_margin", "num"), ("implicit_reward_accuracy", "pct"), ("implicit_reward_margin", "num")]


def print_table(method: str, result: dict) -> None:
    t = result["training"]
    print(f"\n{method}: {t['steps']} steps, {t['seconds']:.0f}s training, {t['tokens_per_second']:.0f} tokens/s, "
          f"{result['wall_seconds']:.0f}s wall in all ({result['run_dir']})")
    print(f"  {'held-out metric':34} {'base':>9} {'tuned':>9} {'change':>9}")
    for key, kind in ROWS:
        if key not in result["tuned"]["metrics"]:
            continue
        b, a = result["base"]["metrics"][key], result["tuned"]["metrics"][key]
        if kind == "pct":
            print(f"  {key:34} {b:9.1%} {a:9.1%} {100 * (a - b):+8.1f}pt")
        else:
            print(f"  {key:34} {b:9.3f} {a:9.3f} {a - b:+9.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=HH_PAIRS)
    ap.add_argument("--methods", default="dpo", help="comma-separated: dpo, simpo, orpo")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--train", type=int, default=96, help="train pairs (the first n of the seeded candidates)")
    ap.add_argument("--held", type=int, default=100, help="held-out pairs scored before and after")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-seq-len", type=int, default=320)
    ap.add_argument("--max-prompt-tokens", type=int, default=192)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/dpo/hh"))
    ap.add_argument("--resume", action="store_true", help="continue runs already in --out")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not args.data.is_file():
        print(f"skipped: {args.data} not found (the hh-rlhf pairs are not on this machine)")
        return 0
    train_rows, held_rows = hh_split(args.data, args.seed)
    train = write_jsonl(args.out / "data" / "train.jsonl", train_rows[:args.train])
    held = write_jsonl(args.out / "data" / "held.jsonl", held_rows[:args.held])
    print(f"hh-rlhf harmless: {min(args.train, len(train_rows))} train / {min(args.held, len(held_rows))} held-out "
          f"pairs (seed {args.seed}), max_seq_len {args.max_seq_len}, model {args.model}")
    results = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        results[method] = run_method(args, method, train, held)
        print_table(method, results[method])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
