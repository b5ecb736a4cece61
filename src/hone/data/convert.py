"""`hone data convert`: turn records of one shape into another, without a model.

    --to qa          documents with FAQ structure ("Q: ... A: ...", markdown headings that are questions,
                     "**Question?**" lines) -> {"messages": [user q, assistant a]}, one per question.
                     A document with no such structure is rejected `no_qa_structure` (use `hone data synth`).
    --to chunks      documents -> overlapping, size-bounded {"text"} chunks for continued pretraining
                     (see chunk.py); meta holds the chunk index and character offsets.
    --to chat        e-mail / Slack / ticket messages (records with meta.thread, meta.from or meta.user,
                     meta.date or meta.ts) -> one {"messages"} conversation per thread; `--agent` names the
                     people who are `assistant`, everyone else is `user`.
    --to routing     {"text", "label"} -> {"messages": [system listing the labels, user text, assistant label]}.
    --to preference  {"prompt", "answer", "rating"} -> {"prompt", "chosen", "rejected"} pairs per prompt.

**Counts.** Every input record is either passed or rejected. qa/chunks/routing work record by record.
chat and preference *group* records (by thread, by prompt) and so cannot emit until the whole input is
read: they read the input twice. The first pass keeps, per group, only what the output needs (each
record's text, author/rating, time and provenance — not the records themselves); the second pass streams
the records through `run_stage` again, emitting each group's output at the group's first record and
passing the other members with no output of their own. So memory grows with the total *text* of the input,
not with anything more, and `in == passed + rejected` holds per input record: a record passes when it is
part of an emitted conversation or pair; otherwise it is rejected with the reason (`no_agent_reply`,
`after_last_agent_reply`, `single_answer`, `no_margin`, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hone.data.chunk import chunk_text, load_size, read_documents
from hone.data.stage import Reject, StageReport, run_stage, where
from hone.records import Problem

DEFAULT_INSTRUCTION = ("Classify the customer message into exactly one of these categories: {labels}. "
                       "Answer with the category name only.")


class ConvertError(ValueError):
    """Options that cannot work together, phrased for the user."""


class ConvertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: Literal["qa", "chunks", "chat", "routing", "preference"] = Field(
        ..., description="Conversion: qa, chunks, chat, routing or preference (see `hone data convert --help`).")
    chunk_size: int = Field(1500, ge=1, description="chunks: largest chunk, in chunk_unit.")
    chunk_overlap: int = Field(200, ge=0, description="chunks: how much of a chunk's end the next chunk repeats.")
    chunk_unit: Literal["chars", "tokens"] = Field("chars", description="chunks: measure size in characters "
                                                   "or in tokens of `tokenizer`.")
    tokenizer: str = Field("smollm2-135m-instruct", description="chunks: model whose tokenizer counts tokens "
                           "when chunk_unit is tokens (the embedded model's name or a model directory).")
    agents: list[str] = Field(default_factory=list, description=(
        "chat: who answers as `assistant`: e-mail addresses, domains like @acme.com, or Slack user names/ids."))
    system: str | None = Field(None, description="chat: optional system prompt put first in each conversation.")
    instruction: str = Field(DEFAULT_INSTRUCTION, description=(
        "routing: system prompt; {labels} becomes the comma-separated label set."))
    labels: list[str] | None = Field(None, description=(
        "routing: the label set; other labels are rejected. Default: every label in the input, sorted."))
    prompt_field: str = Field("prompt", description="preference: field holding the prompt.")
    answer_fields: list[str] = Field(["answer", "completion"], description=(
        "preference: field(s) holding the answer; the first one present is used."))
    rating_field: str = Field("rating", description="preference: field holding the answer's numeric rating.")
    pairs: Literal["best_worst", "all"] = Field("best_worst", description=(
        "preference: one pair per prompt (best vs worst) or every pair whose ratings differ by min_margin."))
    min_margin: float = Field(0.0, ge=0, description=(
        "preference: smallest rating difference for a pair; equal ratings never make a pair."))


def convert(inputs: list[Path], out: Path, options: ConvertOptions) -> StageReport:
    """Run the conversion `options.to` over `inputs` (record files, or .md/.txt files and folders)."""
    config = {"stage": "convert", **options.model_dump()}
    stats: dict[str, int] = {}
    if options.to == "qa":
        transform: Callable = lambda r: qa_records(r, stats)
    elif options.to == "chunks":
        size = load_size(options.chunk_unit, options.tokenizer)
        transform = lambda r: chunk_records(r, options.chunk_size, options.chunk_overlap, size)
    elif options.to == "routing":
        labels = options.labels or sorted(_all_labels(inputs))
        transform = lambda r: routing_record(r, options.instruction, labels, fixed=bool(options.labels))
        stats["labels"] = len(labels)
    elif options.to == "chat":
        if not options.agents:
            raise ConvertError("--to chat needs at least one --agent (an e-mail, @domain, or Slack user) to "
                             "tell the assistant's turns from the customer's")
        transform = _grouped(inputs, lambda r: thread_member(r, options.agents),
                             lambda members: build_conversation(members, options.system), stats)
    else:
        transform = _grouped(inputs, lambda r: rated_answer(r, options),
                             lambda members: preference_pairs(members, options.pairs, options.min_margin), stats)
    return run_stage("convert", read_documents(inputs), out, transform, config=config, inputs=inputs,
                     details=lambda: {"to": options.to, **stats})


# --- qa: FAQ structure -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    offset: int  # character offset of the question in the document


_Q_LINE = re.compile(r"^\s*(?:Q|Question)\s*[:.)]\s*(?P<q>\S.*)$", re.IGNORECASE)
_A_LINE = re.compile(r"^\s*(?:A|Answer)\s*[:.)]\s*(?P<a>.*)$", re.IGNORECASE)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(?P<h>.*?)\s*#*\s*$")
_BOLD_Q = re.compile(r"^\s*(?:\*\*|__)(?P<q>[^*_].*?\?)\s*(?:\*\*|__)\s*(?P<rest>.*)$")


def extract_qa(text: str) -> list[QA]:
    """The question/answer pairs of a FAQ-structured document, in order; questions with no answer text are
    left out. A section ends at the next question or the next markdown heading."""
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    starts = [(i, kind, q) for i, line in enumerate(lines) for kind, q in [_question_start(line)] if kind]
    bounds = [i for i, line in enumerate(lines) if _HEADING.match(line) or _question_start(line)[0]]
    pairs = []
    for i, kind, question in starts:
        end = next((b for b in bounds if b > i), len(lines))
        body = [line.rstrip("\n") for line in lines[i + 1:end]]
        if kind == "bold":
            body.insert(0, _BOLD_Q.match(lines[i]).group("rest"))
        if kind == "q":
            question, body = _split_at_answer(question, body)
        answer = _tidy("\n".join(body))
        if answer:
            pairs.append(QA(_tidy(question), answer, offsets[i]))
    return pairs


def _question_start(line: str) -> tuple[str | None, str]:
    if m := _Q_LINE.match(line):
        return "q", m.group("q")
    if (m := _HEADING.match(line)) and m.group("h").rstrip("*_ ").endswith("?"):
        return "heading", m.group("h").strip("*_ ")
    if m := _BOLD_Q.match(line):
        return "bold", m.group("q")
    return None, ""


def _split_at_answer(question: str, body: list[str]) -> tuple[str, list[str]]:
    """'Q:' sections: lines before the 'A:' line continue the question; without an 'A:' all is answer."""
    for k, line in enumerate(body):
        if m := _A_LINE.match(line):
            return " ".join([question, *(b.strip() for b in body[:k] if b.strip())]), [m.group("a"), *body[k + 1:]]
    return question, body


def _tidy(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def qa_records(record: dict, stats: dict[str, int] | None = None) -> list[dict] | Reject:
    """One chat record per FAQ question of a `{"text"}` document, or Reject `no_qa_structure`."""
    text = _document_text(record)
    if isinstance(text, Reject):
        return text
    pairs = extract_qa(text)
    if not pairs:
        return Reject("no_qa_structure", f"{where(record)}: no FAQ structure found (Q:/A: lines, question "
                      "headings, **Question?** lines); to write questions for free text use `hone data synth`")
    if stats is not None:
        stats["qa_pairs"] = stats.get("qa_pairs", 0) + len(pairs)
    prov = record.get("provenance") or {}
    return [{"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}],
             "meta": {**(record.get("meta") or {}), "qa_index": i, "qa_offset": p.offset},
             "provenance": {**prov, "qa": i}} for i, p in enumerate(pairs)]


def _document_text(record: dict) -> str | Reject:
    text = record.get("text")
    if not isinstance(text, str):
        return Reject("not_a_document", f"{where(record)}: expected a document with a 'text' string, found keys "
                      f"{', '.join(sorted(k for k in record if k != 'provenance')) or 'none'}")
    if not text.strip():
        return Reject("empty", f"{where(record)}: document text is empty")
    return text


# --- chunks ----------------------------------------------------------------------------------------------

def chunk_records(record: dict, max_size: int, overlap: int, size: Callable[[str], int] = len
                  ) -> list[dict] | Reject:
    """`{"text"}` records, one per chunk of the document, with chunk index and offsets in meta."""
    text = _document_text(record)
    if isinstance(text, Reject):
        return text
    chunks = chunk_text(text, max_size=max_size, overlap=min(overlap, max_size - 1), size=size)
    meta, prov = record.get("meta") or {}, record.get("provenance") or {}
    return [{"text": c.text, "meta": {**meta, "chunk": c.index, "chunks": len(chunks), "chunk_start": c.start,
                                      "chunk_end": c.end},
             "provenance": {**prov, "chunk": c.index}} for c in chunks]


# --- routing ---------------------------------------------------------------------------------------------

def _all_labels(inputs: list[Path]) -> set[str]:
    return {str(r["label"]).strip() for r in read_documents(inputs)
            if not isinstance(r, Problem) and isinstance(r.get("label"), (str, int)) and str(r["label"]).strip()}


def routing_record(record: dict, instruction: str, labels: list[str], *, fixed: bool = True
                   ) -> list[dict] | Reject:
    """`{"text","label"}` -> system (instruction with the label set), user text, assistant label."""
    text, label = record.get("text"), record.get("label")
    if not isinstance(text, str) or not text.strip():
        return Reject("not_labeled", f"{where(record)}: routing needs a non-empty 'text' string")
    if not isinstance(label, (str, int)) or isinstance(label, bool) or not str(label).strip():
        return Reject("not_labeled", f"{where(record)}: routing needs a 'label' (string or integer)")
    label = str(label).strip()
    if label not in labels:
        hint = "given with --labels" if fixed else "found"
        return Reject("unknown_label", f"{where(record)}: label '{label}' is not one of the labels {hint}: "
                      f"{', '.join(labels)}")
    system = instruction.replace("{labels}", ", ".join(labels))
    return [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": text},
                          {"role": "assistant", "content": label}],
             "label": label, "meta": record.get("meta") or {}, "provenance": record.get("provenance") or {}}]


# --- grouping (chat, preference): two passes, see the module docstring -------------------------------------

@dataclass
class Member:
    """What a grouping conversion keeps of one record: its position in the stream and the few fields used."""

    index: int
    text: str
    provenance: dict
    turns: list[tuple[str, str]] = field(default_factory=list)  # chat: (role, text) in order
    time: float | None = None
    rating: float = 0.0  # preference
    prompt: str = ""
    author: str | None = None  # chat: who wrote it (meta.from / user_name ...), kept for redaction


GroupResult = tuple[list[dict], dict[int, Reject]]


def _grouped(inputs: list[Path], member_of: Callable[[dict], tuple[str, Member] | Reject],
             build: Callable[[list[Member]], GroupResult], stats: dict[str, int]) -> Callable:
    """Pass 1 over `inputs`: group members and build each group's output. Returns pass 2's transform."""
    groups: dict[str, list[Member]] = {}
    refused: dict[int, Reject] = {}
    for index, record in enumerate(r for r in read_documents(inputs) if not isinstance(r, Problem)):
        found = member_of(record)
        if isinstance(found, Reject):
            refused[index] = found
            continue
        key, member = found
        member.index = index
        groups.setdefault(key, []).append(member)
    emit_at: dict[int, list[dict]] = {}
    for members in groups.values():
        produced, rejects = build(members)
        refused.update(rejects)
        if produced:
            emit_at[members[0].index] = produced
    stats.update(groups=len(groups), groups_emitted=len(emit_at))
    position = iter(range(1 << 62))

    def transform(record: dict) -> list[dict] | Reject:
        index = next(position)  # run_stage calls us once per record, in the same order as pass 1
        return refused.get(index) or emit_at.get(index, [])

    return transform


# --- chat ------------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"[\w.+'-]+@[\w-]+(?:\.[\w-]+)+")
_AUTHOR_KEYS = ("from", "user", "user_name", "user_id", "author", "email", "sender")


def is_agent(meta: dict, agents: list[str]) -> bool:
    """Whether a message's author (meta.from / meta.user / ...) is one of `agents`: an e-mail address,
    a domain written '@acme.com', or a Slack user name or id (case-insensitive)."""
    names = [str(meta[k]).strip().lower() for k in _AUTHOR_KEYS if meta.get(k) not in (None, "")]
    emails = [e.lower() for n in names for e in _EMAIL.findall(n)]
    for agent in (a.strip().lower() for a in agents):
        if agent.startswith("@") and any(e.endswith(agent) for e in emails):
            return True
        if agent in emails or agent in names:
            return True
    return False


def parse_time(value: Any) -> float | None:
    """Seconds since the epoch from a Slack ts ("1712.0001"), a number, an RFC 2822 or ISO 8601 date."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    for parse in (parsedate_to_datetime, lambda v: datetime.fromisoformat(v.replace("Z", "+00:00"))):
        try:
            dt = parse(value)
        except (TypeError, ValueError, IndexError):
            continue
        return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    return None


