"""The run directory's running record: metrics.jsonl (numbers) and events.jsonl (milestones, warnings).

Both are appended one JSON object per line and flushed at once, so a dashboard or a user's `tail -f` sees
progress live, and a killed run keeps everything logged before it died.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

LEVELS = ("info", "warn", "error")


class RunLog:
    def __init__(self, run_dir: Path, console: Console | None = None):
        self.run_dir = run_dir
        self.console = console or Console(stderr=True, soft_wrap=True)

    def metric(self, row: dict) -> None:
        row = {k: v for k, v in row.items() if v is not None}
        self._append("metrics.jsonl", {**row, "time": round(time.time(), 3)})

    def event(self, level: str, message: str, **extra) -> None:
        assert level in LEVELS, level
        self._append("events.jsonl", {"time": round(time.time(), 3), "level": level, "message": message, **extra})
        style = {"info": "dim", "warn": "yellow", "error": "bold red"}[level]
        self.console.print(f"[{style}]{level}[/{style}] {escape(message)}", highlight=False)

    def _append(self, name: str, row: dict) -> None:
        with open(self.run_dir / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
