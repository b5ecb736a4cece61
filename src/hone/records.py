"""The interchange types that flow between hone's stages.

Every accepted input shape (chat `messages`, `prompt`/`completion`, `instruction`/`input`/`output`,
`text`+`label`) becomes a `Conversation`: the one thing templating, packing, training and evaluation read.
Each record remembers where it came from (`source`, `line`) so any later error can point back to the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # OpenAI fine-tuning semantics: weight 0 excludes an assistant message from the loss, 1 includes it.
    # None means "use the run's default" (assistant messages are trained on, others are not).
    weight: float | None = None


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""
    line: int = 0
    # For text+label data: the gold label. The conversation's last assistant message holds it too.
    label: str | None = None
    # The input shape the record was read from: chat | completion | instruction | label
    shape: str = "chat"
    meta: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def prompt_messages(self) -> list[Message]:
        """Everything before the last assistant message: what a model is given at evaluation time."""
        last = self.last_assistant_index()
        return self.messages[:last]

    def reference(self) -> str:
        """The last assistant message: the answer a model is expected to give."""
        return self.messages[self.last_assistant_index()].content

    def last_assistant_index(self) -> int:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "assistant":
                return i
        raise ValueError(f"{self.where}: conversation has no assistant message")

    def to_json(self) -> dict:
        out: dict = {"messages": [_message_json(m) for m in self.messages]}
        if self.label is not None:
            out["label"] = self.label
        return out


def _message_json(m: Message) -> dict:
    d = {"role": m.role, "content": m.content}
    if m.weight is not None:
        d["weight"] = m.weight
    return d


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input line. `code` is stable (tests and tools match on it)."""

    source: str
    line: int
    code: str
    message: str
    # The offending line as read (for the rejects file), when it could be read at all.
    raw: str | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: [{self.code}] {self.message}"

    def to_json(self) -> dict:
        out = {"source": self.source, "line": self.line, "code": self.code, "message": self.message}
        if self.raw is not None:
            out["raw"] = self.raw
        return out
