"""`hone data card FILE`: a dataset card — what is in a data file, and what training on it will cost.

The card counts records per shape and label, measures every record's length in tokens under the chosen
model's tokenizer and chat template (the lengths `hone train` will see), counts exact and near duplicates
and PII, and estimates training tokens and time per epoch. It writes card.md, card.json and PNG plots.

Records are streamed in batches, so a large file costs time, not memory. Near-duplicate and PII scans are
the slow part; they look at the first `scan_limit` records and the card says so when it stops early.

    hone data card data/train.jsonl --model smollm2-135m-instruct --out data/train.card
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hone.config import EMBEDDED_MODEL, DataConfig
from hone.data.readers import read_rows
from hone.data.stage import content_hash, write_json_atomic
from hone.records import Problem

_BATCH = 1000
# Fraction of the machine's measured matmul rate that training reaches (model FLOPs utilisation),
# calibrated by bench/throughput.py: the embedded model trains LoRA at ~160 tokens/s on a 2-core CPU
# measuring ~150 GFLOP/s here (0.57); HF+peft reach ~81k tokens/s for the same model on an H100 (~0.1 of
# its measured dense rate: small models leave a GPU mostly idle).
_MFU = {"cpu": 0.55, "cuda": 0.1}


class CardOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(EMBEDDED_MODEL, description="Model whose tokenizer and size the estimates use.")
    method: Literal["lora", "full"] = Field("lora", description="Training method the time estimate is for.")
    max_seq_len: int = Field(1024, ge=16, description="Longer examples are counted as truncated to this.")
    instruction: str = Field(DataConfig.model_fields["instruction"].default,
                             description="System instruction rendered for text+label records.")
    tokens_per_second: float | None = Field(None, gt=0, description=(
        "Measured training speed (e.g. from bench/throughput.py); without it the speed is estimated."))
    scan_limit: int = Field(20000, ge=0, description="Scan at most this many records for near duplicates and PII.")


def card(inputs: list[Path], out_dir: Path, options: CardOptions) -> dict:
    """Write the card files into `out_dir` and return the card as a dict."""
    from hone.data.template import ensure_chat_template
    from hone.models.load import load_tokenizer

    started = time.perf_counter()
    tokenizer, n_params = load_tokenizer(options.model)
    ensure_chat_template(tokenizer)
    labels = _label_set(inputs)
    stats = _Stats()
    for path in inputs:
        for batch in _batches(read_rows(path)):
            _measure_batch(batch, str(path), tokenizer, labels, options, stats)
    info = _summary(inputs, stats, labels, n_params, options)
    info["near_duplicates"], info["pii"] = _scans(inputs, options.scan_limit)
    info["seconds"] = round(time.perf_counter() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    info["plots"] = _plots(stats, info, out_dir, options.max_seq_len)
    write_json_atomic(out_dir / "card.json", info)
    (out_dir / "card.md").write_text(render_markdown(info), encoding="utf-8")
    return info


class _Stats:
    def __init__(self):
        self.rows = 0
        self.problems: Counter[str] = Counter()
        self.shapes: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.lengths: list[int] = []
        self.targets = 0
        self.exact_seen: set[bytes] = set()
        self.exact_duplicates = 0


def _label_set(inputs: list[Path]) -> list[str]:
    """The sorted labels of text+label rows: the system prompt lists them, so lengths depend on them."""
    found = set()
    for path in inputs:
        for _, row in read_rows(path):
            if isinstance(row, dict) and row.get("label") is not None and row.get("text") is not None:
                found.add(str(row["label"]).strip())
    return sorted(found)


def _batches(rows, size: int = _BATCH):
    batch = []
    for item in rows:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _measure_batch(batch, source: str, tokenizer, labels, options: CardOptions, stats: _Stats) -> None:
    from hone.data.dedup import exact_key, record_key_text
    from hone.data.template import render_with_loss_mask
    from hone.data.validate import validate_rows

    shaped = []
    for line, row in batch:
        stats.rows += 1
        if isinstance(row, Problem):
            stats.problems[row.code] += 1
            continue
        key = exact_key(record_key_text(row))  # the same test `hone data dedup` applies
        if key in stats.exact_seen:
            stats.exact_duplicates += 1
        stats.exact_seen.add(key)
        if _is_document(row):
            stats.shapes["document"] += 1
            stats.lengths.append(len(tokenizer(row["text"])["input_ids"]))
        elif _is_preference(row):
            stats.shapes["preference"] += 1
            prompt = len(tokenizer(row["prompt"])["input_ids"])
            stats.lengths.append(prompt + max(len(tokenizer(row[k])["input_ids"]) for k in ("chosen", "rejected")))
        else:
            shaped.append((line, row))
    report = validate_rows(shaped, source, instruction=options.instruction, labels=labels or None, dedupe=False)
    for p in report.problems:
        stats.problems[p.code] += 1
    for conv in report.records:
        stats.shapes[conv.shape] += 1
        if conv.label is not None:
            stats.labels[conv.label] += 1
        tok = render_with_loss_mask(tokenizer, conv, loss_on="assistant")
        stats.lengths.append(len(tok.input_ids))
        stats.targets += tok.n_targets


def _is_document(row: dict) -> bool:
    return isinstance(row.get("text"), str) and row.get("label") is None and "messages" not in row


def _is_preference(row: dict) -> bool:
    return all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected"))


def _summary(inputs, stats: _Stats, labels, n_params: int, options: CardOptions) -> dict:
    lengths = np.array(stats.lengths or [0])
    clipped = np.minimum(lengths, options.max_seq_len)
    epoch_tokens = int(clipped.sum()) if stats.lengths else 0
    speed, how = _speed(n_params, options)
    return {
        "files": [{"path": str(p), "sha256": content_hash(p)} for p in inputs],
        "model": options.model, "parameters": n_params,
        "records": {"read": stats.rows, "usable": len(stats.lengths),
                    "problems": sum(stats.problems.values()), "problems_by_code": dict(stats.problems)},
        "shapes": dict(stats.shapes),
        "labels": dict(sorted(stats.labels.items(), key=lambda kv: -kv[1])),
        "tokens": {"total": int(lengths.sum()) if stats.lengths else 0, "target": stats.targets,
                   "mean": round(float(lengths.mean()), 1),
                   **{f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)},
                   "max": int(lengths.max()), "over_max_seq_len": int((lengths > options.max_seq_len).sum()),
                   "max_seq_len": options.max_seq_len},
        "exact_duplicates": stats.exact_duplicates,
        "estimate": {"method": options.method, "tokens_per_epoch": epoch_tokens,
                     "tokens_per_second": round(speed, 1), "speed_from": how,
                     "seconds_per_epoch": round(epoch_tokens / speed, 1) if speed else None},
    }


def _speed(n_params: int, options: CardOptions) -> tuple[float, str]:
    """Training tokens/s: the user's measurement, or FLOPs per token against this machine's matmul rate."""
    if options.tokens_per_second:
        return options.tokens_per_second, "given"
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gflops = matmul_gflops(device)
    # Full fine-tuning: forward 2N + backward 4N FLOPs per token; LoRA skips the weight gradients (2N).
    flops_per_token = (6 if options.method == "full" else 4) * n_params
    speed = gflops * 1e9 * _MFU[device] / flops_per_token
    return speed, f"estimated: {gflops:.0f} GFLOP/s measured on {device} x {_MFU[device]} utilisation"


def matmul_gflops(device: str = "cpu", n: int = 1024, seconds: float = 0.5) -> float:
    """This machine's dense fp32 matmul rate, measured for half a second."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def _scans(inputs: list[Path], limit: int) -> tuple[dict, dict]:
    """Near duplicates (MinHash LSH, as `hone data dedup`) and PII (as `hone data redact`) in the first
    `limit` records."""
    from hone.data.dedup import count_near_duplicates
    from hone.data.redact import count_pii

    records = []
    for path in inputs:
        for _, row in read_rows(path):
            if len(records) >= limit:
                break
            if isinstance(row, dict):
                records.append(row)
    scanned = {"scanned": len(records), "complete": len(records) < limit or limit == 0}
    return {**scanned, **count_near_duplicates(records)}, {**scanned, **count_pii(records)}


