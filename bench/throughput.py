"""Training throughput and peak memory: hone's loop next to a plain transformers Trainer (+ peft), same run.

On the same model, data, tokenization, LoRA config, optimizer, learning rate, precision and number of steps,
this measures for each method (LoRA and full fine-tuning):

- tokens/s: REAL (non-padding) tokens processed in the measured optimizer steps, divided by the wall seconds
  of those steps (data collation, forward, backward, clipping and optimizer step included; warm-up steps,
  model loading and tokenization excluded). Prompt tokens count as well as target tokens, for both engines.
- peak RSS: the high-water mark of the engine's process (ru_maxrss; model load included), plus peak
  torch.cuda.max_memory_allocated on a GPU. Each engine runs in its own subprocess so the numbers do not mix.
- loss: mean cross-entropy per target token over the measured steps, to show both computed the same thing
  (they see different examples in each step, so expect close, not equal, values).

Both engines get hone's own tokenization (validate_data + tokenize_data: identical token ids and loss masks).
hone packs examples into rows of about `--batch-tokens` per micro-batch (its real loop, `train_loop`, is
called); the Trainer gets input_ids + labels (-100 where hone's weight is 0) padded to the longest example of
each batch (DataCollatorForSeq2Seq), with per_device_train_batch_size = hone's mean examples per step, so an
optimizer step covers about the same examples. Both use AdamW (the Trainer with its default implementation,
which users get), a constant learning rate without warm-up, gradient clipping at 1.0, dropout 0, and bf16
autocast only where hone's `use_bf16` says the device runs it fast (fp32 on CPUs without AVX512-BF16/AMX).
Neither saves checkpoints (Trainer: save_strategy="no"; hone's end-of-run checkpoint is stubbed out here).

Run it (minutes per engine on a CPU; a tiny random model for a quick check):

    python bench/throughput.py                              # embedded SmolLM2-135M, LoRA and full, 8 steps
    python bench/throughput.py --method lora --steps 4 --json bench.json
    python -m hone.models.tiny /tmp/tiny && python bench/throughput.py --model /tmp/tiny

It prints one table at the end and a "hone / Trainer" ratio line per method (above 1.0: hone is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parents[1] / "src" / "hone" / "demo_data" / "tickets_train.jsonl"
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="hone model.base: the embedded name or an HF dir")
    p.add_argument("--data", default=None, help=f"training file (default: hone's demo data {DEMO_DATA.name})")
    p.add_argument("--method", choices=["lora", "full", "both"], default="both")
    p.add_argument("--steps", type=int, default=8, help="measured optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="optimizer steps run first and not measured")
    p.add_argument("--batch-tokens", type=int, default=4096, help="hone's train.batch_tokens (tokens per step)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="data.max_seq_len for both")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--trainer-batch-size", type=int, default=None,
                   help="Trainer per_device_train_batch_size (default: hone's mean examples per step)")
    p.add_argument("--trainer-optim", default=None, help="TrainingArguments.optim (default: the Trainer's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    p.add_argument("--verbose", action="store_true", help="show the engines' own output as they run")
    p.add_argument("--worker", choices=["hone", "trainer"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data = str(Path(args.data or DEMO_DATA).resolve())
    if args.steps < 1 or args.warmup_steps < 0:
        p.error("--steps must be >= 1 and --warmup-steps >= 0")
    return args


# ---------------------------------------------------------------- shared by both engines (in a worker process)

def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_config(args, method: str, bf16: bool, output_dir: str):
    from hone.config import parse_config

    return parse_config({
        "method": method, "output_dir": output_dir, "name": f"bench-{method}",
        "model": {"base": args.model},
        "data": {"train": args.data, "max_seq_len": args.max_seq_len},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": args.warmup_steps + args.steps, "learning_rate": args.lr or DEFAULT_LR[method],
                  "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "constant",
                  "batch_tokens": args.batch_tokens, "grad_accum": 1, "max_grad_norm": 1.0,
                  "precision": "bf16" if bf16 else "fp32", "seed": args.seed, "log_every": 1,
                  "eval_every": 10**9, "save_every": 10**9},
        "eval": {"enabled": False},
    })


def prepare(args, method: str, output_dir: str) -> dict:
    """Model, tokenizer and hone's tokenized training set, exactly as `hone train` makes them."""
    import torch

    from hone.models.load import load_model
    from hone.train.device import pick_device, use_bf16
    from hone.methods.sft import packed_task
    from hone.train.loop import plan_batches
    from hone.train.prepare import tokenize_data, validate_data

    device = pick_device()
    bf16 = use_bf16(device, "auto")  # the same choice for both engines
    cfg = run_config(args, method, bf16, output_dir)
    data = validate_data(cfg.data, cfg.train.seed)
    start = time.perf_counter()
    loaded = load_model(cfg.model.base)
    load_seconds = time.perf_counter() - start
    prepared = tokenize_data(data, loaded.tokenizer, cfg.data, None)
    task = packed_task(prepared.train, [], cfg, loaded.tokenizer.pad_token_id)
    batches = plan_batches(task, cfg)  # what hone's loop will train on, step by step
    per_step = [sum(len(r) for r in b) for b in batches]
    torch.manual_seed(cfg.train.seed)
    return {"cfg": cfg, "model": loaded.model, "tokenizer": loaded.tokenizer, "train": prepared.train,
            "task": task, "batches": batches, "examples_per_step": per_step, "device": device,
            "bf16": bf16, "load_seconds": load_seconds, "rss_before_mib": None}


