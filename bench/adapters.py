"""Parameter-efficient methods side by side: lora, dora, ia3, qlora, prefix and prompt tuning on the same data.

Each method is one real `hone train` run (its own process, so peak memory does not mix) on the embedded
SmolLM2-135M and hone's demo tickets (360 train / 120 test, 8 labels), with `hone demo`'s settings except a
fixed number of optimizer steps, the same for every method. Each run waits for /tmp/hone-heavy.lock (one heavy
job at a time on a shared machine) and runs under `nice -n 19`. From each run's manifest and evaluation:

- trainable: parameters the optimizer updates (4-bit weights count as the values they hold)
- peak RSS: the process's high-water mark (ru_maxrss), model loading and evaluation included
- tokens/s: real (non-padding) tokens per second of training steps
- accuracy: held-out label accuracy of the tuned model (greedy generation); `base` is the starting model's
  (for qlora, the 4-bit base it trains over)

    python bench/adapters.py                          # all six, 30 steps each (~30 min on 2 CPU cores)
    python bench/adapters.py --methods prefix prompt --steps 10 --out /tmp/me/bench
    python bench/adapters.py --model /tmp/tiny --no-lock --steps 4   # a quick check on the tiny model

Learning rates differ by method (prompt-learning adapters need larger steps): see LEARNING_RATES.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "hone" / "demo_data"
METHODS = ("lora", "dora", "ia3", "qlora", "prefix", "prompt")
# hone demo's 1e-3 for the LoRA family; (IA)3 scales activations by learnt vectors and wants a larger step;
# prefix and prompt tuning train a few vectors in front of the whole network, which take larger steps still.
LEARNING_RATES = {"lora": 1e-3, "dora": 1e-3, "qlora": 1e-3, "ia3": 1e-2, "prefix": 1e-2, "prompt": 3e-2}
LOCK = Path("/tmp/hone-heavy.lock")


def learning_rate(method: str, args) -> float:
    return args.lr.get(method, LEARNING_RATES[method])


def run_name(method: str, args) -> str:
    return f"{method}-lr{learning_rate(method, args):g}-{args.steps}steps"


def run_config(method: str, args) -> dict:
    """`hone demo`'s run (src/hone/cli.py) with a fixed step count."""
    return {
        "name": run_name(method, args), "output_dir": str(args.out / "runs"), "method": method,
        "model": {"base": args.model},
        "data": {"train": str(DEMO / "tickets_train.jsonl"), "validation": str(DEMO / "tickets_test.jsonl"),
                 "max_seq_len": 256},
        "train": {"max_steps": args.steps, "learning_rate": learning_rate(method, args),
                  "batch_tokens": 1024, "threads": args.threads, "save_every": args.steps,
                  "eval_every": args.steps},
        "eval": {"max_new_tokens": 8},
    }


def run_one(method: str, args) -> dict:
    run_dir = args.out / "runs" / run_name(method, args)
    if not (run_dir / "manifest.json").is_file() or \
            json.loads((run_dir / "manifest.json").read_text()).get("status") != "succeeded":
        cfg_path = args.out / f"{run_name(method, args)}.yaml"
        cfg_path.write_text(yaml.safe_dump(run_config(method, args)))
        resume = ["--resume"] if (run_dir / "config.yaml").is_file() else []
        with open(LOCK, "a") as lock:
            if not args.no_lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one heavy job at a time on this machine
            start = time.time()
            proc = subprocess.run(["nice", "-n", "19", sys.executable, "-m", "hone", "train", str(cfg_path), *resume],
                                  capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method}: hone train failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                             f"{proc.stderr[-3000:]}")
        print(f"{method}: done in {time.time() - start:.0f}s", file=sys.stderr)
    return summarise(method, run_dir)


def summarise(method: str, run_dir: Path) -> dict:
    training = json.loads((run_dir / "manifest.json").read_text())["training"]
    base = json.loads((run_dir / "eval_base.json").read_text())
    tuned = json.loads((run_dir / "eval_tuned.json").read_text())
    changed = sum(b != t for b, t in zip(base["outputs"], tuned["outputs"]))
    return {"method": method, "trainable_params": training["trainable_params"],
            "total_params": training["total_params"], "peak_rss_mb": training["peak_memory_mb"],
            "tokens_per_second": training["tokens_per_second"], "seconds": training["seconds"],
            "steps": training["steps"], "learning_rate": yaml.safe_load((run_dir / "config.yaml").read_text())
            ["train"]["learning_rate"], "final_train_loss": training["final_train_loss"],
            "final_val_loss": training["final_val_loss"], "base_accuracy": base["metrics"].get("accuracy"),
            "accuracy": tuned["metrics"].get("accuracy"), "outputs_changed": changed, "n": tuned["n"],
            "precision": training["precision"]}


def table(rows: list[dict]) -> str:
    head = ("| method | trainable params | % of model | peak RSS | tokens/s | val loss | accuracy (base) "
            "| lr |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.1%} ({r['base_accuracy']:.1%})"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_params'] / r['total_params']:.3%} "
                     f"| {r['peak_rss_mb']:,.0f} MB | {r['tokens_per_second']:,.0f} | {r['final_val_loss']:.3f} "
                     f"| {acc} | {r['learning_rate']:g} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model.base (default: the embedded model)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=30, help="optimizer steps, the same for every method")
    p.add_argument("--threads", type=int, default=2, help="train.threads")
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="override a learning rate")
    p.add_argument("--out", type=Path, default=Path("/tmp/hone-bench-adapters"),
                   help="run directories and configs go here (a finished run of the same method, learning rate and "
                        "steps is reused, an unfinished one resumed)")
    p.add_argument("--no-lock", action="store_true", help=f"do not wait for {LOCK} (tiny-model checks)")
    args = p.parse_args(argv)
    args.lr = {k: float(v) for k, v in (x.split("=", 1) for x in args.lr)}
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_one(m, args) for m in args.methods]
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"{args.steps} steps of {1024} tokens per method, model {args.model}, "
          f"{rows[0]['n']} held-out examples, {rows[0]['precision']}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