def _plots(stats: _Stats, info: dict, out_dir: Path, max_seq_len: int) -> list[str]:
    from hone.eval.report import _figure

    made = []
    if stats.lengths:
        fig = _figure(7, 3.2)
        ax = fig.subplots()
        ax.hist(stats.lengths, bins=min(60, max(10, len(set(stats.lengths)))), color="#4c72b0")
        for q, style in (("p50", ":"), ("p90", "--"), ("p99", "-.")):
            ax.axvline(info["tokens"][q], color="#333", linestyle=style, label=f"{q} {info['tokens'][q]}")
        if max(stats.lengths) > max_seq_len * 0.8:
            ax.axvline(max_seq_len, color="#c44e52", label=f"max_seq_len {max_seq_len}")
        ax.set_xlabel(f"tokens per example ({info['model']} tokenizer, chat template applied)")
        ax.set_ylabel("examples")
        ax.legend(fontsize=8)
        fig.savefig(out_dir / "token_lengths.png", dpi=110)
        made.append("token_lengths.png")
    if stats.labels:
        names = [k for k, _ in stats.labels.most_common(40)]
        fig = _figure(7, max(2.2, 0.28 * len(names) + 0.8))
        ax = fig.subplots()
        ax.barh(names[::-1], [stats.labels[n] for n in names[::-1]], color="#55a868")
        ax.set_xlabel("examples")
        fig.savefig(out_dir / "labels.png", dpi=110)
        made.append("labels.png")
    return made