def common_result(args, engine: str, method: str, p: dict, model) -> dict:
    import torch

    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    out = {"engine": engine, "method": method, "model": args.model, "data": args.data,
           "device": str(p["device"]), "precision": "bf16" if p["bf16"] else "fp32",
           "threads": torch.get_num_threads(), "steps": args.steps, "warmup_steps": args.warmup_steps,
           "learning_rate": p["cfg"].train.learning_rate, "trainable_params": trainable,
           "load_seconds": round(p["load_seconds"], 2), "rss_before_train_mib": round(p["rss_before_mib"], 1),
           "peak_rss_mib": round(peak_rss_mib(), 1)}
    if p["device"].type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def summarize(seconds: float, tokens: list[int], loss_sums: list[float], targets: list[float]) -> dict:
    return {"seconds": round(seconds, 3), "tokens": sum(tokens), "tokens_per_step": sum(tokens) / len(tokens),
            "tokens_per_second": sum(tokens) / seconds if seconds > 0 else float("nan"),
            "loss": sum(loss_sums) / sum(targets) if sum(targets) else float("nan"),
            "target_tokens": sum(targets)}


# ---------------------------------------------------------------- hone: its real loop

def run_hone(args, method: str) -> dict:
    from rich.console import Console

    import hone.train.loop as loop
    from hone.models.adapters import apply_weights
    from hone.train.runlog import RunLog

    class TimedLog(RunLog):
        """Notes when the loop starts training and when each step's metrics are logged (log_every=1)."""

        def __init__(self, run_dir):
            super().__init__(run_dir, Console(stderr=True, quiet=not args.verbose))
            self.start, self.step_times, self.step_losses = None, [], []

        def event(self, level, message, **extra):
            if message.startswith("training:"):
                self.start = time.perf_counter()
            super().event(level, message, **extra)

        def metric(self, row):
            if row.get("split") == "train":
                self.step_times.append(time.perf_counter())
                self.step_losses.append(row["loss"])
            super().metric(row)

    with tempfile.TemporaryDirectory() as tmp:
        p = prepare(args, method, tmp)
        cfg = p["cfg"]
        model = apply_weights(p["model"], cfg)  # hone's own LoRA / full switch
        p["rss_before_mib"] = rss_mib()
        # The loop always checkpoints its last step; the Trainer here saves nothing (save_strategy="no").
        loop.save_checkpoint = lambda run_dir, step, *a, **k: Path(run_dir) / "checkpoints" / f"step-{step:06d}"
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        log = TimedLog(run_dir)
        result = loop.train_loop(model, p["task"], cfg, run_dir, log, show_progress=False)

    w, n = args.warmup_steps, args.steps
    micro = [p["task"].collate(rows) for rows in p["batches"]]
    tokens = [b.real_tokens for b in micro]
    assert sum(tokens) == result.tokens, (sum(tokens), result.tokens)
    targets = [b.target_weight for b in micro][w:w + n]
    t0 = log.step_times[w - 1] if w else log.start
    stats = summarize(log.step_times[w + n - 1] - t0, tokens[w:w + n],
                      [loss * t for loss, t in zip(log.step_losses[w:w + n], targets)], targets)
    examples = p["examples_per_step"][w:w + n]
    return {**common_result(args, "hone", method, p, model), **stats,
            "examples_per_step": sum(examples) / len(examples),
            "batch": f"packed {len(p['batches'][0])}x{p['task'].collate(p['batches'][0]).input_ids.shape[1]}", "optimizer": "torch AdamW",
            "padding_share": 1 - sum(tokens[w:w + n]) / sum(b.input_ids.numel() for b in micro[w:w + n])}


