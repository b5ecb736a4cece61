"""The prompts `hone compare` weighs fine-tuning against: zero-shot, few-shot and retrieval-augmented.

Every strategy turns a held-out conversation into another conversation with the same reference answer and
label, so `hone.eval.runners.evaluate_task` scores them all exactly as `hone train` scores the tuned model:

  zero_shot              the task instruction (for label data, with the label list) and the query
  few_shot               the same, with k training examples as earlier user/assistant turns: one fixed set
                         for every query, chosen deterministically and balanced over labels
  retrieval              the same, with the k training examples nearest the query (cosine similarity of
                         sentence embeddings), the nearest one last, right before the query
  fine_tuned             the conversation as the model was trained on it (the bare prompt)
  fine_tuned_retrieval   the bare prompt with the k nearest examples as earlier turns

Examples go in as chat turns, not pasted into the instruction, because that is how chat models are shown
demonstrations and the tuned model sees the same turn structure it was trained on.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import torch

from hone.config import ConfigError
from hone.records import Conversation, Message

PROMPTING = ("zero_shot", "few_shot", "retrieval")
FINE_TUNED = ("fine_tuned", "fine_tuned_retrieval")
WITH_EXAMPLES = ("few_shot", "retrieval", "fine_tuned_retrieval")
RETRIEVING = ("retrieval", "fine_tuned_retrieval")
TITLES = {"zero_shot": "zero-shot", "few_shot": "few-shot", "retrieval": "retrieval",
          "fine_tuned": "fine-tuned", "fine_tuned_retrieval": "fine-tuned + retrieval"}
# Appended to an instruction that does not list the labels itself, so zero-shot knows what to answer.
LABEL_LIST_SUFFIX = " Answer with exactly one of these categories: {labels}."


class CompareError(ConfigError):
    """A comparison that cannot be run as configured (a ConfigError: the CLI exits 2 with the message)."""


def title(strategy: str, k: int) -> str:
    """How a strategy is named in tables: 'few-shot (k=4)'."""
    name = TITLES[strategy]
    return f"{name} (k={k})" if strategy in WITH_EXAMPLES else name


def check_k(strategies: list[str], k: int, n_train: int, train_file: str | None) -> None:
    """Refuse, before any model loads, to put more examples in a prompt than the training set has."""
    using = [s for s in strategies if s in WITH_EXAMPLES]
    if using and k > n_train:
        raise CompareError(f"compare.k={k} but {train_file} has only {n_train} usable training example(s), so "
                           f"{', '.join(using)} cannot put {k} examples in a prompt. Lower compare.k "
                           f"(e.g. --set compare.k={max(1, min(n_train, 4))}) or add training data.")


def label_instruction(instruction: str, labels: list[str]) -> str:
    """The prompting strategies' system message for label data: the instruction with the label list in it."""
    joined = ", ".join(labels)
    if "{labels}" not in instruction:
        instruction = instruction.rstrip() + LABEL_LIST_SUFFIX
    return instruction.replace("{labels}", joined)


def query_messages(conv: Conversation) -> list[Message]:
    """The prompt without its system message: what a user actually sent."""
    return [m for m in conv.prompt_messages() if m.role != "system"]


def query_text(conv: Conversation) -> str:
    """The text a query is embedded (and few-shot examples are ordered) by."""
    return "\n".join(m.content for m in query_messages(conv))


def demo_turns(example: Conversation) -> list[Message]:
    """A training example as earlier chat turns: its user message(s), then its reference answer."""
    return [Message(m.role, m.content) for m in query_messages(example)] + \
        [Message("assistant", example.reference())]


def with_examples(conv: Conversation, examples: list[Conversation], system: str | None = None) -> Conversation:
    """`conv` with `examples` as turns before the query and, when `system` is given, that system message.

    The reference answer and label stay those of `conv`, so scoring is unchanged.
    """
    prompt = conv.prompt_messages()
    head = [m for m in prompt if m.role == "system"][:1]
    if system is not None:
        head = [Message("system", system)]
    turns = [m for ex in examples for m in demo_turns(ex)]
    messages = head + turns + query_messages(conv) + [Message("assistant", conv.reference())]
    return Conversation(messages, source=conv.source, line=conv.line, label=conv.label, shape=conv.shape,
                        meta=dict(conv.meta))


