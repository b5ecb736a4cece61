"""/v1/models: base models (registered on the host, seen by every project) and a project's fine-tuned models.

Base models are registered by the host's operator, never through the API (an API user must not point the
server at arbitrary paths): `hone api add-base NAME PATH` (a local HF directory or .gguf file). The embedded
default `smollm2-135m-instruct` is always registered. A job's `model` is a base model's name; its result is
`ft:<base>:<suffix>:<job id>`, visible to its project only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from sqlalchemy import or_, select

from hone.config import EMBEDDED_MODEL
from hone.service.actions import record
from hone.service.auth import Principal, member, viewer
from hone.service.errors import APIError, not_found
from hone.service.store import Model, now

router = APIRouter()
BASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class ResolvedModel:
    id: str
    base: str                 # the base model's id
    base_path: str            # a local HF dir / .gguf, or the embedded name: hone.models.load.load_model's input
    adapter_path: str | None  # the fine-tuned adapter (or full weights) directory; None for a base model


def register_base(session, name: str, path: str) -> Model:
    """Add or update a base model. `path`: a local HF directory, a .gguf file, or the embedded name."""
    if not BASE_NAME.match(name) or name.startswith("ft:"):
        raise ValueError(f"base model name {name!r}: use letters, digits, '.', '_' and '-' (no ':')")
    if path != EMBEDDED_MODEL:
        p = Path(path).expanduser().resolve()
        if not p.exists():
            raise ValueError(f"{path}: no such directory or file")
        path = str(p)
    row = session.get(Model, name)
    if row is not None and row.kind != "base":
        raise ValueError(f"{name!r} is a fine-tuned model's id")
    if row is None:
        row = Model(id=name, project_id=None, kind="base", base=name, base_path=path, created_at=now())
        session.add(row)
    row.base_path = path
    session.flush()
    return row


def ensure_embedded_base(session) -> None:
    if session.get(Model, EMBEDDED_MODEL) is None:
        register_base(session, EMBEDDED_MODEL, EMBEDDED_MODEL)


def model_json(m: Model) -> dict:
    return {"id": m.id, "object": "model", "created": int(m.created_at),
            "owned_by": "hone" if m.project_id is None else m.project_id}


def visible(session, project_id: str, model_id: str) -> Model | None:
    m = session.get(Model, model_id)
    if m is None or (m.project_id is not None and m.project_id != project_id):
        return None
    return m


def make_resolver(store):
    """`resolve(project_id, model_id) -> ResolvedModel`, or APIError 404 (also for another project's model)."""
    def resolve(project_id: str, model_id: str) -> ResolvedModel:
        with store.session() as s:
            m = visible(s, project_id, model_id)
            if m is None:
                raise not_found("model", model_id, "model")
            base = m if m.kind == "base" else s.get(Model, m.base)
            base_path = base.base_path if base is not None else m.base_path
            return ResolvedModel(m.id, m.base, base_path, m.adapter_path)
    return resolve


@router.get("/v1/models")
def list_models(request: Request, p: Principal = Depends(viewer)):
    with request.app.state.store.session() as s:
        rows = s.scalars(select(Model).where(or_(Model.project_id.is_(None), Model.project_id == p.project_id))
                         .order_by(Model.created_at, Model.id)).all()
        return {"object": "list", "data": [model_json(m) for m in rows]}


@router.get("/v1/models/{model_id}")
def retrieve_model(model_id: str, request: Request, p: Principal = Depends(viewer)):
    with request.app.state.store.session() as s:
        m = visible(s, p.project_id, model_id)
        if m is None:
            raise not_found("model", model_id)
        return model_json(m)


@router.delete("/v1/models/{model_id}")
def delete_model(model_id: str, request: Request, p: Principal = Depends(member)):
    with request.app.state.store.session() as s:
        m = visible(s, p.project_id, model_id)
        if m is None:
            raise not_found("model", model_id)
        if m.kind == "base":
            raise APIError(403, f"'{model_id}' is a base model; base models are managed on the host "
                                "(hone api add-base).", code="base_model", param="model")
        s.delete(m)
        record(request, s, "model.delete", "model", model_id)
    return {"id": model_id, "object": "model", "deleted": True}
