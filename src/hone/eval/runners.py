"""Run a model over held-out conversations: batched greedy generation, then task metrics.

Base and tuned models get the same prompts (the conversation up to its last assistant message, rendered
with the chat template) and the same decoding, so their numbers are comparable.
"""

from __future__ import annotations

import math
import time

import torch

from hone.data.template import TemplateError, _render, ensure_chat_template, render_prompt
from hone.eval.analysis import analyse
from hone.eval.metrics import (AUTO_METRICS, CALIBRATION_METRICS, LABEL_METRICS, TASK_METRICS, TASK_PRIMARY, calibration_metrics,
                               classification_metrics, match_label, text_metrics, token_f1)
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


def _padding_shifts_positions(model) -> bool:
    """peft's prompt tuning counts positions from the first virtual token through any left padding, so a
    padded prompt would sit a few positions later than it did in training (prefix tuning is exact)."""
    config = getattr(model, "active_peft_config", None)
    return str(getattr(config, "peft_type", "")).endswith("PROMPT_TUNING")


def prompt_batches(order: list[int], lengths: list[int], batch_size: int, equal_lengths: bool) -> list[list[int]]:
    """Batches of prompt indices in `order` (sorted by length); with `equal_lengths`, a batch never mixes
    lengths, so no prompt is padded."""
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (
                not equal_lengths or lengths[batches[-1][0]] == lengths[i]):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def generate(model, tokenizer, prompts: list[list[Message]], *, max_new_tokens: int = 64,
             batch_size: int = 16, bf16: bool = False, token_counts: list | None = None) -> list[str]:
    """Greedy answers for each prompt (a message list), in input order.

    ``token_counts``, when given a list, is filled in input order with (prompt tokens, generated tokens) per
    prompt: what a per-token price is charged on (generated tokens count the stop token, not the padding).
    """
    ensure_chat_template(tokenizer)
    device = next(model.parameters()).device
    encoded = [render_prompt(tokenizer, p) for p in prompts]
    # Similar lengths together: less left padding per batch.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    generated = [0] * len(encoded)
    pad_id = tokenizer.pad_token_id
    stops = stop_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    for idx in prompt_batches(order, [len(e) for e in encoded], batch_size, _padding_shifts_positions(model)):
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
            generated[i] = _generated_length(out[row, width:].tolist(), stops)
    model.train(was_training)
    if token_counts is not None:
        token_counts[:] = [(len(e), g) for e, g in zip(encoded, generated)]
    return answers


def _generated_length(new_ids: list[int], stops: list[int]) -> int:
    """Tokens a model generated: through the first stop token (the rest of the row is padding)."""
    for n, token in enumerate(new_ids, 1):
        if token in stops:
            return n
    return len(new_ids)


def evaluate_task(model, tokenizer, conversations: list[Conversation], labels: list[str] | None, *,
                  max_new_tokens: int = 64, batch_size: int = 16, bf16: bool = False, task: str = "auto",
                  metric_names: list[str] | None = None, calibration_bins: int = 10) -> dict:
    """Metrics and outputs for one model on held-out conversations.

    ``task`` (classification | extraction | generation | qa | auto) picks the default metric set
    (metrics.TASK_METRICS; ``metric_names`` overrides it). Classification (auto: every record has a label)
    scores the answer mapped onto the label set: accuracy, macro/micro averages, per-class figures, a
    confusion table, and from the model's scores over the label set ECE, Brier and prob_accuracy (not under
    auto, which keeps today's cost: that scoring pass runs every label through the model). Other tasks
    score text overlap with the reference. ``per_example`` and ``analysis`` (worst examples, slices by label
    and input length) come with the result.
    """
    kind = resolve_task(task, conversations, labels)
    wanted = list(metric_names or (AUTO_METRICS if task == "auto" else TASK_METRICS)[kind])
    start = time.perf_counter()
    counts: list[tuple[int, int]] = []
    outputs = generate(model, tokenizer, [c.prompt_messages() for c in conversations],
                       max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf16, token_counts=counts)
    seconds = time.perf_counter() - start
    refs = [c.reference() for c in conversations]
    metrics = text_metrics(outputs, refs, wanted)
    result = {"task": "generation", "task_type": kind, "outputs": outputs, "confusion": None}
    if kind == "classification":
        scores, extra = score_labels(model, tokenizer, conversations, labels, outputs, wanted,
                                     batch_size=batch_size, bf16=bf16, bins=calibration_bins)
        result.update(extra)
        metrics = {**scores, **metrics}
    metrics = {**{k: metrics[k] for k in wanted if k in metrics}, **metrics}  # in the order asked for
    metrics["seconds"] = seconds
    metrics["seconds_per_example"] = seconds / max(1, len(conversations))
    # Per request, for cost: batched wall time / requests is the amortised latency at this batch size.
    metrics["prompt_tokens_per_request"] = sum(p for p, _ in counts) / max(1, len(counts))
    metrics["output_tokens_per_request"] = sum(g for _, g in counts) / max(1, len(counts))
    metrics["latency_per_request"] = metrics["seconds_per_example"]
    result["metrics"] = metrics
    result["n"] = len(conversations)
    result["primary"] = next((k for k in [TASK_PRIMARY[kind], *wanted] if k in metrics), None)
    result["per_example"] = per_example_rows(tokenizer, conversations, result)
    result["analysis"] = analyse(result)
    return result