# ---------------------------------------------------------------- the peer: transformers.Trainer + peft

def trainer_dataset(train) -> list[dict]:
    """hone's tokens as Trainer rows: labels are the token itself where hone trains on it, else -100."""
    return [{"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids),
             "labels": [tok if w > 0 else -100 for tok, w in zip(t.input_ids, t.weights)]} for t in train]


def run_trainer(args, method: str) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    class Clock(TrainerCallback):
        def __init__(self):
            self.start, self.step_times = None, []

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.step_times.append(time.perf_counter())

    class CountingTrainer(Trainer):
        """The stock Trainer; it only notes each step's loss and token counts (tensors, no sync)."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.counts = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs["labels"][..., 1:].ne(-100).sum()
            real, padded = inputs["attention_mask"].sum(), inputs["input_ids"].numel()
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if return_outputs else out
            self.counts.append((loss.detach(), targets, real, padded))  # loss: mean over this step's targets
            return out

    with tempfile.TemporaryDirectory() as tmp:
        p = prepare(args, method, tmp)
        cfg, model = p["cfg"], p["model"]
        plan = p["examples_per_step"][:args.warmup_steps + args.steps]
        batch_size = args.trainer_batch_size or max(1, round(sum(plan) / len(plan)))
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
        else:
            for param in model.parameters():
                param.requires_grad_(True)
        extra = {"optim": args.trainer_optim} if args.trainer_optim else {}
        targs = TrainingArguments(
            output_dir=tmp, max_steps=args.warmup_steps + args.steps, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1, learning_rate=cfg.train.learning_rate, weight_decay=0.0,
            adam_beta1=cfg.train.betas[0], adam_beta2=cfg.train.betas[1], max_grad_norm=1.0,
            lr_scheduler_type="constant", warmup_steps=0, bf16=p["bf16"], use_cpu=p["device"].type == "cpu",
            report_to=[], save_strategy="no", eval_strategy="no", logging_steps=10**9,
            dataloader_num_workers=0, disable_tqdm=not args.verbose, seed=cfg.train.seed, **extra)
        clock = Clock()
        trainer = CountingTrainer(
            model=model, args=targs, train_dataset=trainer_dataset(p["train"]), callbacks=[clock],
            data_collator=DataCollatorForSeq2Seq(p["tokenizer"], padding="longest", label_pad_token_id=-100))
        p["rss_before_mib"] = rss_mib()
        trainer.train()

    w, n = args.warmup_steps, args.steps
    rows = [(float(loss), float(t), int(r), int(pad)) for loss, t, r, pad in trainer.counts][w:w + n]
    t0 = clock.step_times[w - 1] if w else clock.start
    stats = summarize(clock.step_times[w + n - 1] - t0, [r[2] for r in rows],
                      [r[0] * r[1] for r in rows], [r[1] for r in rows])
    return {**common_result(args, "Trainer", method, p, model), **stats, "examples_per_step": batch_size,
            "batch": f"padded, batch {batch_size}", "optimizer": str(targs.optim.value if hasattr(targs.optim, "value")
                                                                       else targs.optim),
            "padding_share": 1 - sum(r[2] for r in rows) / sum(r[3] for r in rows)}


# ---------------------------------------------------------------- the driver: one subprocess per engine

def forwarded(args) -> list[str]:
    out = ["--model", args.model, "--data", args.data, "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup_steps), "--batch-tokens", str(args.batch_tokens),
           "--max-seq-len", str(args.max_seq_len), "--seed", str(args.seed)]
    for flag, value in (("--lr", args.lr), ("--trainer-batch-size", args.trainer_batch_size),
                        ("--trainer-optim", args.trainer_optim)):
        if value is not None:
            out += [flag, str(value)]
    return out + (["--verbose"] if args.verbose else [])


def run_worker_process(args, engine: str, method: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--method", method,
               "--result", str(result_path), *forwarded(args)]
        print(f"running {engine} {method} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=not args.verbose, text=True)
        if proc.returncode != 0 or not result_path.is_file():
            tail = (proc.stderr or "")[-3000:] if not args.verbose else ""
            print(f"{engine} {method} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
            return {"engine": engine, "method": method, "error": f"exit {proc.returncode}"}
        result = json.loads(result_path.read_text())
        print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return result


def print_table(results: list[dict], args) -> None:
    ok = [r for r in results if "error" not in r]
    first = ok[0] if ok else {}
    print(f"\nhone vs transformers.Trainer + peft: model {args.model}, data {Path(args.data).name}, "
          f"device {first.get('device', '?')}, {first.get('precision', '?')}, {first.get('threads', '?')} threads")
    print(f"tokens/s = real (non-padding) tokens of {args.steps} measured optimizer steps (after "
          f"{args.warmup_steps} warm-up) / their wall seconds; loss = mean CE per target token over those steps;")
    print("peak RSS = ru_maxrss of the engine's own process (model load included)")
    gpu = any("peak_gpu_mib" in r for r in ok)
    header = (f"{'engine':<8} {'method':<6} {'batch':<22} {'examples/step':>13} {'tokens/step':>11} "
              f"{'pad':>5} {'tokens/s':>9} {'peak RSS MiB':>12}" + (f" {'peak GPU MiB':>12}" if gpu else "")
              + f" {'loss':>8}  optimizer")
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['engine']:<8} {r['method']:<6} FAILED ({r['error']})")
            continue
        print(f"{r['engine']:<8} {r['method']:<6} {r['batch']:<22} {r['examples_per_step']:>13.1f} "
              f"{r['tokens_per_step']:>11.0f} {r['padding_share']:>5.0%} {r['tokens_per_second']:>9.1f} "
              f"{r['peak_rss_mib']:>12.0f}" + (f" {r.get('peak_gpu_mib', float('nan')):>12.0f}" if gpu else "")
              + f" {r['loss']:>8.4f}  {r['optimizer']}")
    print()
    for method in ("lora", "full"):
        pair = {r["engine"]: r for r in ok if r["method"] == method}
        if "hone" in pair and "Trainer" in pair:
            h, t = pair["hone"], pair["Trainer"]
            mem = "peak_gpu_mib" if gpu else "peak_rss_mib"
            print(f"{method}: hone / Trainer  tokens/s {h['tokens_per_second'] / t['tokens_per_second']:.2f}x   "
                  f"{'peak GPU' if gpu else 'peak RSS'} {h[mem] / t[mem]:.2f}x   "
                  f"(loss {h['loss']:.4f} vs {t['loss']:.4f})")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = (run_hone if args.worker == "hone" else run_trainer)(args, args.method)
        Path(args.result).write_text(json.dumps(result, indent=2))
        return 0
    methods = ["lora", "full"] if args.method == "both" else [args.method]
    results = [run_worker_process(args, engine, method) for method in methods for engine in ("hone", "trainer")]
    print_table(results, args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                            if k not in ("worker", "result")},
                                                   "results": results}, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
