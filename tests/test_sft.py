"""The SFT loss: the fast path (LM head only at target positions) equals the full-logits reference in value
and gradient, an empty batch still backpropagates, and one target matches a float64 hand computation."""

from __future__ import annotations

import pytest
import torch

from hone.data.pack import IGNORE, collate_rows
from hone.data.template import Tokenized, render_with_loss_mask
from hone.methods.sft import reference_loss_sum, sft_loss_sum
from hone.models.tiny import build_model, build_tokenizer
from hone.records import Conversation, Message


pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    # Larger-than-default init so logits are far from uniform and gradients are not all tiny.
    m = build_model(tok, layers=2, hidden=32, heads=4, seed=1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return m


def packed_batch(tok) -> tuple[list[Tokenized], object]:
    convs = [
        Conversation([Message("system", "Route tickets."), Message("user", "I was charged twice"),
                      Message("assistant", "billing")]),
        Conversation([Message("user", "where is my package?"), Message("assistant", "shipping"),
                      Message("user", "and the refund?"), Message("assistant", "billing please")]),
        Conversation([Message("user", "Please reset my password"), Message("assistant", "login")]),
    ]
    examples = [render_with_loss_mask(tok, c) for c in convs]
    # A non-unit weight so weighting is exercised too.
    examples[1].weights = [w * 0.5 for w in examples[1].weights]
    lengths = [len(e.input_ids) for e in examples]
    row_len = max(lengths[0] + lengths[1], lengths[2]) + 3
    return examples, collate_rows(examples, [[0, 1], [2]], row_len, tok.pad_token_id)


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def test_fast_loss_equals_reference_in_value_and_gradient(tok, model):
    _, batch = packed_batch(tok)
    assert 10 < int((batch.labels != IGNORE).sum()) < batch.labels.numel() / 2
    fast = sft_loss_sum(model, batch)
    ref = reference_loss_sum(model, batch)
    assert fast.item() > 1.0
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-5)
    g_fast, g_ref = grads(model, fast), grads(model, reference_loss_sum(model, batch))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    nonzero = 0
    for name, a, b in zip(names, g_fast, g_ref):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
        nonzero += int(a.abs().max() > 1e-6)
    assert nonzero == len(names)  # every parameter gets a real gradient, so the comparison means something


def test_loss_is_weighted_sum_of_per_target_cross_entropy(tok, model):
    """Independent of both implementations: per-example unpacked float64 cross-entropy from full logits."""
    examples, batch = packed_batch(tok)
    want = 0.0
    for ex in examples:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ex.input_ids])).logits[0].double(), -1)
        for t in range(1, len(ex.input_ids)):
            if ex.weights[t] > 0:
                want += ex.weights[t] * -logp[t - 1, ex.input_ids[t]].item()
    with torch.no_grad():
        assert sft_loss_sum(model, batch).item() == pytest.approx(want, rel=1e-5)


def test_batch_without_targets_gives_a_zero_that_backpropagates(tok, model):
    ids = tok("hello team quick question")["input_ids"]
    ex = Tokenized(ids, [0.0] * len(ids))
    batch = collate_rows([ex], [[0]], len(ex.input_ids) + 2, tok.pad_token_id)
    assert (batch.labels == IGNORE).all()
    loss = sft_loss_sum(model, batch)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    try:
        got = [p.grad for p in model.parameters() if p.grad is not None]
        assert got and all((g == 0).all() for g in got)
    finally:
        model.zero_grad(set_to_none=True)
    assert reference_loss_sum(model, batch).item() == 0.0


def test_single_target_matches_float64_hand_computation(tok, model):
    ids = tok("where is my package?")["input_ids"]
    k = len(ids) - 2  # the one target: token k, predicted at position k-1
    weights = [0.0] * len(ids)
    weights[k] = 1.0
    batch = collate_rows([Tokenized(ids, weights)], [[0]], len(ids) + 4, tok.pad_token_id)
    assert (batch.labels != IGNORE).sum() == 1 and batch.labels[0, k - 1] == ids[k]
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=torch.tensor([ids[:k]])).last_hidden_state[0, -1].double()
        head = model.get_output_embeddings().weight.double()
        logits = head @ hidden
        want = -torch.log_softmax(logits, -1)[ids[k]].item()
        got = sft_loss_sum(model, batch).item()
    assert got == pytest.approx(want, abs=1e-4)
    assert want > 0.1  # not a degenerate near-certain prediction
    # Weight scales the loss linearly.
    batch.weights[0, k - 1] = 2.5
    with torch.no_grad():
        assert sft_loss_sum(model, batch).item() == pytest.approx(2.5 * want, abs=3e-4)
