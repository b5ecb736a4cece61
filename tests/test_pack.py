"""Packing: labels stay inside their example, positions restart per example, plans are reproducible, and
a packed row gives the tiny model exactly the logits each example gets alone."""

from __future__ import annotations

import random

import pytest
import torch

from hone.data.pack import IGNORE, collate_rows, epoch_order, pack_rows, plan_epoch, row_length
from hone.data.template import Tokenized, render_with_loss_mask
from hone.records import Conversation, Message

PAD = 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")

def example(n: int, start: int, weights: list[float] | None = None) -> Tokenized:
    """Token ids start, start+1, ... (distinct across examples, never PAD)."""
    return Tokenized(list(range(start, start + n)), weights if weights is not None else [1.0] * n)


def check_labels(batch, examples, rows, row_len):
    """Position t of an example is labelled with its token t+1 where that token's weight > 0; everything
    else (example ends, padding, unweighted tokens) is IGNORE."""
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ex = examples[i]
            n = len(ex.input_ids)
            assert batch.input_ids[r, at:at + n].tolist() == ex.input_ids
            assert batch.position_ids[r, at:at + n].tolist() == list(range(n))
            for t in range(n - 1):
                want = ex.input_ids[t + 1] if ex.weights[t + 1] > 0 else IGNORE
                assert batch.labels[r, at + t].item() == want, (r, i, t)
                assert batch.weights[r, at + t].item() == pytest.approx(ex.weights[t + 1])
            # The example's last token would predict the NEXT example's first token (or padding): never a label.
            assert batch.labels[r, at + n - 1].item() == IGNORE
            assert batch.weights[r, at + n - 1].item() == 0.0
            at += n
        assert (batch.input_ids[r, at:] == PAD).all()
        assert (batch.labels[r, at:] == IGNORE).all() and (batch.weights[r, at:] == 0).all()
        if at < row_len:
            assert batch.position_ids[r, at:].tolist() == list(range(row_len - at))


def test_collate_labels_never_cross_examples_or_padding():
    # Every weight is 1, even position 0: a collate that shifted the whole row would label boundaries.
    examples = [example(5, 10), example(3, 20), example(4, 30), example(6, 40, [0, 0, 1, 0, 1, 1])]
    rows, row_len = [[0, 1], [2, 3]], 12
    batch = collate_rows(examples, rows, row_len, PAD)
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape == (2, row_len)
    assert batch.labels.dtype == torch.long and batch.weights.dtype == torch.float32
    check_labels(batch, examples, rows, row_len)
    # Explicit boundaries: row 0 = ex0 (10..14) + ex1 (20..22) + padding.
    assert batch.labels[0].tolist() == [11, 12, 13, 14, IGNORE, 21, 22, IGNORE] + [IGNORE] * 4
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    # Row 1 = ex2 (30..33) + ex3 (40..45, targets only at tokens 2, 4, 5), which fills it exactly.
    assert batch.labels[1].tolist() == [31, 32, 33, IGNORE, IGNORE, 42, IGNORE, 44, 45, IGNORE, IGNORE, IGNORE]
    assert ((batch.labels != IGNORE) == (batch.weights > 0)).all()
    assert batch.real_tokens == 18
    assert batch.target_weight == pytest.approx(4 + 2 + 3 + 3)


def test_collate_random_packs():
    rng = random.Random(0)
    examples = [example(rng.randint(2, 20), 1 + 100 * k, [float(rng.random() < 0.6) for _ in range(25)])
                for k in range(30)]
    for ex in examples:
        ex.weights = ex.weights[:len(ex.input_ids)]
    row_len = 48
    rows = pack_rows(examples, list(range(len(examples))), row_len)
    batch = collate_rows(examples, rows, row_len, PAD)
    check_labels(batch, examples, rows, row_len)
    assert batch.real_tokens == sum(len(e.input_ids) for e in examples) == int((batch.input_ids != PAD).sum())
    assert batch.target_weight == pytest.approx(sum(sum(e.weights[1:]) for e in examples))