# --- task kinds, label scores, per-example rows ------------------------------------------------

TASK_KINDS = ("auto", "classification", "extraction", "generation", "qa")


def resolve_task(task: str, conversations: list[Conversation], labels: list[str] | None) -> str:
    """The task kind to score: ``auto`` is classification when there is a label set and every record has a
    label, else qa (exact match and token F1). A label task without labels is a user error."""
    if task not in TASK_KINDS:
        raise ValueError(f"eval.task: unknown task {task!r}; use one of {', '.join(TASK_KINDS)}")
    has_labels = bool(labels) and all(c.label is not None for c in conversations)
    if task == "auto":
        return "classification" if has_labels else "qa"
    if task == "classification" and not has_labels:
        missing = sum(c.label is None for c in conversations)
        raise ValueError(f"eval.task: classification needs a label on every held-out record and a label set; "
                         f"{missing} of {len(conversations)} records have no label. Use text+label data, or "
                         "eval.task: qa / extraction / generation.")
    return task


def score_labels(model, tokenizer, conversations, labels, outputs, wanted, *, batch_size, bf16, bins):
    """(label metrics, result fields) for a classification task: answers mapped onto the label set, and,
    when a calibration metric is wanted, the model's probability of each label for every prompt."""
    preds = [match_label(o, labels) for o in outputs]
    golds = [c.label for c in conversations]
    cls = classification_metrics(preds, golds, labels)
    scores = {k: cls[k] for k in wanted if k in LABEL_METRICS}
    extra = {"task": "label", "confusion": cls["confusion"], "per_class": cls["per_class"], "predictions": preds}
    if set(wanted) & set(CALIBRATION_METRICS):
        start = time.perf_counter()
        probs = label_probabilities(model, tokenizer, [c.prompt_messages() for c in conversations], labels,
                                    batch_size=batch_size, bf16=bf16)
        index = {label: i for i, label in enumerate(labels)}
        calibration = calibration_metrics(probs, [index.get(g, -1) for g in golds], bins)
        scores.update({k: v for k, v in calibration.items() if k in wanted})
        scores["label_scoring_seconds"] = time.perf_counter() - start
        extra["label_probabilities"] = [[round(p, 6) for p in row] for row in probs]
    scores["invalid"] = cls["invalid"]
    return scores, extra


def per_example_rows(tokenizer, conversations: list[Conversation], result: dict) -> list[dict]:
    """One row per held-out example for error analysis: the user's input and its length in tokens, the
    reference, the answer and its score (1/0 correct for labels, token F1 otherwise); for labels also the
    label read from the answer and, with label probabilities, p(that label) and p(gold)."""
    probs, labels = result.get("label_probabilities"), list((result.get("per_class") or {}).keys())
    rows = []
    for i, (conv, output) in enumerate(zip(conversations, result["outputs"])):
        prompt = conv.prompt_messages()
        text = prompt[-1].content if prompt else ""
        row = {"input": text, "input_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"]),
               "reference": conv.reference(), "output": output}
        if result["task"] == "label":
            predicted = result["predictions"][i]
            row.update(gold=conv.label, predicted=predicted, score=float(predicted == conv.label))
            if probs is not None:
                by_label = dict(zip(labels, probs[i]))
                row["confidence"] = by_label.get(predicted) if predicted is not None else None
                row["gold_probability"] = by_label.get(conv.label)
        else:
            row["score"] = token_f1(output, conv.reference())
        rows.append(row)
    return rows


