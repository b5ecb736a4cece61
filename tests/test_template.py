"""Chat rendering + loss masks on the tiny tokenizer: exactly the assistant replies (and their end-of-turn
token) are targets, whatever else the template renders."""

from __future__ import annotations

import copy

import pytest

from hone.data.template import (
    DEFAULT_TEMPLATE,
    TemplateError,
    ensure_chat_template,
    render_prompt,
    render_with_loss_mask,
)
from hone.models.tiny import build_tokenizer
from hone.records import Conversation, Message

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Renders earlier assistant turns only while they are the last message (like templates that strip
# "thinking" from history): the render of a prefix is NOT a prefix of the full render.
DROPS_EARLIER_ASSISTANT = (
    "{% for message in messages %}{% if message['role'] != 'assistant' or loop.last %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def base_tok():
    return build_tokenizer()


@pytest.fixture
def tok(base_tok):
    """A private copy: tests may change its chat template."""
    return copy.deepcopy(base_tok)


def chat(*pairs, weights=None) -> Conversation:
    weights = weights or {}
    return Conversation([Message(role, text, weights.get(i)) for i, (role, text) in enumerate(pairs)],
                        source="t.jsonl", line=7)


def target_runs(tok, tokenized) -> list[str]:
    """Decoded text of each maximal run of consecutive target tokens."""
    runs, current = [], []
    for tid, w in zip(tokenized.input_ids, tokenized.weights):
        if w > 0:
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def full_text(tok, conv) -> str:
    return tok.apply_chat_template([{"role": m.role, "content": m.content} for m in conv.messages], tokenize=False)


SINGLE = chat(("system", "Be brief."), ("user", "where is my package?"), ("assistant", "It ships today."))


def test_single_turn_targets_are_exactly_the_reply_and_end_of_turn(tok):
    out = render_with_loss_mask(tok, SINGLE)
    assert len(out.input_ids) == len(out.weights)
    assert tok.decode(out.input_ids) == full_text(tok, SINGLE)  # the render is the whole conversation
    assert target_runs(tok, out) == ["It ships today.<|im_end|>"]
    # The end-of-turn token is a target; the "\n" after it is not, and it is the last token.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    last_target = max(t for t, w in enumerate(out.weights) if w > 0)
    assert out.input_ids[last_target] == im_end
    assert tok.decode(out.input_ids[last_target + 1:]) == "\n"
    assert out.weights[last_target + 1:] == [0.0] * (len(out.weights) - last_target - 1)
    assert all(w in (0.0, 1.0) for w in out.weights)
    assert out.weights[0] == 0.0
    assert out.n_targets == sum(1 for w in out.weights if w > 0) > 0
    assert not out.truncated and (out.source, out.line) == ("t.jsonl", 7)


def test_system_and_user_text_never_targets(tok):
    out = render_with_loss_mask(tok, SINGLE)
    non_targets = tok.decode([t for t, w in zip(out.input_ids, out.weights) if w == 0])
    assert "Be brief." in non_targets and "where is my package?" in non_targets
    assert "<|im_start|>assistant\n" in non_targets  # the generation prompt is given, not learned


def test_multi_turn_both_assistant_turns_are_targets(tok):
    conv = chat(("system", "Route tickets."), ("user", "I was charged twice"), ("assistant", "billing"),
                ("user", "my password fails"), ("assistant", "login"))
    out = render_with_loss_mask(tok, conv)
    assert target_runs(tok, out) == ["billing<|im_end|>", "login<|im_end|>"]


def test_weight_zero_excludes_that_turn_only(tok):
    pairs = (("user", "I was charged twice"), ("assistant", "billing"),
             ("user", "my password fails"), ("assistant", "login"))
    first_off = render_with_loss_mask(tok, chat(*pairs, weights={1: 0.0}))
    assert target_runs(tok, first_off) == ["login<|im_end|>"]
    last_off = render_with_loss_mask(tok, chat(*pairs, weights={3: 0}))
    assert target_runs(tok, last_off) == ["billing<|im_end|>"]
    explicit_one = render_with_loss_mask(tok, chat(*pairs, weights={1: 1.0, 3: 1.0}))
    assert explicit_one.weights == render_with_loss_mask(tok, chat(*pairs)).weights
    # Token ids never depend on the mask.
    assert first_off.input_ids == last_off.input_ids == explicit_one.input_ids


def test_fractional_weight_is_carried_onto_its_tokens(tok):
    conv = chat(("user", "q"), ("assistant", "yes"), ("user", "q2"), ("assistant", "no"), weights={1: 0.5})
    out = render_with_loss_mask(tok, conv)
    assert sorted({w for w in out.weights if w > 0}) == [0.5, 1.0]
    yes_ids = [t for t, w in zip(out.input_ids, out.weights) if w == 0.5]
    assert tok.decode(yes_ids) == "yes<|im_end|>"


def test_loss_on_all_marks_every_token_but_the_first(tok):
    out = render_with_loss_mask(tok, SINGLE, loss_on="all")
    assert out.weights == [0.0] + [1.0] * (len(out.input_ids) - 1)
    assert out.input_ids == render_with_loss_mask(tok, SINGLE).input_ids


def test_truncation_caps_length_and_is_reported(tok):
    full = render_with_loss_mask(tok, SINGLE)
    n = len(full.input_ids)
    cut = render_with_loss_mask(tok, SINGLE, max_seq_len=12)
    assert cut.truncated and len(cut.input_ids) == len(cut.weights) == 12
    assert cut.input_ids == full.input_ids[:12] and cut.weights == full.weights[:12]
    exact = render_with_loss_mask(tok, SINGLE, max_seq_len=n)
    assert not exact.truncated and exact.input_ids == full.input_ids
    assert render_with_loss_mask(tok, SINGLE, max_seq_len=n - 1).truncated


def test_tokenizer_without_template_gets_the_default(tok):
    tok.chat_template = None
    ensure_chat_template(tok)
    assert tok.chat_template == DEFAULT_TEMPLATE
    out = render_with_loss_mask(tok, SINGLE)
    assert target_runs(tok, out) == ["It ships today.<|im_end|>"]
    # An existing template is left alone.
    tok.chat_template = SMOLLM2_TEMPLATE
    ensure_chat_template(tok)
    assert tok.chat_template == SMOLLM2_TEMPLATE


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    tok.chat_template = DROPS_EARLIER_ASSISTANT
    conv = chat(("user", "a"), ("assistant", "billing"), ("user", "b"), ("assistant", "login"))
    with pytest.raises(TemplateError, match=r"t\.jsonl:7"):
        render_with_loss_mask(tok, conv)
    # A single-turn conversation renders identically prefix by prefix, so it is accepted.
    single = render_with_loss_mask(tok, chat(("user", "a"), ("assistant", "billing")))
    assert target_runs(tok, single) == ["billing<|im_end|>"]


def test_render_prompt_ends_with_the_generation_prompt(tok):
    prompt = render_prompt(tok, SINGLE.prompt_messages())
    gen = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert prompt[-len(gen):] == gen
    text = tok.decode(prompt)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # Prompt + reply + end-of-turn is exactly the training render: what the model sees at eval time matches.
    assert text + "It ships today.<|im_end|>\n" == full_text(tok, SINGLE)
    full = render_with_loss_mask(tok, SINGLE)
    assert full.input_ids[:len(prompt)] == prompt
    assert all(w == 0 for w in full.weights[:len(prompt)]) and full.weights[len(prompt)] > 0


def test_smollm2_default_system_prompt_is_not_a_target(tok):
    tok.chat_template = SMOLLM2_TEMPLATE
    conv = chat(("user", "where is my package?"), ("assistant", "shipping"))
    out = render_with_loss_mask(tok, conv)
    text = tok.decode(out.input_ids)
    assert SMOLLM2_SYSTEM in text  # the template really injected it
    assert target_runs(tok, out) == ["shipping<|im_end|>"]
    # With an explicit system message, no default one appears and targets are unchanged.
    conv2 = chat(("system", "Route."), ("user", "where is my package?"), ("assistant", "shipping"))
    out2 = render_with_loss_mask(tok, conv2)
    assert SMOLLM2_SYSTEM not in tok.decode(out2.input_ids)
    assert target_runs(tok, out2) == ["shipping<|im_end|>"]


@pytest.mark.parametrize("template", ["chatml", "smollm2"])
def test_leading_assistant_turn_targets_only_its_content(tok, template):
    if template == "smollm2":
        tok.chat_template = SMOLLM2_TEMPLATE
    conv = chat(("assistant", "Hi there"), ("user", "my password fails"), ("assistant", "login"))
    out = render_with_loss_mask(tok, conv)
    assert target_runs(tok, out) == ["Hi there<|im_end|>", "login<|im_end|>"]
