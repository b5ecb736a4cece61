"""The one place every mutating route reports what it did: who (key, project), what, to which object.

Routes call `record(request, session, action, object_type, object_id, **detail)` inside the transaction that
made the change. Hooks registered on `app.state.actions` receive the `Action` and that session, so an audit
log can append its row in the same transaction (nothing recorded for a change that rolled back).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from fastapi import Request


@dataclass(frozen=True)
class Action:
    action: str            # e.g. file.create, job.create, job.cancel, model.delete, key.create, key.revoke
    object_type: str
    object_id: str
    project_id: str | None
    key_id: str | None
    role: str | None
    at: float = field(default_factory=time.time)
    detail: dict = field(default_factory=dict)
    outcome: str = "success"
    request_id: str | None = None
    ip: str | None = None


class Actions:
    def __init__(self):
        self.hooks: list[Callable] = []

    def add_hook(self, hook: Callable) -> None:
        """`hook(action, session)`; an exception in a hook fails the request (an audit log must not miss one)."""
        self.hooks.append(hook)

    def emit(self, action: Action, session) -> None:
        for hook in self.hooks:
            hook(action, session)


def request_id(request: Request) -> str:
    """The caller's X-Request-ID (trimmed to 64 characters), else one made up for this request."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = (request.headers.get("x-request-id") or "").strip()[:64] or uuid.uuid4().hex
        request.state.request_id = rid
    return rid


def record(request: Request, session, action: str, object_type: str, object_id: str, *,
           outcome: str = "success", **detail) -> Action:
    p = getattr(request.state, "principal", None)
    a = Action(action, object_type, object_id, p.project_id if p else None, p.key_id if p else None,
               p.role if p else None, detail=detail, outcome=outcome, request_id=request_id(request),
               ip=request.client.host if request.client else None)
    request.app.state.actions.emit(a, session)
    return a