def _counts(found: dict) -> str:
    items = [f"{k.replace('_', ' ')} {v}" for k, v in found.items() if k not in ("scanned", "complete")]
    return ", ".join(items) or "none"


def render_markdown(info: dict) -> str:
    t, r, e = info["tokens"], info["records"], info["estimate"]
    lines = [f"# Dataset card: {', '.join(Path(f['path']).name for f in info['files'])}", "",
             f"- records: {r['read']} read, {r['usable']} usable, {r['problems']} with problems"
             + (f" ({', '.join(f'{k} {v}' for k, v in r['problems_by_code'].items())})" if r["problems"] else ""),
             f"- shapes: {', '.join(f'{k} {v}' for k, v in info['shapes'].items()) or 'none'}",
             f"- tokens ({info['model']}, chat template applied): total {t['total']:,}, trained-on {t['target']:,}; "
             f"per example mean {t['mean']}, p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}; "
             f"{t['over_max_seq_len']} over max_seq_len {t['max_seq_len']}",
             f"- exact duplicates: {info['exact_duplicates']}"]
    nd, pii = info["near_duplicates"], info["pii"]
    scope = "" if nd["complete"] else f" (first {nd['scanned']} records)"
    lines.append(f"- duplicates as `hone data dedup` finds them{scope}: {_counts(nd)}")
    lines.append(f"- PII as `hone data redact` finds it{scope}: {_counts(pii)}")
    minutes = e["seconds_per_epoch"] / 60 if e["seconds_per_epoch"] else None
    lines.append(f"- one epoch ({e['method']}, {info['parameters'] / 1e6:.1f}M parameters): {e['tokens_per_epoch']:,} "
                 f"tokens, ~{e['tokens_per_second']:,.0f} tokens/s ({e['speed_from']})"
                 + (f", ~{minutes:.1f} min" if minutes is not None else ""))
    if info["labels"]:
        lines += ["", "| label | examples |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in info["labels"].items()]
    lines += [""] + [f"![{p}]({p})" for p in info.get("plots", [])]
    return "\n".join(lines) + "\n"