def test_pack_rows_fits_and_uses_every_example_once():
    rng = random.Random(1)
    examples = [example(rng.randint(1, 64), 1) for _ in range(200)]
    examples.append(example(64, 1))  # exactly one row long
    order = epoch_order(len(examples), seed=5, epoch=0)
    rows = pack_rows(examples, order, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(len(examples[i].input_ids) for i in row) <= 64 for row in rows)
    # First-fit keeps the given order within each row.
    rank = {i: k for k, i in enumerate(order)}
    assert all([rank[i] for i in row] == sorted(rank[i] for i in row) for row in rows)
    # And it packs: fewer rows than examples, not far above the lower bound.
    total = sum(len(e.input_ids) for e in examples)
    assert -(-total // 64) <= len(rows) < len(examples)


def test_pack_rows_first_fit_small_cases():
    ex = [example(n, 1) for n in (3, 5, 6, 2, 8)]
    # 3+5 fill a row of 8 exactly; 6 opens a row that 2 then fills; 8 needs its own row.
    assert pack_rows(ex, [0, 1, 2, 3, 4], 8) == [[0, 1], [2, 3], [4]]
    # First fit: a later small example goes back to the first row with room.
    assert pack_rows(ex, [2, 4, 3, 0], 8) == [[2, 3], [4], [0]]
    assert pack_rows(ex, [4], 8) == [[4]]


def test_row_length():
    assert row_length([example(10, 1)], 1024) == 512            # short examples share a 512-token row
    assert row_length([example(600, 1)], 1024) == 640           # rounded up to 64
    assert row_length([example(600, 1)], 600) == 600            # never above max_seq_len
    assert row_length([example(900, 1)], 512) == 512


def test_epoch_order_and_plan_are_deterministic_per_seed_and_epoch():
    examples = [example(k % 37 + 1, 1) for k in range(60)]
    assert epoch_order(60, 3, 1) == epoch_order(60, 3, 1)
    assert sorted(epoch_order(60, 3, 1)) == list(range(60))
    assert epoch_order(60, 3, 1) != epoch_order(60, 3, 2)
    assert epoch_order(60, 3, 1) != epoch_order(60, 4, 1)
    plan = plan_epoch(examples, seed=3, epoch=1, row_len=64, rows_per_batch=2)
    assert plan == plan_epoch(examples, seed=3, epoch=1, row_len=64, rows_per_batch=2)
    assert plan != plan_epoch(examples, seed=3, epoch=2, row_len=64, rows_per_batch=2)
    assert all(1 <= len(batch) <= 2 for batch in plan) and all(len(b) == 2 for b in plan[:-1])
    assert sorted(i for batch in plan for row in batch for i in row) == list(range(60))
    assert [i for batch in plan for row in batch for i in row] != list(range(60))  # really shuffled


# ---- packing isolation on the tiny model ---------------------------------------------------------------

def _convs():
    return [
        Conversation([Message("system", "Route tickets."), Message("user", "I was charged twice for one invoice"),
                      Message("assistant", "billing")]),
        Conversation([Message("user", "where is my package?"), Message("assistant", "shipping")]),
        Conversation([Message("user", "Please reset my password, I cannot log in."),
                      Message("assistant", "login"), Message("user", "thanks"), Message("assistant", "ok")]),
    ]


def _logits(model, ids, pos=None):
    with torch.no_grad():
        kwargs = {"position_ids": pos} if pos is not None else {}
        return model(input_ids=ids, use_cache=False, **kwargs).logits


def test_packed_logits_equal_unpacked(tiny):
    model, tok = tiny
    examples = [render_with_loss_mask(tok, c) for c in _convs()]
    lengths = [len(e.input_ids) for e in examples]
    row_len = sum(lengths) + 5  # some padding at the end
    batch = collate_rows(examples, [[0, 1, 2]], row_len, tok.pad_token_id)
    packed = _logits(model, batch.input_ids, batch.position_ids)[0]
    at = 0
    for ex, n in zip(examples, lengths):
        alone = _logits(model, torch.tensor([ex.input_ids]))[0]
        torch.testing.assert_close(packed[at:at + n], alone, atol=1e-5, rtol=0)
        at += n

    # Control: with positions that do not restart, later examples attend across the boundary and differ.
    plain = torch.arange(row_len).unsqueeze(0)
    unreset = _logits(model, batch.input_ids, plain)[0]
    torch.testing.assert_close(unreset[:lengths[0]], packed[:lengths[0]], atol=1e-5, rtol=0)
    second = slice(lengths[0], lengths[0] + lengths[1])
    assert (unreset[second] - packed[second]).abs().max() > 1e-3
