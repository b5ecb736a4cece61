"""Render conversations with the tokenizer's chat template, and mark which tokens the loss covers.

Which tokens belong to which message is found by rendering growing prefixes of the conversation and mapping
character spans to tokens through the tokenizer's offsets. That works with any chat template whose render of
a prefix is a prefix of the full render (ChatML, Llama 3, Mistral, Gemma ...); a template that rewrites
earlier turns is refused with a clear error rather than trained with a wrong mask.

The target span of an assistant message runs from the first token after the generation prompt through the
end-of-turn token, so the tuned model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from hone.records import Conversation, Message

# Used when a tokenizer has no chat template of its own (base models).
DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(ValueError):
    pass


@dataclass
class Tokenized:
    input_ids: list[int]
    # Per token: the loss weight for predicting THIS token (0 = not a target). Position 0 is never a target.
    weights: list[float]
    truncated: bool = False
    source: str = ""
    line: int = 0

    @property
    def n_targets(self) -> int:
        return sum(1 for w in self.weights if w > 0)


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_TEMPLATE


def _as_dicts(messages: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _render(tokenizer, messages: list[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def target_char_spans(tokenizer, conv: Conversation, loss_on: str) -> tuple[str, list[tuple[int, int, float]]]:
    """The full rendered text, and (start, end, weight) character spans the loss covers."""
    full = _render(tokenizer, conv.messages, add_generation_prompt=False)
    if loss_on == "all":
        return full, [(0, len(full), 1.0)]
    spans = []
    for i, msg in enumerate(conv.messages):
        if msg.role != "assistant":
            continue
        weight = 1.0 if msg.weight is None else float(msg.weight)
        if weight <= 0:
            continue
        through = _render(tokenizer, conv.messages[: i + 1], add_generation_prompt=False)
        before = (_render(tokenizer, conv.messages[:i], add_generation_prompt=True) if i
                  else _text_before_content(through, msg, conv))
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(
                f"{conv.where}: the chat template does not render conversations prefix by prefix, so hone "
                "cannot tell which tokens belong to the assistant. Use a template without turn rewriting.")
        # Trailing whitespace after the end-of-turn token (ChatML's "\n") is not worth learning.
        end = len(through.rstrip())
        spans.append((len(before), end, weight))
    return full, spans


def _text_before_content(rendered: str, msg: Message, conv: Conversation) -> str:
    """For a conversation that opens with an assistant turn there is no prefix to render, so the target
    starts where the message's own content does (the template's header and any default system prompt are
    not learned)."""
    at = rendered.find(msg.content)
    if at < 0:
        raise TemplateError(f"{conv.where}: the chat template changes the first message's text, so hone "
                            "cannot find where the assistant's answer starts")
    return rendered[:at]


def render_with_loss_mask(tokenizer, conv: Conversation, *, loss_on: str = "assistant",
                          max_seq_len: int | None = None) -> Tokenized:
    text, spans = target_char_spans(tokenizer, conv, loss_on)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    weights = [0.0] * len(ids)
    for t, (start, end) in enumerate(offsets):
        if t == 0 or end <= start:
            continue
        for s, e, w in spans:
            if s <= start < e:
                weights[t] = w
                break
    truncated = max_seq_len is not None and len(ids) > max_seq_len
    if truncated:
        ids, weights = ids[:max_seq_len], weights[:max_seq_len]
    return Tokenized(ids, weights, truncated, conv.source, conv.line)


def render_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of a conversation prefix followed by the assistant generation prompt."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
