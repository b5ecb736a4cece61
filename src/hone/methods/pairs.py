"""Preference pairs: read them in any common shape, and tokenise them as prompt + chosen / rejected.

Accepted rows (one JSON object per line, or CSV/Parquet columns):

    {"prompt": "...", "chosen": "...", "rejected": "..."}                   prompt as text
    {"prompt": [{"role", "content"}, ...], "chosen": ..., "rejected": ...}  prompt as chat messages
    {"chosen": [...messages], "rejected": [...messages]}                    full conversations sharing a prefix
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}         Anthropic hh-rlhf dialogues

`chosen` / `rejected` may be a string (the answer) or a message list ending in an assistant message. The
answer is rendered through the chat template after the prompt's generation prompt, through the end-of-turn
token, exactly the tokens SFT trains on; so DPO, ORPO, SimPO and reward models score what the model says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hone.methods import RowError
from hone.records import ROLES, Message

NEEDS = ("'prompt', 'chosen' and 'rejected' (text or chat messages), or 'chosen' and 'rejected' as full "
         "conversations that share everything but the last assistant turn")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass(frozen=True)
class Pair:
    prompt: tuple[Message, ...]   # the conversation before the answer
    chosen: str
    rejected: str

    def key(self) -> str:
        """Content identity, for deterministic splits."""
        return repr((tuple((m.role, m.content) for m in self.prompt), self.chosen, self.rejected))


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]     # the answer's tokens, through the end-of-turn token
    rejected_ids: list[int]
    truncated: bool = False


def parse_pair(row: dict) -> Pair:
    """One row -> Pair, or RowError with a stable code and what to fix."""
    if "chosen" not in row or "rejected" not in row:
        missing = [k for k in ("chosen", "rejected") if k not in row]
        raise RowError("missing_field", f"missing {' and '.join(repr(k) for k in missing)} "
                                        f"(keys found: {', '.join(sorted(row)) or 'none'})")
    chosen, rejected = row["chosen"], row["rejected"]
    if row.get("prompt") is not None:
        prompt = _prompt_messages(row["prompt"])
        c_prefix, c_answer = _answer(chosen, "chosen")
        r_prefix, r_answer = _answer(rejected, "rejected")
        # A message-list answer may repeat the prompt (TRL's conversational format); drop it if so.
        prompt = prompt + _strip_prefix(c_prefix, prompt, "chosen")
        if r_prefix and _strip_prefix(r_prefix, prompt[:len(r_prefix)], "rejected"):
            raise RowError("prompt_mismatch", "'rejected' repeats a different conversation than 'chosen'")
    else:
        c_prefix, c_answer = _answer(chosen, "chosen", whole_conversation=True)
        r_prefix, r_answer = _answer(rejected, "rejected", whole_conversation=True)
        if c_prefix != r_prefix:
            raise RowError("prompt_mismatch", "without a 'prompt', 'chosen' and 'rejected' must be the same "
                                              "conversation up to their last assistant turn; they differ earlier")
        prompt = c_prefix
    if not prompt:
        raise RowError("missing_field", "no prompt: give 'prompt', or conversations with a user turn before "
                                        "the answer")
    if c_answer == r_answer:
        raise RowError("identical_answers", "'chosen' and 'rejected' are the same answer; the pair teaches nothing")
    return Pair(tuple(prompt), c_answer, r_answer)


def _prompt_messages(value) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_content", "'prompt' is empty")
        return _hh_messages(value) if _HH_TURN.search(value) else [Message("user", value)]
    return chat_messages(value, "prompt")


def _answer(value, key: str, whole_conversation: bool = False) -> tuple[list[Message], str]:
    """(messages before the answer, the answer's text) for a string or message-list field."""
    if isinstance(value, str):
        if whole_conversation and _HH_TURN.search(value):
            messages = _hh_messages(value)
        elif whole_conversation:
            raise RowError("missing_field", f"'{key}' is plain text, so the prompt is unknown: add 'prompt'")
        else:
            if not value.strip():
                raise RowError("empty_content", f"'{key}' is empty")
            return [], value
    else:
        messages = chat_messages(value, key)
    if messages[-1].role != "assistant":
        raise RowError("no_assistant_turn", f"'{key}' must end with an assistant message "
                                            f"(it ends with {messages[-1].role})")
    if not messages[-1].content.strip():
        raise RowError("empty_content", f"'{key}': the last assistant message is empty")
    return messages[:-1], messages[-1].content


def _strip_prefix(prefix: list[Message], prompt: list[Message], key: str) -> list[Message]:
    """Messages of `prefix` beyond `prompt` (none when the answer's conversation repeats the prompt)."""
    if prefix[:len(prompt)] == prompt:
        return prefix[len(prompt):]
    if not prefix:
        return []
    raise RowError("prompt_mismatch", f"'{key}' is a conversation that does not start with 'prompt'")


def chat_messages(value, key: str) -> list[Message]:
    """A non-empty list of {role, content} objects -> messages, or RowError naming the bad item."""
    if not isinstance(value, list) or not value:
        raise RowError("bad_type", f"'{key}' must be text or a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError("bad_type", f"{key}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError("unknown_role", f"{key}[{i}].role is '{m['role']}'; allowed: {', '.join(ROLES)}")
        out.append(Message(m["role"], m["content"]))
    return out


def _hh_messages(text: str) -> list[Message]:
    """Anthropic hh-rlhf text ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowError("bad_format", "hh-rlhf dialogue has text before its first 'Human:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [Message(roles[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def tokenize_pair(tokenizer, pair: Pair, max_prompt_tokens: int, max_seq_len: int) -> TokenizedPair:
    """Prompt ids (through the generation prompt) and each answer's ids (through end-of-turn).

    The prompt keeps its LAST max_prompt_tokens tokens (the turns nearest the answer); answers are cut so
    prompt + answer fits max_seq_len.
    """
    from hone.data.template import ensure_chat_template, render_prompt

    ensure_chat_template(tokenizer)
    prompt_ids = render_prompt(tokenizer, list(pair.prompt))
    answers = [answer_ids(tokenizer, pair.prompt, a, len(prompt_ids)) for a in (pair.chosen, pair.rejected)]
    truncated = len(prompt_ids) > max_prompt_tokens
    prompt_ids = prompt_ids[-max_prompt_tokens:]
    room = max(1, max_seq_len - len(prompt_ids))
    truncated = truncated or any(len(a) > room for a in answers)
    return TokenizedPair(prompt_ids, answers[0][:room], answers[1][:room], truncated)


def answer_ids(tokenizer, prompt: tuple[Message, ...], answer: str, prompt_len: int) -> list[int]:
    """The answer's tokens as the chat template renders them after `prompt` (end-of-turn included)."""
    from hone.data.template import _render

    full = _render(tokenizer, [*prompt, Message("assistant", answer)], add_generation_prompt=False).rstrip()
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    return ids[prompt_len:]
