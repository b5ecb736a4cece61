"""Check rows from readers.py and turn the good ones into `Conversation`s; explain the bad ones.

Four input shapes are accepted (a row matching several takes the first in this order):

    chat         {"messages": [{"role", "content", "weight"?}, ...]}   (OpenAI fine-tuning format)
    completion   {"prompt", "completion", "system"?}
    instruction  {"instruction", "output", "input"?, "system"?}        (Alpaca)
    label        {"text", "label"}  -> system: the run's instruction with {labels} filled in

Every rejected row becomes one `Problem` with a stable code (tests and tools match on it), the row's
line, and a message saying what to fix: not_utf8, invalid_json, not_an_object, invalid_csv (from the
reader), unknown_shape, missing_field, bad_type, empty_content, unknown_role, no_assistant_turn,
bad_weight, duplicate, unknown_label. One bad row never affects another. Keys a shape does not use
("id", "metadata", ...) are kept in `Conversation.meta`.

    report = validate_file("train.jsonl", instruction=cfg.data.instruction)
    print(format_problems(report.problems))
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hone.data.readers import clip_raw, json_type, read_rows
from hone.records import ROLES, Conversation, Message, Problem

# (shape, required keys, optional keys), in the order a row matching several shapes is read as.
SHAPES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("chat", ("messages",), ()),
    ("completion", ("prompt", "completion"), ("system",)),
    ("instruction", ("instruction", "output"), ("input", "system")),
    ("label", ("text", "label"), ()),
)
_ACCEPTED = ("accepted shapes: {messages}, {prompt, completion}, {instruction, output, input?}, "
             "{text, label}")
_MAX_LISTED = 12  # keys or labels named in one message before "... (N more)"


@dataclass
class ValidationReport:
    source: str
    records: list[Conversation]
    problems: list[Problem]
    rows: int                 # records read (good + bad)
    shapes: dict[str, int]    # accepted records per shape
    labels: list[str]         # label set used for text+label rows (sorted when inferred), [] if none


class _Bad(Exception):
    """One row's first problem; raised by the field checks, caught once per row."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def validate_file(path: str | Path, *, instruction: str, labels: list[str] | None = None,
                  dedupe: bool = True) -> ValidationReport:
    """Read and validate one data file. File-level problems raise readers.DataError."""
    return validate_rows(read_rows(path), str(path), instruction=instruction, labels=labels, dedupe=dedupe)


def validate_rows(rows: Iterable[tuple[int, dict | Problem]], source: str, *, instruction: str,
                  labels: list[str] | None = None, dedupe: bool = True) -> ValidationReport:
    """Validate `(line, row)` pairs as `read_rows` yields them.

    `labels` fixes the label set for text+label rows (rows with another label are rejected as
    unknown_label); without it the set is the sorted unique labels of the well-formed label rows,
    so those are collected first and rendered once the set is known. An empty list counts as not given.
    """
    source = str(source)
    problems: list[Problem] = []
    accepted: list[tuple[Conversation, dict]] = []  # the row is kept only to show it if rejected later
    count = 0
    for line, row in rows:
        count += 1
        if isinstance(row, Problem):
            problems.append(row)
            continue
        try:
            accepted.append((_convert(row, line, source), row))
        except _Bad as bad:
            problems.append(Problem(source, line, bad.code, bad.message, raw=_raw(row)))
    label_set = _unique([_clean_label(x) for x in labels]) if labels else _inferred_labels(accepted)
    accepted = _render_labels(accepted, instruction, label_set, fixed=bool(labels), problems=problems)
    if dedupe:
        accepted = _drop_duplicates(accepted, problems)
    records = [conv for conv, _ in accepted]
    problems.sort(key=lambda p: p.line)  # stable: problems from one line keep their order
    shapes = dict(Counter(r.shape for r in records))
    has_label_rows = labels or any(r.shape == "label" for r in records)
    return ValidationReport(source, records, problems, count, shapes, label_set if has_label_rows else [])


