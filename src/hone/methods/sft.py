"""Supervised fine-tuning: the weighted next-token loss over target tokens.

The LM head is applied only at positions that have a target. With assistant-only loss most positions are
prompt, so this skips most of the largest matmul (hidden x vocabulary) and never materialises logits for
tokens nobody learns from. The loss is a SUM here; the loop divides by the total target weight of the whole
optimizer step, so gradient accumulation gives exactly the large-batch loss.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from hone.data.pack import MicroBatch, collate_rows, pack_rows, plan_epoch, row_length
from hone.methods import Task
from hone.models.adapters import is_prompt_learning, virtual_token_hidden_states


def unwrap(model):
    """The transformers model under a peft wrapper (peft injects LoRA in place, so its modules stay live)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, batch: MicroBatch) -> torch.Tensor:
    """The decoder's last hidden state at every position (rows, row_len, hidden). Prefix and prompt tuning
    add virtual tokens in peft's forward, so they go through it one example per row (see
    adapters.virtual_token_hidden_states: positions of rows' padding tails are left at zero); every other
    model calls its decoder directly, which LoRA-family adapters have already changed in place."""
    if is_prompt_learning(model):
        return virtual_token_hidden_states(model, batch.input_ids, batch.position_ids, batch.labels != -100)
    decoder = unwrap(model).get_decoder()
    out = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    return out.last_hidden_state


def target_logits(model, hidden: torch.Tensor, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at target positions, their labels, their weights)."""
    mask = batch.labels != -100
    head = unwrap(model).get_output_embeddings()
    return head(hidden[mask]), batch.labels[mask], batch.weights[mask]


def sft_loss_sum(model, batch: MicroBatch) -> torch.Tensor:
    """Sum over target tokens of weight x cross-entropy (computed in float32 for a stable log-softmax)."""
    logits, labels, weights = target_logits(model, hidden_states(model, batch), batch)
    if labels.numel() == 0:
        return zero_connected_to_graph(model)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (ce * weights).sum()


def zero_connected_to_graph(model) -> torch.Tensor:
    # A zero that is still connected to the graph, so backward() works on a batch with no targets.
    p = next(p for p in model.parameters() if p.requires_grad)
    return p.sum() * 0.0


def reference_loss_sum(model, batch: MicroBatch) -> torch.Tensor:
    """The plain path (full logits through the model's own forward), used by tests to check the fast one."""
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    logits = out.logits.float()
    mask = batch.labels != -100
    ce = F.cross_entropy(logits[mask], batch.labels[mask], reduction="none")
    return (ce * batch.weights[mask]).sum()


# --- the method: data, batches, evaluation ------------------------------------------------------------


def validate(cfg):
    from hone.train.prepare import validate_data

    data = validate_data(cfg.data, cfg.train.seed)
    check_eval_task(cfg, data.held_out, data.labels)
    return data


def check_eval_task(cfg, held_out: list, labels: list[str]) -> None:
    """eval.task: classification needs a label on every held-out record: say so before any model loads."""
    from hone.config import ConfigError

    if cfg.eval.enabled and cfg.eval.task == "classification":
        unlabelled = [r for r in held_out if r.label is None]
        if unlabelled or not labels:
            first = unlabelled[0] if unlabelled else None
            where = f" (first: {first.source}:{first.line})" if first is not None and first.line else ""
            raise ConfigError(f"eval.task: classification needs text+label data, but {len(unlabelled)} of "
                              f"{len(held_out)} held-out records have no label{where}. Use eval.task: qa, "
                              "extraction or generation, or auto.")


def packed_task(train: list, held_out: list, cfg, pad_id: int, loss_sum=sft_loss_sum, **extra) -> Task:
    """A Task over tokenized examples packed into rows (SFT, continued pretraining, logit distillation)."""
    row_len = row_length(train, cfg.data.max_seq_len)
    rows_per_batch = max(1, cfg.train.batch_tokens // row_len)

    def epoch_plan(epoch: int) -> list:
        return plan_epoch(train, seed=cfg.train.seed, epoch=epoch, row_len=row_len, rows_per_batch=rows_per_batch)

    return Task(epoch_plan=epoch_plan, collate=lambda rows: collate_rows(train, rows, row_len, pad_id),
                loss_sum=loss_sum, held_out=packed_batches(held_out, row_len, rows_per_batch, pad_id),
                tokens_per_epoch=sum(len(t.input_ids) for t in train), **extra)


def packed_batches(examples: list, row_len: int, rows_per_batch: int, pad_id: int) -> list[MicroBatch]:
    """Held-out examples packed in a fixed order, as collated batches (rows as long as the longest one)."""
    if not examples:
        return []
    eval_len = max(row_len, max(len(t.input_ids) for t in examples))
    rows = pack_rows(examples, list(range(len(examples))), eval_len)
    return [collate_rows(examples, rows[i:i + rows_per_batch], eval_len, pad_id)
            for i in range(0, len(rows), rows_per_batch)]


def build(cfg, data, model, tokenizer, run_dir: Path, log) -> Task:
    from hone.train.prepare import tokenize_data

    prepared = tokenize_data(data, tokenizer, cfg.data, run_dir / "rejects.jsonl")
    return packed_task(prepared.train, prepared.held_out, cfg, tokenizer.pad_token_id,
                       evaluate=generation_evaluator(cfg, tokenizer, prepared.held_out_conversations,
                                                     prepared.labels),
                       stats=prepared.stats, labels=prepared.labels)


def generation_evaluator(cfg, tokenizer, conversations: list, labels: list[str]):
    """Generate answers for held-out prompts and score them with the metrics of eval.task (see
    hone.eval.runners.evaluate_task)."""
    from hone.eval.runners import evaluate_task
    from hone.train.device import pick_device, use_bf16

    def evaluate(model) -> dict:
        bf16 = use_bf16(pick_device(), cfg.train.precision)
        result = evaluate_task(model, tokenizer, conversations, labels or None,
                               max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, bf16=bf16,
                               task=cfg.eval.task, metric_names=cfg.eval.metrics,
                               calibration_bins=cfg.eval.calibration_bins)
        result["examples"] = [{"prompt": c.prompt_messages()[-1].content if c.prompt_messages() else "",
                               "reference": c.reference(), "output": o}
                              for c, o in zip(conversations, result["outputs"])]
        return result

    return evaluate
