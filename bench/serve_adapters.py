"""Serving LoRA adapters: hone's engine (one base, adapters side by side, mixed batches) against naive
reloading (a fresh load_model of the run whenever the adapter changes, then generate() one request at a time).

Both serve the same requests (hone's demo support tickets as chat prompts, all arriving at once), greedy,
fp32, with the same token budget; the greedy texts must agree request by request (printed as `same`).
Two workloads: every request for one adapter, and requests cycling over three adapters (A, B, C, A, ...).
Figures: requests/s and generated tokens/s over the whole workload, and per-request latency (arrival to
last token; queueing included) p50 and p95. `hone, batch 1` is the engine with batching off: what the
shared base alone buys, apart from batching.

The adapters are LoRA r=16 on every linear layer with random weights over the embedded SmolLM2-135M (the
compute of a trained adapter; their texts are not meant to be good).

    flock /tmp/hone-heavy.lock nice -n 19 .venv/bin/python bench/serve_adapters.py          # ~5 min, 2 cores
    .venv/bin/python bench/serve_adapters.py --model /tmp/tiny --requests 8 --max-tokens 8  # a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hone.data.template import ensure_chat_template, render_prompt  # noqa: E402
from hone.eval.runners import stop_token_ids  # noqa: E402
from hone.models.load import load_model  # noqa: E402
from hone.records import Message  # noqa: E402
from hone.serve.engine import GenerationRequest, InferenceEngine  # noqa: E402

DEMO = ROOT / "src" / "hone" / "demo_data" / "tickets_test.jsonl"


def make_adapters(base: str, out: Path, names: list[str]) -> list[str]:
    """Run directories (config.yaml + final/ LoRA adapter) over `base`, made once and reused."""
    from peft import LoraConfig, get_peft_model

    runs = [out / f"run-{n}" for n in names]
    if all((r / "final" / "adapter_config.json").is_file() for r in runs):
        return [str(r) for r in runs]
    model = load_model(base).model
    for seed, run in enumerate(runs):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                      init_lora_weights=False))
        with torch.no_grad():  # small enough that answers stay text-like, large enough to change them
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        (run / "final").mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(run / "final")
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"base": base}}))
        model = peft_model.unload()
    return [str(r) for r in runs]


def workload(runs: list[str], n: int) -> list[tuple[str, list[dict]]]:
    rows = [json.loads(x) for x in DEMO.read_text().splitlines()[:n]]
    return [(runs[i % len(runs)], [{"role": "user", "content": r["text"]}]) for i, r in enumerate(rows)]


def summary(name: str, seconds: float, latencies: list[float], tokens: int, loads: int) -> dict:
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"system": name, "seconds": seconds, "requests_per_s": len(latencies) / seconds,
            "tokens_per_s": tokens / seconds, "p50_s": statistics.median(latencies), "p95_s": q[18],
            "loads": loads}


def run_engine(work, max_tokens: int, batch: int) -> tuple[dict, list[str]]:
    engine = InferenceEngine(max_batch_size=batch, max_adapters=4, batch_window_s=0.01)
    t0 = time.perf_counter()
    pending = [engine.submit(GenerationRequest(model=run, messages=msgs, max_tokens=max_tokens))
               for run, msgs in work]
    results = [p.result(600) for p in pending]
    done_at = [p.finished_at for p in pending]
    seconds = time.perf_counter() - t0
    stats = engine.stats()
    engine.close()
    tokens = sum(r.completion_tokens for r in results)
    name = f"hone engine, batch {batch}"
    return (summary(name, seconds, [t - t0 for t in done_at], tokens,
                    stats["model_loads"] + stats["adapter_loads"]) | {"max_batch": stats["max_batch"]},
            [r.text for r in results])


def run_naive(work, max_tokens: int) -> tuple[dict, list[str]]:
    """Serve in arrival order; whenever the adapter changes, load the run afresh (base + adapter)."""
    t0 = time.perf_counter()
    current, loaded, loads, latencies, texts, tokens = None, None, 0, [], [], 0
    for run, msgs in work:
        if run != current:
            loaded, current = None, run
            loaded = load_model(run)
            loads += 1
        tok = loaded.tokenizer
        ensure_chat_template(tok)
        ids = render_prompt(tok, [Message(**m) for m in msgs])
        with torch.inference_mode():
            out = loaded.model.generate(input_ids=torch.tensor([ids]),
                                        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=max_tokens, do_sample=False,
                                        eos_token_id=stop_token_ids(loaded.model, tok), pad_token_id=tok.pad_token_id)
        new = out[0, len(ids):].tolist()
        tokens += len(new)
        texts.append(tok.decode([t for t in new if t not in stop_token_ids(loaded.model, tok)],
                                skip_special_tokens=True))
        latencies.append(time.perf_counter() - t0)
    return summary("naive reload", time.perf_counter() - t0, latencies, tokens, loads), texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/engine/serve-bench"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = make_adapters(args.model, args.out / "adapters", ["a", "b", "c"])
    # Warm-up for every system alike: imports, the one-time GGUF conversion, the page cache, a first generate().
    warm = load_model(runs[0])
    warm.model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    del warm
    rows = []
    for label, pool in (("1 adapter", runs[:1]), ("3 adapters", runs)):
        work = workload(pool, args.requests)
        naive, naive_texts = run_naive(work, args.max_tokens)
        for batch in (args.batch, 1):
            ours, texts = run_engine(work, args.max_tokens, batch)
            ours["same"] = sum(a == b for a, b in zip(texts, naive_texts))
            rows.append({"workload": label, **ours})
        rows.append({"workload": label, **naive, "same": len(naive_texts)})
        print(f"{label}: done", file=sys.stderr)
    print_table(rows, args)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


def print_table(rows: list[dict], args) -> None:
    print(f"\n{args.requests} requests, {args.max_tokens} new tokens max, greedy fp32, {args.threads} threads, "
          f"model {args.model}")
    print("| workload | system | req/s | tokens/s | p50 latency s | p95 latency s | loads | same text |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['system']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['loads']} | {r['same']}/{args.requests} |")
    by = {(r["workload"], r["system"]): r for r in rows}
    for label in ("1 adapter", "3 adapters"):
        ours, naive = by.get((label, f"hone engine, batch {args.batch}")), by.get((label, "naive reload"))
        if ours and naive:
            print(f"{label}: hone {ours['requests_per_s'] / naive['requests_per_s']:.1f}x the requests/s of "
                  "naive reloading")


if __name__ == "__main__":
    main()
