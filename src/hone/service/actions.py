"""The one place every mutating route reports what it did: who (key, project), what, to which object.

Routes call `record(request, session, action, object_type, object_id, **detail)` inside the transaction that
made the change. Hooks registered on `app.state.actions` receive the `Action` and that session, so an audit
log can append its row in the same transaction (nothing recorded for a change that rolled back).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from fastapi import Request


@dataclass(frozen=True)
class Action:
    action: str            # e.g. file.create, job.create, job.cancel, model.delete, key.create, key.revoke
    object_type: str
    object_id: str
    project_id: str
    key_id: str | None
    role: str | None
    at: float = field(default_factory=time.time)
    detail: dict = field(default_factory=dict)


class Actions:
    def __init__(self):
        self.hooks: list[Callable] = []

    def add_hook(self, hook: Callable) -> None:
        """`hook(action, session)`; an exception in a hook fails the request (an audit log must not miss one)."""
        self.hooks.append(hook)

    def emit(self, action: Action, session) -> None:
        for hook in self.hooks:
            hook(action, session)


def record(request: Request, session, action: str, object_type: str, object_id: str, **detail) -> Action:
    p = request.state.principal
    a = Action(action, object_type, object_id, p.project_id, p.key_id, p.role, detail=detail)
    request.app.state.actions.emit(a, session)
    return a
