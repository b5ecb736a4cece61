"""Prove an export behaves like the model it came from.

The export is reloaded by the ecosystem's own loader (transformers, peft, transformers' GGUF reader) into a
fresh model object, then compared with the trained model as hone loads it (`load_model(run_dir)`) on a fixed
prompt set:

- template: each prompt rendered with the export's own tokenizer and chat template gives the same token ids
  as the run's tokenizer and template (a lost or changed template shows here);
- logits: next-token logits at every position of prompt + the reference answer, max |difference| relative to
  the logit scale (max |reference logit|), and how often the top-1 token agrees, within the format's
  tolerance (TOLERANCES);
- generation: greedy answers, the export using only its own stop settings (generation_config / GGUF eos),
  must be identical for the lossless formats; for quantised GGUF the agreement is reported;
- stop: the export's stop ids include the chat template's end-of-turn token, and no export answer runs past
  a stop token the trained model stops on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hone.data.template import ensure_chat_template, render_prompt
from hone.export.chat import ExportError, end_of_turn_token
from hone.records import Message

# Generic prompts every export is checked on; the run's own held-out prompts are added (chat.held_out_prompts).
DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write one short sentence about the sea.",
    "My order arrived damaged. What should I do?",
    "Translate to French: good morning",
    "List three colours.",
    "Reply with the single word yes.",
]

# Per format (and GGUF type): the largest max |logit difference| / logit scale, the lowest top-1 agreement,
# and whether greedy answers must be identical. Lossless formats are held to float32 round-off. Lossy GGUF
# types, measured on the embedded SmolLM2 LoRA run (notes/export.md): f16 1.7e-3 / top-1 1.0, q8_0 4.3e-2 /
# 0.984; bounds set with margin (bf16 is not measured on it: f16's bound scaled by bf16's 8x coarser mantissa). Unlisted GGUF types (q5_*, q4_*) are checked only for template and stop behaviour; their logit
# figures are reported.
TOLERANCES = {
    "hf": (1e-4, 0.999, True), "peft": (1e-4, 0.999, True), "f32": (1e-4, 0.999, True),
    "bf16": (0.05, 0.90, False), "f16": (0.01, 0.97, False), "q8_0": (0.1, 0.95, False),
}
LOSSY_UNCHECKED = (float("inf"), 0.0, False)


@dataclass
class Side:
    """One model to compare: its tokenizer renders the prompts; `eos` are the ids its generation stops on
    (for the export: exactly what its own loaded config says)."""
    model: torch.nn.Module
    tokenizer: object
    eos: list[int]
    pad_id: int | None = None
    notes: dict = field(default_factory=dict)


def tolerance(fmt: str, quant: str | None) -> tuple[float, float, bool]:
    key = fmt if fmt in ("hf", "peft") else quant
    return TOLERANCES.get(key, LOSSY_UNCHECKED)


def load_prompts(path: str | Path) -> list[list[Message]]:
    """--prompts FILE: .txt (one prompt a line) or .jsonl ({"messages": [...]}, whose last assistant
    message and anything after it is dropped, or {"prompt": "..."})."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--prompts {path}: no such file")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append([Message("user", line.strip())])
            continue
        try:
            row = json.loads(line)
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            msgs = [Message(m["role"], m["content"]) for m in messages]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ExportError(f"{path}:{n}: expected {{\"messages\": [...]}} or {{\"prompt\": \"...\"}} ({e})")
        while msgs and msgs[-1].role == "assistant":
            msgs.pop()
        if not msgs:
            raise ExportError(f"{path}:{n}: no prompt before the assistant message")
        prompts.append(msgs)
    if not prompts:
        raise ExportError(f"--prompts {path}: no prompts in the file")
    return prompts


def default_prompts(held_out: list[list[Message]]) -> list[list[Message]]:
    return [[Message("user", p)] for p in DEFAULT_PROMPTS] + held_out


def greedy(side: Side, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = side.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=side.eos,
                                  pad_token_id=side.pad_id if side.pad_id is not None else side.eos[0])
    return out[0, len(ids):].tolist()


