"""What an exported chat model needs to behave like the trained one: its end-of-turn token, the token ids
that stop generation, the system prompt the run trained with, and the run's own held-out prompts.

The end-of-turn token is read from the chat template itself (render an assistant turn, see which special
token follows its content), so a template that ends turns with <|im_end|>, <|eot_id|> or <end_of_turn> is
handled alike, and the export stops where the trained model learnt to stop (template.py trains the
end-of-turn token as part of every answer).
"""

from __future__ import annotations

import json
from pathlib import Path

from hone.data.template import ensure_chat_template
from hone.records import Message

SENTINEL = "HONE-EXPORT-SENTINEL"


class ExportError(ValueError):
    """An export that cannot be made as asked, phrased for the user (exit code 2)."""


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant message, or None."""
    ensure_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}], tokenize=False)
    rest = text[text.find(SENTINEL) + len(SENTINEL):]
    specials = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    hits = [(rest.find(s), -len(s), s) for s in specials if s and rest.find(s) >= 0]
    if not hits:
        return None
    at, _, token = min(hits)
    return token if not rest[:at].strip() else None


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end an answer: the template's end-of-turn first, then the tokenizer's EOS and any EOS
    the model's generation config already named (hone's evaluation stops on the latter two)."""
    ids: list[int] = []
    eot = end_of_turn_token(tokenizer)
    eos = getattr(generation_config, "eos_token_id", None)
    for i in [tokenizer.convert_tokens_to_ids(eot) if eot else None, tokenizer.eos_token_id,
              *(eos if isinstance(eos, list) else [eos])]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def run_labels(run_dir: Path) -> list[str] | None:
    path = run_dir / "labels.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_system_prompt(run_dir: Path, cfg: dict) -> str | None:
    """The system message the run trained with: its instruction with the label list, for text+label data
    (the only shape where hone supplies one; chat data carries its own system messages, if any)."""
    from hone.data.validate import _render_instruction

    labels = run_labels(run_dir)
    if not labels:
        return None
    return _render_instruction(cfg["data"]["instruction"], labels)


def held_out_prompts(run_dir: Path, cfg: dict, n: int) -> list[list[Message]]:
    """Up to n prompts from the run's validation file (or its training file), exactly as evaluation renders
    them: these are the prompts the model learnt to answer and then stop on."""
    from hone.data.validate import validate_file

    data = cfg.get("data") or {}
    path = data.get("validation") or data.get("train")
    if not path or not Path(path).is_file():
        return []
    try:
        report = validate_file(path, instruction=data.get("instruction", ""), labels=run_labels(run_dir),
                               dedupe=False)
    except (ValueError, OSError):
        return []  # the data moved or changed shape since training: the built-in prompts still run
    prompts = []
    for conv in report.records:
        try:
            prompts.append(conv.prompt_messages())
        except ValueError:
            continue
        if len(prompts) >= n:
            break
    return prompts