def _rank(seed: int, text: str) -> str:
    # sha256, never hash(): the same data and seed pick the same examples in every process.
    return hashlib.sha256(f"{seed}\0{text}".encode("utf-8")).hexdigest()


def pick_few_shot(train: list[Conversation], k: int, seed: int) -> list[int]:
    """Indices of k training examples for few-shot prompts: deterministic, and balanced over labels.

    Within a label, examples are taken in seeded-hash order (a file sorted by label or date does not bias
    the choice). Labelled data is dealt round-robin: one example of every label (labels in seeded-hash
    order) before a second of any, so k examples cover min(k, labels) labels and no label gets two more
    than another; the prompt keeps that interleaved order. Unlabelled data: the first k by hash.
    """
    if k > len(train):
        raise CompareError(f"compare.k={k} but the training set has only {len(train)} example(s)")
    order = sorted(range(len(train)), key=lambda i: (_rank(seed, query_text(train[i])), i))
    if not all(c.label is not None for c in train):
        return order[:k]
    by_label: dict[str, list[int]] = defaultdict(list)
    for i in order:
        by_label[train[i].label].append(i)
    labels = sorted(by_label, key=lambda label: (_rank(seed, label), label))
    picked: list[int] = []
    depth = 0
    while len(picked) < k:
        picked += [by_label[label][depth] for label in labels if depth < len(by_label[label])][:k - len(picked)]
        depth += 1
    return picked


def nearest(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> list[list[int]]:
    """For each query row, the indices of the k corpus rows with the highest cosine similarity, nearest
    first (ties: the lower index first). Vectors need not be normalised."""
    if k > corpus.shape[0]:
        raise CompareError(f"compare.k={k} but only {corpus.shape[0]} training example(s) can be retrieved")
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    c = torch.nn.functional.normalize(corpus.float(), dim=-1)
    sims = q @ c.T
    order = torch.argsort(-sims, dim=1, stable=True)[:, :k]
    return order.tolist()


def zero_shot_prompts(held_out: list[Conversation], system: str | None) -> list[Conversation]:
    return [with_examples(c, [], system) for c in held_out]


def few_shot_prompts(held_out: list[Conversation], train: list[Conversation], picked: list[int],
                     system: str | None) -> list[Conversation]:
    examples = [train[i] for i in picked]
    return [with_examples(c, examples, system) for c in held_out]


def retrieval_prompts(held_out: list[Conversation], train: list[Conversation], neighbours: list[list[int]],
                      system: str | None) -> list[Conversation]:
    """Each query with its own nearest examples; the nearest goes last, closest to the query."""
    return [with_examples(c, [train[i] for i in reversed(near)], system) for c, near in zip(held_out, neighbours)]


def prompting_system(conv: Conversation, instruction: str, labels: list[str] | None) -> str | None:
    """The system message a prompting strategy uses for `conv`: for text+label rows, the instruction with
    the label list; other rows keep their own (None: leave it as it is)."""
    if labels and conv.shape == "label":
        return label_instruction(instruction, labels)
    return None


def strategy_prompts(strategy: str, held_out: list[Conversation], train: list[Conversation], *,
                     instruction: str, labels: list[str] | None, picked: list[int] | None = None,
                     neighbours: list[list[int]] | None = None) -> list[Conversation]:
    """The held-out set as `strategy` prompts it (see the module docstring)."""
    if strategy == "fine_tuned":
        return list(held_out)
    if strategy == "fine_tuned_retrieval":
        return retrieval_prompts(held_out, train, neighbours, None)
    out = []
    for i, conv in enumerate(held_out):
        system = prompting_system(conv, instruction, labels)
        if strategy == "zero_shot":
            out += zero_shot_prompts([conv], system)
        elif strategy == "few_shot":
            out += few_shot_prompts([conv], train, picked, system)
        elif strategy == "retrieval":
            out += retrieval_prompts([conv], train, [neighbours[i]], system)
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
    return out
