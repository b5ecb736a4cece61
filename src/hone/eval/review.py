"""`hone review RUN_A RUN_B --data FILE`: blind side-by-side human review in the terminal.

For each prompt in FILE both models answer (greedy; answers cached in `<out>.answers.jsonl`, so a resumed
session never regenerates), and the reviewer sees the prompt and the two answers as A and B, in an order
drawn per item from a seeded RNG, so neither the position nor the run gives the answer away. Keys: a / b (that
one is better), t (tie), x (both bad), n (add a note first), q (quit). Every judgement is appended to the
results file (JSON Lines) at once, so quitting or a crash loses nothing, and a re-run skips judged items.

    results row: {"id", "prompt", "messages", "run_a", "run_b", "shown_as_a": "run_a" | "run_b",
                  "choice": what was pressed (a, b, tie, both_bad), "winner": run_a | run_b | tie | both_bad,
                  "note", "time", "answer_run_a", "answer_run_b"}

The summary is RUN_B's win rate over RUN_A among decisive judgements with a 95% Wilson interval, plus ties
and both-bad counts. `export_pairs` turns decisive judgements into {"prompt", "chosen", "rejected"} rows that
`method: dpo` (and orpo, simpo, reward) reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.columns import Columns
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from hone.records import Message

KEYS = {"a": "a", "b": "b", "t": "tie", "x": "both_bad"}
QUIT_KEYS = ("q", "", "\x03", "\x04")  # q, end of input, Ctrl-C, Ctrl-D
HELP = "[a] A is better  [b] B is better  [t] tie  [x] both bad  [n] add a note  [q] quit"


class ReviewError(ValueError):
    """A review that cannot go on as asked (phrased for the user; exit code 2)."""


@dataclass
class Item:
    id: str
    messages: list[Message]   # what both models are given

    @property
    def prompt(self) -> str:
        """The text a reviewer reads first: the last user message."""
        return next((m.content for m in reversed(self.messages) if m.role == "user"), self.messages[-1].content)


# --- reading prompts -----------------------------------------------------------------------------------


def read_items(path: Path, limit: int | None = None) -> list[Item]:
    """Prompts from a data file: any record hone trains on (the conversation before its last answer), a
    preference pair (its prompt), or {"prompt": text or messages} alone. Bad lines stop with file:line."""
    from hone.config import DataConfig
    from hone.data.readers import read_rows
    from hone.data.validate import validate_rows
    from hone.records import Problem
    from hone.train.prepare import DataProblems

    items, problems, others = [], [], []
    for line, row in read_rows(path):
        if isinstance(row, Problem):
            problems.append(row)
            continue
        try:
            messages = _prompt_only(row)
        except ValueError as e:
            problems.append(Problem(str(path), line, "bad_prompt", str(e)))
            continue
        if messages is None:
            others.append((line, row))
        else:
            items.append((line, _item(row, messages)))
    if others:
        report = validate_rows(others, str(path), instruction=DataConfig.model_fields["instruction"].default,
                               dedupe=False)
        problems += report.problems
        items += [(c.line, _item(c.meta, c.prompt_messages())) for c in report.records]
    if problems:
        raise DataProblems(sorted(problems, key=lambda p: p.line), "Fix these lines before reviewing.")
    unique: dict[str, Item] = {}
    for _, item in sorted(items, key=lambda x: x[0]):
        unique.setdefault(item.id, item)  # the same prompt twice is judged once
    out = list(unique.values())
    if not out:
        raise ReviewError(f"{path}: no prompts to review")
    return out[:limit] if limit else out


def _prompt_only(row: dict) -> list[Message] | None:
    """Messages for a prompt-only or preference row; None for the shapes validate.py reads."""
    from hone.methods import RowError
    from hone.methods.pairs import chat_messages, parse_pair

    if "chosen" in row and "rejected" in row:
        try:
            return list(parse_pair(row).prompt)
        except RowError as e:
            raise ValueError(e.message) from None
    if "prompt" not in row or "completion" in row:
        return None
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("'prompt' is empty")
        system = row.get("system")
        return ([Message("system", system)] if isinstance(system, str) and system else []) + [Message("user", prompt)]
    try:
        messages = chat_messages(prompt, "prompt")
    except RowError as e:
        raise ValueError(e.message) from None
    if messages[-1].role == "assistant":
        raise ValueError("'prompt' ends with an assistant message; the models have nothing to answer")
    return messages


def _item(row: dict, messages: list[Message]) -> Item:
    rid = row.get("id")
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid):
        return Item(str(rid), messages)
    digest = hashlib.sha256(json.dumps([[m.role, m.content] for m in messages]).encode()).hexdigest()
    return Item(digest[:12], messages)


# --- answers (generated once, cached beside the results) -------------------------------------------------


def model_key(model: str) -> str:
    """A model's identity in files: the resolved path for local ones, the name otherwise."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def answers_path(results: Path) -> Path:
    """The answer cache beside the results file: review.jsonl -> review.answers.jsonl."""
    return results.with_name(results.stem + ".answers.jsonl")