def logits(side: Side, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return side.model(input_ids=torch.tensor([ids])).logits[0].float()


def compare(reference: Side, export: Side, prompts: list[list[Message]], *, fmt: str, quant: str | None,
            max_new_tokens: int = 32) -> dict:
    """The parity result (what parity.json holds); result["passed"] says whether it is within tolerance."""
    start = time.perf_counter()
    ensure_chat_template(reference.tokenizer)
    eot = end_of_turn_token(reference.tokenizer)
    eot_id = reference.tokenizer.convert_tokens_to_ids(eot) if eot else None
    rows = [_compare_one(reference, export, p, max_new_tokens) for p in prompts]
    diffs = torch.tensor([r["max_abs"] for r in rows])
    scale = max(r["scale"] for r in rows)
    positions = sum(r["positions"] for r in rows)
    agree = sum(r["top1_same"] for r in rows) / max(1, positions)
    max_rel, min_top1, exact = tolerance(fmt, quant)
    result = {
        "format": fmt, "quant": quant,
        "tolerance": {"max_rel_logit_diff": max_rel if max_rel != float("inf") else None,
                      "min_top1_agreement": min_top1, "identical_generations_required": exact},
        "prompts": len(rows), "positions": positions,
        "logits": {"max_abs_diff": float(diffs.max()), "logit_scale": scale,
                   "max_rel_diff": float(diffs.max()) / scale if scale else 0.0,
                   "mean_abs_diff": sum(r["sum_abs"] for r in rows) / max(1, positions * rows[0]["vocab"]),
                   "top1_agreement": agree},
        "template": {"identical_prompts": sum(r["same_ids"] for r in rows), "of": len(rows)},
        "generation": {"identical": sum(r["same_gen"] for r in rows), "of": len(rows),
                       "max_new_tokens": max_new_tokens},
        "stop": {"end_of_turn": eot, "end_of_turn_id": eot_id, "reference_stop_ids": reference.eos,
                 "export_stop_ids": export.eos, "reference_stopped": sum(r["ref_stopped"] for r in rows),
                 "export_stopped_same": sum(r["stopped_same"] for r in rows),
                 "export_ran_past_stop": sum(r["ran_past"] for r in rows)},
        "examples": [r["example"] for r in rows[:8]],
        "seconds": time.perf_counter() - start,
    }
    result["failures"] = failures(result, eot_id, exact)
    result["passed"] = not result["failures"]
    return result


def _compare_one(reference: Side, export: Side, messages: list[Message], max_new_tokens: int) -> dict:
    ref_ids = render_prompt(reference.tokenizer, messages)
    exp_ids = _render_export(export.tokenizer, messages)
    ref_gen = greedy(reference, ref_ids, max_new_tokens)
    exp_gen = greedy(export, exp_ids, max_new_tokens)
    seq = ref_ids + ref_gen
    a, b = logits(reference, seq), logits(export, seq)
    if a.shape != b.shape:
        raise ExportError(f"the export's logits have shape {tuple(b.shape)}, the run's {tuple(a.shape)}")
    diff = (a - b).abs()
    ref_stop = bool(ref_gen) and ref_gen[-1] in reference.eos
    stops_in_exp = [i for i, t in enumerate(exp_gen) if t in reference.eos]
    return {
        "same_ids": ref_ids == exp_ids, "same_gen": ref_gen == exp_gen,
        "max_abs": float(diff.max()), "sum_abs": float(diff.sum()), "scale": float(a.abs().max()),
        "positions": a.shape[0], "vocab": a.shape[1], "top1_same": int((a.argmax(-1) == b.argmax(-1)).sum()),
        "ref_stopped": ref_stop, "stopped_same": ref_stop and exp_gen == ref_gen,
        # An answer that goes on after a token the trained model stops on: the classic "never stops" export.
        "ran_past": bool(stops_in_exp) and stops_in_exp[0] != len(exp_gen) - 1,
        "example": {"prompt": messages[-1].content[:200],
                    "reference": reference.tokenizer.decode(ref_gen, skip_special_tokens=False),
                    "export": export.tokenizer.decode(exp_gen, skip_special_tokens=False)},
    }


def _render_export(tokenizer, messages: list[Message]) -> list[int]:
    """The prompt as a user of the export renders it: its own chat template, no hone fallback."""
    if not getattr(tokenizer, "chat_template", None):
        return []  # no template travelled with the export: counted as a template mismatch
    text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def failures(result: dict, eot_id: int | None, exact: bool) -> list[str]:
    out = []
    t, lg, tol = result["template"], result["logits"], result["tolerance"]
    if t["identical_prompts"] < t["of"]:
        out.append(f"chat template: {t['of'] - t['identical_prompts']} of {t['of']} prompts render to different "
                   "token ids with the export's tokenizer and template")
    if tol["max_rel_logit_diff"] is not None and lg["max_rel_diff"] > tol["max_rel_logit_diff"]:
        out.append(f"logits: max |diff| / scale = {lg['max_rel_diff']:.2e} > {tol['max_rel_logit_diff']:.0e}")
    if lg["top1_agreement"] < tol["min_top1_agreement"]:
        out.append(f"logits: top-1 agreement {lg['top1_agreement']:.4f} < {tol['min_top1_agreement']}")
    g = result["generation"]
    if exact and g["identical"] < g["of"]:
        out.append(f"generation: {g['of'] - g['identical']} of {g['of']} greedy answers differ")
    s = result["stop"]
    if eot_id is not None and eot_id not in s["export_stop_ids"]:
        out.append(f"stop: the export stops on ids {s['export_stop_ids']}, not on the chat template's end-of-turn "
                   f"token {s['end_of_turn']!r} (id {eot_id}): its answers would not end")
    if s["export_ran_past_stop"]:
        out.append(f"stop: {s['export_ran_past_stop']} export answers run on past a stop token")
    return out
