"""API keys, roles and project scoping; the /v1/keys routes (admin only).

Every route depends on `require(role)`: it reads `Authorization: Bearer <key>`, looks the key up by its
sha256 (keys are 256-bit random, so a plain hash is enough; the key itself is shown once and never stored),
refuses a missing, unknown or revoked key (401) and a role below the route's (403), and puts the caller on
`request.state.principal`. Roles: viewer (read) < member (create, cancel, use) < admin (everything, keys).
Objects belong to the key's project; routes look them up with the project id, so another project's id is 404.
There is no default account and no sign-up: `hone api create-key` on the host makes the first admin key.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from hone.service.actions import record
from hone.service.errors import APIError, not_found
from hone.service.store import ApiKey, Project, new_id, now

ROLES = ("viewer", "member", "admin")
KEY_PREFIX = "hone-"


@dataclass(frozen=True)
class Principal:
    project_id: str
    key_id: str
    role: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(session, project: str, role: str, name: str | None = None, *,
               create_project: bool = True) -> tuple[ApiKey, str]:
    """(row, the key in plain text: show it once). `project` is a project name; created if missing."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    proj = session.scalar(select(Project).where(Project.name == project))
    if proj is None:
        if not create_project:
            raise ValueError(f"no project named {project!r}")
        proj = Project(id=new_id("proj_"), name=project, created_at=now())
        session.add(proj)
        session.flush()
    key = new_key()
    row = ApiKey(id=new_id("key_"), project_id=proj.id, role=role, name=name, key_hash=hash_key(key),
                 prefix=key[:12], created_at=now())
    session.add(row)
    session.flush()
    return row, key


def require(role: str):
    """A dependency admitting keys with at least `role`; its `.role` lets tests list each route's minimum."""
    needed = ROLES.index(role)

    def dependency(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
        with request.app.state.store.session() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key.strip())))
        if row is None or row.revoked_at is not None:
            raise APIError(401, "Invalid or revoked API key.", code="invalid_api_key")
        if ROLES.index(row.role) < needed:
            raise APIError(403, f"This needs the {role} role; this key is a {row.role} key.",
                           code="insufficient_role")
        principal = Principal(row.project_id, row.id, row.role)
        request.state.principal = principal
        return principal

    dependency.role = role
    return dependency


viewer = require("viewer")
member = require("member")
admin = require("admin")

router = APIRouter()


class KeyCreate(BaseModel):
    role: Literal["viewer", "member", "admin"] = Field(description="What the key may do.")
    name: str | None = Field(None, max_length=200, description="A label to tell keys apart.")


def key_json(row: ApiKey) -> dict:
    return {"id": row.id, "object": "api_key", "role": row.role, "name": row.name, "prefix": row.prefix,
            "created_at": int(row.created_at), "revoked_at": None if row.revoked_at is None else int(row.revoked_at)}


@router.get("/v1/keys")
def list_keys(request: Request, p: Principal = Depends(admin)):
    with request.app.state.store.session() as s:
        rows = s.scalars(select(ApiKey).where(ApiKey.project_id == p.project_id)
                         .order_by(ApiKey.created_at.desc())).all()
        return {"object": "list", "data": [key_json(r) for r in rows]}


@router.post("/v1/keys")
def create_project_key(body: KeyCreate, request: Request, p: Principal = Depends(admin)):
    with request.app.state.store.session() as s:
        project = s.get(Project, p.project_id)
        row, key = create_key(s, project.name, body.role, body.name, create_project=False)
        record(request, s, "key.create", "api_key", row.id, role=body.role)
        return {**key_json(row), "key": key}


@router.delete("/v1/keys/{key_id}")
def revoke_key(key_id: str, request: Request, p: Principal = Depends(admin)):
    with request.app.state.store.session() as s:
        row = s.get(ApiKey, key_id)
        if row is None or row.project_id != p.project_id:
            raise not_found("api key", key_id)
        if row.revoked_at is None:
            row.revoked_at = now()
            record(request, s, "key.revoke", "api_key", row.id)
        return {**key_json(row), "deleted": True}