def label_continuations(tokenizer, messages: list[Message], labels: list[str]) -> list[list[int]]:
    """Token ids of each label written as the assistant's answer after ``messages``: what the chat template
    puts after the generation prompt, through the end-of-turn (EOS) token, tokenized on its own as
    generation would produce it. Ending the answer there keeps "card" from scoring as a prefix of "card
    arrival"."""
    ensure_chat_template(tokenizer)
    prompt_text = _render(tokenizer, messages, add_generation_prompt=True)
    eos = tokenizer.eos_token
    out = []
    for label in labels:
        full = _render(tokenizer, [*messages, Message("assistant", label)], add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise TemplateError("cannot score labels: the chat template renders an answer that does not "
                                "extend its generation prompt")
        answer = full[len(prompt_text):]
        if eos and eos in answer:
            answer = answer[:answer.index(eos) + len(eos)]
        out.append(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return out


def label_log_probs(model, tokenizer, prompts: list[list[Message]], labels: list[str], *, batch_size: int = 16,
                    bf16: bool = False, use_cache: bool | None = None) -> list[list[float]]:
    """Teacher-forced log-probability of each label's text as the answer to each prompt (sum over its
    tokens, natural log): one row per prompt, one column per label.

    Labels share the prompt, so the prompt runs once and its KV cache is repeated for ``batch_size`` label
    continuations at a time. Prefix / prompt tuning put their own virtual tokens in the cache, so for them
    (or ``use_cache=False``) each row is the whole prompt + label instead.
    """
    from hone.models.adapters import is_prompt_learning

    ensure_chat_template(tokenizer)
    cached = not is_prompt_learning(model) if use_cache is None else use_cache
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad(), autocast(device, bf16):
        for messages in prompts:
            prompt = render_prompt(tokenizer, messages)
            answers = label_continuations(tokenizer, messages, labels)
            score = _score_cached if cached else _score_full_rows
            rows.append(score(model, prompt, answers, batch_size, device, tokenizer.pad_token_id or 0))
    model.train(was_training)
    return rows


def _score_cached(model, prompt: list[int], answers: list[list[int]], batch_size: int, device, pad_id: int):
    import copy

    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    if out.past_key_values is None:  # a model that keeps no cache: whole rows give the same numbers
        return _score_full_rows(model, prompt, answers, batch_size, device, pad_id)
    first = out.logits[0, -1].float().log_softmax(-1)  # predicts each answer's first token
    scores = []
    for start in range(0, len(answers), batch_size):
        chunk = answers[start:start + batch_size]
        cache = copy.deepcopy(out.past_key_values)  # the forward below appends to it
        cache.batch_repeat_interleave(len(chunk))
        ids = _right_padded(chunk, pad_id).to(device)
        # Right padding needs no mask: a pad only ever follows the tokens that are scored.
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits.float().log_softmax(-1)
        for row, answer in enumerate(chunk):
            rest = logits[row, torch.arange(len(answer) - 1), torch.tensor(answer[1:], dtype=torch.long)]
            scores.append(float(first[answer[0]] + rest.sum()))
    return scores


def _score_full_rows(model, prompt: list[int], answers: list[list[int]], batch_size: int, device, pad_id: int):
    scores = []
    for start in range(0, len(answers), batch_size):
        chunk = answers[start:start + batch_size]
        ids = _right_padded([prompt + a for a in chunk], pad_id).to(device)
        mask = _right_padded([[1] * (len(prompt) + len(a)) for a in chunk], 0).to(device)
        # Prompt tuning returns logits for its virtual tokens too: the real tokens are the last ids.shape[1].
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:].float().log_softmax(-1)
        for row, answer in enumerate(chunk):
            at = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
            scores.append(float(logits[row, at, torch.tensor(answer, dtype=torch.long)].sum()))
    return scores


def _right_padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def label_probabilities(model, tokenizer, prompts: list[list[Message]], labels: list[str], *,
                        batch_size: int = 16, bf16: bool = False) -> list[list[float]]:
    """Per prompt, a probability for each label: the softmax over the label set of label_log_probs."""
    return [softmax(row) for row in label_log_probs(model, tokenizer, prompts, labels, batch_size=batch_size,
                                                    bf16=bf16)]
