"""Pack tokenized examples into padding-free micro-batches.

Examples are laid end to end in rows; each example's position ids restart at 0, which is how the model's
attention tells packed examples apart (transformers builds a block-diagonal causal mask from position ids
that reset; `tests/test_pack.py` checks that packed logits equal unpacked ones). Only the tail of a row is
padding, and padding is never a target.

The plan for an epoch depends only on (seed, epoch), so a resumed run rebuilds exactly the same batches and
skips the ones it already trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hone.data.template import Tokenized

IGNORE = -100


@dataclass
class MicroBatch:
    input_ids: torch.Tensor     # (rows, row_len)
    position_ids: torch.Tensor  # (rows, row_len), restarting at 0 for each packed example
    labels: torch.Tensor        # (rows, row_len): the token predicted at each position, IGNORE where no loss
    weights: torch.Tensor       # (rows, row_len) float: loss weight of each label
    real_tokens: int            # non-padding tokens

    @property
    def target_weight(self) -> float:
        return float(self.weights.sum())


def row_length(examples: list[Tokenized], max_seq_len: int) -> int:
    """Rows are as long as the longest example but at least 512 tokens (rounded to 64), so short examples
    share rows while attention, which costs row_len squared, stays cheap."""
    longest = max(len(e.input_ids) for e in examples)
    return min(max_seq_len, max(512, -(-longest // 64) * 64)) if longest <= max_seq_len else max_seq_len


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def pack_rows(examples: list[Tokenized], order: list[int], row_len: int) -> list[list[int]]:
    """First-fit packing in the given order: a row takes the next examples that still fit."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(row_len - n)
    return rows


def collate_rows(examples: list[Tokenized], rows: list[list[int]], row_len: int, pad_id: int) -> MicroBatch:
    ids = torch.full((len(rows), row_len), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), row_len), dtype=torch.long)
    labels = torch.full((len(rows), row_len), IGNORE, dtype=torch.long)
    weights = torch.zeros((len(rows), row_len), dtype=torch.float32)
    real = 0
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ex = examples[i]
            n = len(ex.input_ids)
            ids[r, at:at + n] = torch.tensor(ex.input_ids)
            pos[r, at:at + n] = torch.arange(n)
            # Position t predicts token t+1 of the SAME example; the last token of an example predicts nothing.
            w = torch.tensor(ex.weights[1:], dtype=torch.float32)
            labels[r, at:at + n - 1] = torch.where(w > 0, ids[r, at + 1:at + n], IGNORE)
            weights[r, at:at + n - 1] = w
            at += n
            real += n
        # Padding gets positions that keep counting from 0, so it forms its own (ignored) segment.
        pos[r, at:] = torch.arange(row_len - at)
    return MicroBatch(ids, pos, labels, weights, real)


def plan_epoch(examples: list[Tokenized], *, seed: int, epoch: int, row_len: int,
               rows_per_batch: int) -> list[list[list[int]]]:
    """Micro-batches for one epoch, each a list of rows of example indices."""
    rows = pack_rows(examples, epoch_order(len(examples), seed, epoch), row_len)
    return [rows[i:i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]