def format_problems(problems: list[Problem], limit: int = 20) -> str:
    """`file:line: [code] message` for the first `limit` problems, then a count of the rest by code."""
    lines = [str(p) for p in problems[:max(limit, 0)]]
    rest = problems[max(limit, 0):]
    if rest:
        counts = sorted(Counter(p.code for p in rest).items(), key=lambda kv: (-kv[1], kv[0]))
        codes = ", ".join(f"{code}×{n}" for code, n in counts)
        lines.append(f"... and {len(rest)} more (codes: {codes})")
    return "\n".join(lines)


def write_rejects(path: str | Path, problems: list[Problem]) -> None:
    """Write one JSON object per problem (source, line, code, message, raw) to a JSONL file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps(problem.to_json(), ensure_ascii=False) + "\n")


# --- one row -> one Conversation -------------------------------------------------------------------------

def _convert(row: dict, line: int, source: str) -> Conversation:
    shape, used = _detect_shape(row)
    label = None
    if shape == "chat":
        messages = _chat_messages(row["messages"])
    elif shape == "completion":
        messages = _with_system(row, [Message("user", _text(row, "prompt")),
                                      Message("assistant", _text(row, "completion"))])
    elif shape == "instruction":
        messages = _with_system(row, [Message("user", _instruction_prompt(row)),
                                      Message("assistant", _text(row, "output"))])
    else:
        # The system message waits for the label set (_render_labels); it depends on the whole file.
        label = _label(row["label"])
        messages = [Message("user", _text(row, "text")), Message("assistant", label)]
    meta = {k: v for k, v in row.items() if k not in used}
    return Conversation(messages, source=source, line=line, label=label, shape=shape, meta=meta)


def _detect_shape(row: dict) -> tuple[str, tuple[str, ...]]:
    """The first shape whose required keys are all present; else say what is missing or found."""
    present = {k for k, v in row.items() if v is not None}
    for shape, required, optional in SHAPES:
        if all(k in present for k in required):
            return shape, required + optional
    if "chosen" in present and "rejected" in present:
        raise _Bad("unknown_shape", "this is a preference pair (chosen / rejected), which supervised "
                                    "fine-tuning cannot use: set method to dpo, orpo, simpo or reward")
    # No complete shape: a partly present one is most likely what the user meant.
    for shape, required, _ in SHAPES:
        have = [k for k in required if k in present]
        if have:
            missing = [k for k in required if k not in present]
            raise _Bad("missing_field", f"missing '{missing[0]}': a row with '{have[0]}' is a {shape} row, "
                                        f"which needs {' and '.join(repr(k) for k in required)}")
    found = _listing(sorted(present)) if present else "none"
    raise _Bad("unknown_shape", f"row matches no accepted shape; keys found: {found}; {_ACCEPTED}")


def _chat_messages(value: Any) -> list[Message]:
    if not isinstance(value, list):
        raise _Bad("bad_type", f"messages must be an array of {{role, content}} objects, found {json_type(value)}")
    if not value:
        raise _Bad("empty_content", "messages is an empty array")
    messages = [_message(m, f"messages[{i}]") for i, m in enumerate(value)]
    if not any(m.role == "assistant" for m in messages):
        roles = ", ".join(m.role for m in messages)
        raise _Bad("no_assistant_turn", f"no assistant message (roles: {roles}); "
                                        "an example needs at least one assistant reply to learn from")
    return messages


def _message(m: Any, path: str) -> Message:
    if not isinstance(m, dict):
        raise _Bad("bad_type", f"{path} must be an object with role and content, found {json_type(m)}")
    for key in ("role", "content"):
        if m.get(key) is None:
            raise _Bad("missing_field", f"{path}.{key} is missing")
    role = m["role"]
    if not isinstance(role, str):
        raise _Bad("bad_type", f"{path}.role must be a string, found {json_type(role)}")
    if role not in ROLES:
        hint = f" (did you mean '{role.strip().lower()}'?)" if role.strip().lower() in ROLES else ""
        raise _Bad("unknown_role", f"{path}.role is '{role}'{hint}; allowed roles: {', '.join(ROLES)}")
    content = _check_text(m["content"], f"{path}.content")
    return Message(role, content, _weight(m.get("weight"), role, f"{path}.weight"))


def _weight(value: Any, role: str, path: str) -> float | None:
    """OpenAI semantics: 0 leaves an assistant message out of the loss, 1 keeps it in; nothing else."""
    if value is None:
        return None
    if role != "assistant":
        raise _Bad("bad_weight", f"{path} is set on a {role} message; weight is allowed only on assistant messages")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise _Bad("bad_weight", f"{path} must be 0 or 1, found {json.dumps(value, default=str)}")
    return float(value)


def _text(row: dict, key: str) -> str:
    return _check_text(row[key], key)


def _check_text(value: Any, path: str) -> str:
    """A required text field: a non-blank string, kept exactly as written (whitespace is data)."""
    if not isinstance(value, str):
        raise _Bad("bad_type", f"{path} must be a string, found {json_type(value)}")
    if not value.strip():
        raise _Bad("empty_content", f"{path} is empty")
    return value


def _optional_text(row: dict, key: str) -> str | None:
    """An optional text field (system, input): absent, null or blank all mean "not given"."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Bad("bad_type", f"{key} must be a string, found {json_type(value)}")
    return value if value.strip() else None