def generate_with_hone(model: str, prompts: list[list[Message]], max_new_tokens: int) -> list[str]:
    """Greedy answers from any model load_model accepts (run dir, embedded name, HF dir, .gguf)."""
    from hone.eval.runners import generate
    from hone.models.load import load_model

    loaded = load_model(model)
    return generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens)


def ensure_answers(items: list[Item], models: list[str], cache: Path, max_new_tokens: int,
                   generate_fn: Callable[[str, list[list[Message]], int], list[str]] = generate_with_hone,
                   echo: Callable[[str], None] = lambda m: None) -> dict[tuple[str, str], str]:
    """{(model key, item id): answer} for every item and model, generating only what the cache lacks."""
    cached: dict[tuple[str, str], str] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                cached[(row["model"], row["id"])] = row["answer"]
    for model in models:
        key = model_key(model)
        missing = [it for it in items if (key, it.id) not in cached]
        if not missing:
            continue
        echo(f"generating {len(missing)} answer(s) with {model}")
        answers = generate_fn(model, [it.messages for it in missing], max_new_tokens)
        with cache.open("a", encoding="utf-8") as f:
            for it, answer in zip(missing, answers):
                cached[(key, it.id)] = answer
                f.write(json.dumps({"model": key, "id": it.id, "answer": answer}, ensure_ascii=False) + "\n")
    return cached


# --- the session -----------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_same_runs(results: list[dict], run_a: str, run_b: str, path: Path) -> None:
    for r in results:
        if (r["run_a"], r["run_b"]) != (run_a, run_b):
            raise ReviewError(f"{path} holds judgements of {r['run_a']} vs {r['run_b']}, not {run_a} vs {run_b}; "
                              "give another --out (keep RUN_A and RUN_B in the same order to resume)")


def a_is_run_a(item_id: str, seed: int) -> bool:
    """Which run is shown as A: a coin flip seeded per item, the same every session."""
    return random.Random(f"{seed}:{item_id}").random() < 0.5


def terminal_key() -> str:
    """One key press (no Enter) in a terminal; one character of piped input otherwise."""
    import click

    if not sys.stdin.isatty():
        return sys.stdin.read(1)
    try:
        return click.getchar()
    except (KeyboardInterrupt, EOFError):
        return "\x03"


def terminal_note() -> str:
    import click

    try:
        return click.prompt("note", default="", show_default=False)
    except (click.Abort, EOFError):
        return ""


def review_session(items: list[Item], answers: dict, run_a: str, run_b: str, results_path: Path, *,
                   seed: int = 0, console: Console | None = None, read_key: Callable[[], str] = terminal_key,
                   read_note: Callable[[], str] = terminal_note) -> int:
    """Show every not-yet-judged item and record the reviewer's key; returns how many were judged now."""
    console = console or Console()
    ka, kb = model_key(run_a), model_key(run_b)
    done = {r["id"] for r in read_results(results_path)}
    todo = [it for it in items if it.id not in done]
    console.print(f"{len(done)} judged, {len(todo)} to go. {HELP}", style="dim", highlight=False, markup=False)
    judged = 0
    for n, item in enumerate(todo, len(done) + 1):
        first_is_a = a_is_run_a(item.id, seed)
        shown = (answers[(ka, item.id)], answers[(kb, item.id)])
        show_item(console, item, shown if first_is_a else shown[::-1], n, len(items))
        start = time.time()
        choice, note = ask(console, read_key, read_note)
        if choice is None:
            break
        record = judgement(item, choice, note, first_is_a, run_a, run_b, shown, time.time() - start)
        with results_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        judged += 1
    return judged


