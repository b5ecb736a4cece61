"""Run a model over held-out conversations: batched greedy generation, then task metrics.

Base and tuned models get the same prompts (the conversation up to its last assistant message, rendered
with the chat template) and the same decoding, so their numbers are comparable.
"""

from __future__ import annotations

import time

import torch

from hone.data.template import ensure_chat_template, render_prompt
from hone.eval.metrics import classification_metrics, generation_metrics, match_label
from hone.records import Conversation, Message
from hone.train.device import autocast


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def generate(model, tokenizer, prompts: list[list[Message]], *, max_new_tokens: int = 64,
             batch_size: int = 16, bf16: bool = False) -> list[str]:
    """Greedy answers for each prompt (a message list), in input order."""
    ensure_chat_template(tokenizer)
    device = next(model.parameters()).device
    encoded = [render_prompt(tokenizer, p) for p in prompts]
    # Similar lengths together: less left padding per batch.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    pad_id = tokenizer.pad_token_id
    stops = stop_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        with torch.no_grad(), autocast(device, bf16):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=pad_id)
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return answers


def evaluate_task(model, tokenizer, conversations: list[Conversation], labels: list[str] | None, *,
                  max_new_tokens: int = 64, batch_size: int = 16, bf16: bool = False) -> dict:
    """Metrics and outputs for one model on held-out conversations.

    Label tasks (every record has a label) score the answer mapped onto the label set: accuracy, macro-F1,
    per-class figures and a confusion table. Other tasks score exact match and token F1 against the reference.
    """
    start = time.perf_counter()
    outputs = generate(model, tokenizer, [c.prompt_messages() for c in conversations],
                       max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf16)
    seconds = time.perf_counter() - start
    refs = [c.reference() for c in conversations]
    metrics = generation_metrics(outputs, refs)
    result = {"task": "generation", "outputs": outputs, "confusion": None}
    if labels and all(c.label is not None for c in conversations):
        cls = classification_metrics([match_label(o, labels) for o in outputs],
                                     [c.label for c in conversations], labels)
        metrics = {"accuracy": cls["accuracy"], "macro_f1": cls["macro_f1"], **metrics,
                   "invalid": cls["invalid"]}
        result.update(task="label", confusion=cls["confusion"], per_class=cls["per_class"])
    metrics["seconds"] = seconds
    metrics["seconds_per_example"] = seconds / max(1, len(conversations))
    result["metrics"] = metrics
    result["n"] = len(conversations)
    return result