_TIME_KEYS = ("date", "ts", "created_at", "time", "timestamp")


def thread_member(record: dict, agents: list[str]) -> tuple[str, Member] | Reject:
    """A thread message: `{"text"}` (role from its author: `agents` -> assistant, others -> user), or a
    `{"messages"}` record such as a ticket row with question and answer (its roles are kept)."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    thread = meta.get("thread")
    if thread in (None, ""):
        return Reject("no_thread", f"{where(record)}: no meta.thread; run `hone data ingest` on the mbox, "
                      "Slack export or tickets so messages carry their thread")
    text, messages = record.get("text"), record.get("messages")
    if isinstance(messages, list):
        turns = [(m["role"], m["content"].strip()) for m in messages if isinstance(m, dict)
                 and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
                 and m["content"].strip()]
    elif isinstance(text, str):
        turns = [("assistant" if is_agent(meta, agents) else "user", text.strip())] if text.strip() else []
    else:
        turns = []
    if not turns:
        return Reject("empty", f"{where(record)}: message has no 'text' (or no user/assistant 'messages')")
    when = next((t for t in (parse_time(meta.get(k)) for k in _TIME_KEYS) if t is not None), None)
    author = next((str(meta[k]) for k in ("from", "user_name", "user", "author", "sender") if meta.get(k)), None)
    return str(thread), Member(0, turns[0][1], record.get("provenance") or {}, turns=turns, time=when,
                               author=author)


def build_conversation(members: list[Member], system: str | None = None) -> GroupResult:
    """One thread's messages -> a conversation: ordered by time (input order when any time is missing),
    starting at the first customer turn, ending at the last agent reply, consecutive same-role turns merged.
    Records wholly outside that span are rejected with the reason."""
    if all(m.time is not None for m in members):
        members = sorted(members, key=lambda m: (m.time, m.index))
    turns = [(k, role, text) for k, m in enumerate(members) for role, text in m.turns]
    last = max((i for i, t in enumerate(turns) if t[1] == "assistant"), default=None)
    first = next((i for i, t in enumerate(turns) if t[1] == "user"), None)
    if last is None or first is None or first > last:
        code, why = (("no_agent_reply", "no reply from an agent (--agent)") if last is None else
                     ("no_customer_message", "no customer message before the agents' last reply"))
        return [], {m.index: Reject(code, f"{_where(m)}: thread has {why}") for m in members}
    used = sorted({k for k, _, _ in turns[first:last + 1]})
    rejects = {}
    for k, m in enumerate(members):
        if k < used[0]:
            rejects[m.index] = Reject("agent_before_customer", f"{_where(m)}: agent message before the "
                                      "customer's first message (a conversation starts with the user)")
        elif k > used[-1]:
            rejects[m.index] = Reject("after_last_agent_reply", f"{_where(m)}: customer message after the "
                                      "last agent reply (a conversation must end with the assistant)")
    messages: list[dict] = []
    for _, role, text in turns[first:last + 1]:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    record = {"messages": ([{"role": "system", "content": system}] if system else []) + messages,
              "meta": {"thread_records": len(used), "turns": len(messages),
                       "sources": [_where(members[k]) for k in used],
                       # who took part: `hone data redact` learns these names and finds them in the text
                       "participants": sorted({members[k].author for k in used if members[k].author})},
              "provenance": members[used[0]].provenance}
    return [record], rejects


def _where(m: Member) -> str:
    return where({"provenance": m.provenance})


# --- preference ------------------------------------------------------------------------------------------

def rated_answer(record: dict, options: ConvertOptions) -> tuple[str, Member] | Reject:
    prompt = record.get(options.prompt_field)
    if not isinstance(prompt, str) or not prompt.strip():
        return Reject("missing_field", f"{where(record)}: no '{options.prompt_field}' string")
    answer = next((record[f] for f in options.answer_fields if isinstance(record.get(f), str)), None)
    if answer is None or not answer.strip():
        return Reject("missing_field", f"{where(record)}: no answer in {', '.join(options.answer_fields)}")
    raw = record.get(options.rating_field)
    try:
        rating = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        rating = math.nan
    if not math.isfinite(rating):
        return Reject("bad_rating", f"{where(record)}: '{options.rating_field}' must be a number, found {raw!r}")
    return prompt.strip(), Member(0, answer, record.get("provenance") or {}, rating=rating, prompt=prompt)


def preference_pairs(members: list[Member], mode: str = "best_worst", min_margin: float = 0.0) -> GroupResult:
    """Pairs for one prompt's rated answers: best vs worst, or every pair with margin >= min_margin (> 0)."""
    if len(members) < 2:
        m = members[0]
        return [], {m.index: Reject("single_answer", f"{_where(m)}: only one rated answer for this prompt")}
    ranked = sorted(members, key=lambda m: (-m.rating, m.index))
    if mode == "best_worst":
        candidates = [(ranked[0], ranked[-1])]
    else:
        candidates = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
    pairs = [(a, b) for a, b in candidates if a.rating - b.rating > 0 and a.rating - b.rating >= min_margin]
    used = {m.index for pair in pairs for m in pair}
    rejects = {}
    for m in members:
        if m.index not in used:
            code = "middle_rating" if mode == "best_worst" and pairs else "no_margin"
            why = ("neither the best nor the worst rating for its prompt" if code == "middle_rating" else
                   f"no other answer's rating differs from {m.rating:g} by more than 0 and at least {min_margin:g}")
            rejects[m.index] = Reject(code, f"{_where(m)}: {why}")
    records = [{"prompt": a.prompt, "chosen": a.text, "rejected": b.text,
                "meta": {"chosen_rating": a.rating, "rejected_rating": b.rating, "rejected_from": _where(b)},
                "provenance": a.provenance} for a, b in pairs]
    return records, rejects
