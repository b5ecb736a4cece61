"""A progress bar with loss, tokens/s and ETA (rich); silent when disabled or when output is not a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn


class Progress:
    def __init__(self, total: int, done: int, enabled: bool = True):
        console = Console(stderr=True)
        self.enabled = enabled and console.is_terminal
        self._bar = RichProgress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=console, disable=not self.enabled)
        self._task = self._bar.add_task("train", total=total, completed=done, info="")
        self._note = ""

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        self._bar.__exit__(*exc)

    def update(self, step: int, loss: float, tokens_per_second: float) -> None:
        info = f"loss {loss:.4f}  {tokens_per_second:,.0f} tok/s  {self._note}"
        self._bar.update(self._task, completed=step, info=info)

    def note(self, text: str) -> None:
        self._note = text
