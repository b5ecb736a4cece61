"""The audit log: who did what, when, to which object, with what outcome; append-only; read by admins.

`install(app)` registers a hook on `app.state.actions`, so every `actions.record(...)` call (every mutating
route, and model use from the inference routes) appends one `audit_events` row in the same transaction as the
change it describes. Rows are never updated or deleted: there are no such routes, the ORM refuses both
(store.AuditEvent), and on PostgreSQL a trigger refuses them too (migration 0002). A stored file that fails
its integrity check on a read (storage.StoredFileCorrupt) answers 500 and leaves a `file.read` event with
outcome `integrity_error` (`key_unavailable` when its key is missing).

    GET /v1/audit          ?action=&object_type=&object_id=&since=&after=&limit=   (oldest first, by id)
    GET /v1/audit/export   the same filters, every matching row as JSONL
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from hone.service.actions import Action, record
from hone.service.auth import Principal, admin
from hone.service.errors import APIError
from hone.service.storage import StorageError, StoredFileCorrupt
from hone.service.store import AuditEvent

log = logging.getLogger("hone.service.audit")

router = APIRouter()
MAX_PAGE = 1000
_EXPORT_BATCH = 500


def write_event(action: Action, session) -> None:
    session.add(AuditEvent(at=action.at, project_id=action.project_id, key_id=action.key_id, role=action.role,
                           action=action.action, object_type=action.object_type, object_id=action.object_id,
                           outcome=action.outcome, request_id=action.request_id, ip=action.ip,
                           detail=action.detail or None))


def install(app: FastAPI) -> None:
    app.state.actions.add_hook(write_event)
    app.include_router(router)

    @app.exception_handler(StorageError)
    async def _storage_error(request: Request, exc: StorageError):
        """A stored file that fails its integrity check (or whose key is missing) is a 500 with that message,
        and an audit event; its bytes are never sent."""
        outcome = "integrity_error" if isinstance(exc, StoredFileCorrupt) else "key_unavailable"
        log.error("%s: %s", outcome, exc.message)
        with app.state.store.session() as s:
            record(request, s, "file.read", "file", exc.object_id, outcome=outcome, path=request.url.path)
        code = "integrity_check_failed" if isinstance(exc, StoredFileCorrupt) else "encryption_key_unavailable"
        return JSONResponse(APIError(500, exc.message, code=code).body(), status_code=500)


def event_json(e: AuditEvent) -> dict:
    return {"id": e.id, "object": "audit.event", "at": e.at, "project_id": e.project_id, "key_id": e.key_id,
            "role": e.role, "action": e.action, "object_type": e.object_type, "object_id": e.object_id,
            "outcome": e.outcome, "request_id": e.request_id, "ip": e.ip, "detail": e.detail or {}}


def _query(p: Principal, action, object_type, object_id, since, after):
    q = select(AuditEvent).where(AuditEvent.project_id == p.project_id)
    if action:
        q = q.where(AuditEvent.action == action)
    if object_type:
        q = q.where(AuditEvent.object_type == object_type)
    if object_id:
        q = q.where(AuditEvent.object_id == object_id)
    if since is not None:
        q = q.where(AuditEvent.at >= since)
    if after is not None:
        q = q.where(AuditEvent.id > after)
    return q.order_by(AuditEvent.id)


@router.get("/v1/audit")
def list_audit(request: Request, action: str | None = None, object_type: str | None = None,
               object_id: str | None = None, since: float | None = None, after: int | None = None,
               limit: int = 100, p: Principal = Depends(admin)):
    """This project's events, oldest first; `after` = the last id of the previous page."""
    limit = max(1, min(limit, MAX_PAGE))
    with request.app.state.store.session() as s:
        rows = s.scalars(_query(p, action, object_type, object_id, since, after).limit(limit + 1)).all()
    page = rows[:limit]
    return {"object": "list", "data": [event_json(e) for e in page], "has_more": len(rows) > limit,
            "last_id": page[-1].id if page else None}


@router.get("/v1/audit/export")
def export_audit(request: Request, action: str | None = None, object_type: str | None = None,
                 object_id: str | None = None, since: float | None = None, p: Principal = Depends(admin)):
    """Every matching event as JSONL, read in batches so a long log does not sit in memory."""
    store = request.app.state.store

    def lines():
        last = None
        while True:
            with store.session() as s:
                rows = s.scalars(_query(p, action, object_type, object_id, since, last).limit(_EXPORT_BATCH)).all()
            for e in rows:
                yield json.dumps(event_json(e), sort_keys=True) + "\n"
            if len(rows) < _EXPORT_BATCH:
                return
            last = rows[-1].id

    return StreamingResponse(lines(), media_type="application/jsonl",
                             headers={"Content-Disposition": "attachment; filename=audit.jsonl"})