def _with_system(row: dict, messages: list[Message]) -> list[Message]:
    system = _optional_text(row, "system")
    return ([Message("system", system)] if system else []) + messages


def _instruction_prompt(row: dict) -> str:
    instruction = _text(row, "instruction")
    extra = _optional_text(row, "input")
    return f"{instruction}\n\n{extra}" if extra else instruction


def _label(value: Any) -> str:
    """Labels are strings; integer labels (and integral floats, as pandas writes ints with gaps) convert."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Bad("bad_type", f"label must be a string or an integer, found {json_type(value)}")
    label = _clean_label(value)
    if not label:
        raise _Bad("empty_content", "label is empty")
    return label


def _clean_label(value: Any) -> str:
    # Stray spaces around a label ("billing ") would otherwise make a second, different class.
    return str(value).strip()


# --- whole-file steps ------------------------------------------------------------------------------------

def _inferred_labels(accepted: list[tuple[Conversation, dict]]) -> list[str]:
    return sorted({conv.label for conv, _ in accepted if conv.shape == "label" and conv.label is not None})


def _render_labels(accepted: list[tuple[Conversation, dict]], instruction: str, label_set: list[str],
                   fixed: bool, problems: list[Problem]) -> list[tuple[Conversation, dict]]:
    """Give each label row its system message; with a fixed label set, reject labels outside it."""
    system = _render_instruction(instruction, label_set)
    known = set(label_set)
    kept = []
    for conv, row in accepted:
        if conv.shape == "label":
            if fixed and conv.label not in known:
                problems.append(Problem(conv.source, conv.line, "unknown_label",
                                        f"label '{conv.label}' is not one of the {len(label_set)} known labels: "
                                        f"{_listing(label_set)}", raw=_raw(row)))
                continue
            if system:
                conv.messages.insert(0, Message("system", system))
        kept.append((conv, row))
    return kept


def _render_instruction(instruction: str, label_set: list[str]) -> str:
    joined = ", ".join(label_set)
    try:
        return instruction.format(labels=joined)
    except (KeyError, IndexError, ValueError):
        # Other braces (a JSON example in the instruction, say) are text, not placeholders.
        return instruction.replace("{labels}", joined)


def _drop_duplicates(accepted: list[tuple[Conversation, dict]],
                     problems: list[Problem]) -> list[tuple[Conversation, dict]]:
    """Reject exact repeats of an earlier accepted record (same roles and stripped contents)."""
    first_line: dict[bytes, int] = {}
    kept = []
    for conv, row in accepted:
        key = json.dumps([[m.role, m.content.strip()] for m in conv.messages], ensure_ascii=False)
        # A digest, not the text: a large file's contents need not be held twice.
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
        if digest in first_line:
            problems.append(Problem(conv.source, conv.line, "duplicate",
                                    f"exact duplicate of line {first_line[digest]} (same messages after "
                                    "stripping whitespace); set data.dedupe: false to keep duplicates",
                                    raw=_raw(row)))
            continue
        first_line[digest] = conv.line
        kept.append((conv, row))
    return kept


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _listing(items: list[str]) -> str:
    shown = ", ".join(str(x) for x in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def _raw(row: dict) -> str:
    return clip_raw(json.dumps(row, ensure_ascii=False, default=str))