def show_item(console: Console, item: Item, answers: tuple[str, str], n: int, total: int) -> None:
    console.rule(f"item {n} of {total} ({item.id})")
    context = [m for m in item.messages if m is not item.messages[-1]]
    if context:
        console.print(Text("\n".join(f"{m.role}: {m.content}" for m in context)), style="dim")
    console.print(Panel(Text(item.prompt), title="prompt", title_align="left"))
    console.print(Columns([Panel(Text(answers[0] or "(empty)"), title="A", width=max(30, console.width // 2 - 1)),
                           Panel(Text(answers[1] or "(empty)"), title="B", width=max(30, console.width // 2 - 1))]))


def ask(console: Console, read_key, read_note) -> tuple[str | None, str]:
    """(choice, note) from key presses; (None, note) when the reviewer quits."""
    note = ""
    while True:
        console.print("a / b / t / x, n note, q quit > ", end="", highlight=False, markup=False)
        raw = read_key()
        # A terminal read can return several characters at once (a paste, an arrow key's escape sequence):
        # judge by the first, and never take an escape sequence for a choice.
        key = "?" if raw.startswith("\x1b") else raw[:1].lower()
        if key in ("\n", "\r", " ", "\t"):
            continue
        console.print(key if key.isprintable() else "")
        if key in QUIT_KEYS:
            return None, note
        if key == "n":
            note = read_note().strip()
            continue
        if key in KEYS:
            return KEYS[key], note
        console.print(f"unknown key {key!r}. {HELP}", style="yellow", highlight=False, markup=False)


def judgement(item: Item, choice: str, note: str, first_is_a: bool, run_a: str, run_b: str,
              answers: tuple[str, str], seconds: float) -> dict:
    """The results row: the on-screen choice mapped back to the runs."""
    shown_as_a = "run_a" if first_is_a else "run_b"
    other = "run_b" if first_is_a else "run_a"
    winner = {"a": shown_as_a, "b": other}.get(choice, choice)
    return {"id": item.id, "prompt": item.prompt,
            "messages": [{"role": m.role, "content": m.content} for m in item.messages],
            "run_a": run_a, "run_b": run_b, "shown_as_a": shown_as_a, "choice": choice, "winner": winner,
            "note": note, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 1),
            "answer_run_a": answers[0], "answer_run_b": answers[1]}


# --- results -------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The Wilson score interval for a binomial proportion (95% at the default z); None when n is 0."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(results: list[dict]) -> dict:
    """Counts, and RUN_B's win rate over RUN_A among decisive judgements (ties and both-bad left out)."""
    counts = {w: sum(r["winner"] == w for r in results) for w in ("run_a", "run_b", "tie", "both_bad")}
    decisive = counts["run_a"] + counts["run_b"]
    return {"judged": len(results), **counts, "decisive": decisive,
            "win_rate_b": counts["run_b"] / decisive if decisive else None,
            "ci95": wilson_interval(counts["run_b"], decisive), "notes": sum(bool(r.get("note")) for r in results)}


def summary_text(s: dict, run_a: str, run_b: str) -> str:
    head = (f"{s['judged']} judged: {run_b} (B) won {s['run_b']}, {run_a} (A) won {s['run_a']}, "
            f"{s['tie']} tie(s), {s['both_bad']} both bad")
    if not s["decisive"]:
        return head + "; no decisive judgement yet, so no win rate."
    lo, hi = s["ci95"]
    return (head + f". Win rate of {run_b} over {run_a}: {s['win_rate_b']:.0%} of {s['decisive']} decisive "
                   f"judgement(s) (95% Wilson interval {lo:.0%} to {hi:.0%}).")


def export_pairs(results: list[dict], path: Path) -> tuple[int, int]:
    """Decisive judgements as {"prompt", "chosen", "rejected"} rows for method dpo. Returns (written,
    skipped: ties, both bad, identical answers)."""
    written = skipped = 0
    with path.open("w", encoding="utf-8") as f:
        for r in results:
            if r["winner"] not in ("run_a", "run_b") or r["answer_run_a"] == r["answer_run_b"]:
                skipped += 1
                continue
            loser = "run_b" if r["winner"] == "run_a" else "run_a"
            messages = r["messages"]
            prompt = messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages
            row = {"prompt": prompt, "chosen": r[f"answer_{r['winner']}"], "rejected": r[f"answer_{loser}"],
                   "id": r["id"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
    return written, skipped
