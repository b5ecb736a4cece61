"""Supervised fine-tuning: the weighted next-token loss over target tokens.

The LM head is applied only at positions that have a target. With assistant-only loss most positions are
prompt, so this skips most of the largest matmul (hidden x vocabulary) and never materialises logits for
tokens nobody learns from. The loss is a SUM here; the loop divides by the total target weight of the whole
optimizer step, so gradient accumulation gives exactly the large-batch loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hone.data.pack import MicroBatch


def unwrap(model):
    """The transformers model under a peft wrapper (peft injects LoRA in place, so its modules stay live)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, batch: MicroBatch) -> torch.Tensor:
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
