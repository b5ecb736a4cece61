"""/v1/files: OpenAI-compatible upload, list, retrieve, delete and content, for purpose `fine-tune`.

An upload is streamed to a temp file (refused past settings.max_upload_bytes), validated with hone's own
validators before it is kept, and stored by its generated id: supervised rows with
`hone.data.validate` (chat messages, prompt/completion, instruction/output, text/label), preference rows
(hone's prompt/chosen/rejected, or OpenAI's DPO input/preferred_output/non_preferred_output) with
`hone.methods.pairs.parse_pair`. A bad file is refused with every problem's line (the first 20).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path, PurePath

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from hone.records import Problem
from hone.service.actions import record
from hone.service.auth import Principal, member, viewer
from hone.service.errors import APIError, not_found
from hone.service.store import File, new_id, now

router = APIRouter()
PURPOSES = ("fine-tune",)
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
MAX_LISTED_PROBLEMS = 20
_CHUNK = 1 << 20


def file_json(f: File) -> dict:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at), "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None}


def clean_filename(name: str | None) -> str:
    """The name shown back to users: its last component, printable, at most 255 characters."""
    base = PurePath((name or "upload.jsonl").replace("\\", "/")).name
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip() or "upload.jsonl"
    return base[-255:]


# --- validation ------------------------------------------------------------------------------------------


def openai_dpo_row(row: dict) -> dict:
    """OpenAI's DPO row {input: {messages}, preferred_output: [msg], non_preferred_output: [msg]} in hone's
    preference shape {prompt, chosen, rejected}; other rows are returned as they are."""
    if "preferred_output" not in row and "non_preferred_output" not in row:
        return row
    source = row.get("input")
    prompt = source.get("messages") if isinstance(source, dict) else source
    return {"prompt": prompt, "chosen": row.get("preferred_output"), "rejected": row.get("non_preferred_output")}


def is_preference_row(row: dict) -> bool:
    return ("chosen" in row and "rejected" in row) or "preferred_output" in row


def inspect_data(path: Path, display: str) -> tuple[str, int]:
    """(kind, rows) of a data file, or APIError(400) naming every problem's line. kind: supervised|preference."""
    from hone.config import DataConfig
    from hone.data.readers import DataError, read_rows
    from hone.data.validate import validate_rows

    try:
        rows = list(read_rows(path))
        first = next((r for _, r in rows if isinstance(r, dict)), None)
        if first is not None and is_preference_row(first):
            kind, count, problems = "preference", len(rows), preference_problems(rows, display)
        else:
            instruction = DataConfig.model_fields["instruction"].default
            report = validate_rows(iter(rows), display, instruction=instruction)
            kind, count, problems = "supervised", report.rows, report.problems
    except DataError as e:
        raise APIError(400, str(e).replace(str(path), display), code="invalid_file", param="file") from None
    if problems:
        raise APIError(400, problems_message(problems, display, count), code="invalid_file", param="file")
    return kind, count


def preference_problems(rows: list, display: str) -> list[Problem]:
    from hone.methods import RowError
    from hone.methods.pairs import NEEDS, parse_pair

    problems = []
    for line, row in rows:
        if isinstance(row, Problem):
            problems.append(row)
            continue
        try:
            parse_pair(openai_dpo_row(row))
        except RowError as bad:
            problems.append(Problem(display, line, bad.code, f"{bad.message} (a preference row needs {NEEDS})"))
    return problems


def problems_message(problems: list[Problem], display: str, rows: int) -> str:
    shown = [f"line {p.line}: [{p.code}] {p.message.replace(p.source, display)}"
             for p in problems[:MAX_LISTED_PROBLEMS]]
    more = len(problems) - len(shown)
    tail = f"\n... and {more} more" if more > 0 else ""
    return f"{display}: {len(problems)} of {rows} line(s) cannot be used:\n" + "\n".join(shown) + tail


# --- routes ----------------------------------------------------------------------------------------------


async def _receive_upload(request: Request, settings) -> tuple[Path, str, str, str, int]:
    """(temp path, filename, purpose, sha256, bytes) of a multipart upload, within the size limit."""
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise APIError(413, f"File too large: the limit is {limit} bytes.", code="file_too_large", param="file")
    form = await request.form(max_files=1, max_fields=8)
    upload, purpose = form.get("file"), form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "Missing 'file': send it as multipart/form-data.", code="missing_file", param="file")
    if purpose not in PURPOSES:
        raise APIError(400, f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}.",
                       code="invalid_purpose", param="purpose")
    filename = clean_filename(upload.filename)
    ext = PurePath(filename).suffix.lower() or ".jsonl"
    if ext not in EXTENSIONS:
        raise APIError(400, f"{filename}: unsupported file type {ext!r}; use {', '.join(EXTENSIONS)}.",
                       code="invalid_file", param="file")
    tmp_dir = settings.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(suffix=ext, dir=tmp_dir)
    digest, size = hashlib.sha256(), 0
    with open(fd, "wb") as out:
        while chunk := await upload.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                out.close()
                Path(name).unlink(missing_ok=True)
                raise APIError(413, f"File too large: the limit is {limit} bytes.", code="file_too_large",
                               param="file")
            digest.update(chunk)
            out.write(chunk)
    return Path(name), filename, purpose, digest.hexdigest(), size


@router.post("/v1/files")
async def create_file(request: Request, p: Principal = Depends(member)):
    app = request.app
    tmp, filename, purpose, sha, size = await _receive_upload(request, app.state.settings)
    try:
        kind, rows = inspect_data(tmp, filename)
        file_id = new_id("file-")
        key = file_id + tmp.suffix
        app.state.files.put_file(key, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    with app.state.store.session() as s:
        row = File(id=file_id, project_id=p.project_id, filename=filename, purpose=purpose, bytes=size,
                   sha256=sha, storage_key=key, kind=kind, rows=rows, created_at=now())
        s.add(row)
        record(request, s, "file.create", "file", file_id, filename=filename, bytes=size, sha256=sha)
    return file_json(row)


@router.get("/v1/files")
def list_files(request: Request, purpose: str | None = None, limit: int = 100, after: str | None = None,
               order: str = "desc", p: Principal = Depends(viewer)):
    limit = max(1, min(limit, 10000))
    with request.app.state.store.session() as s:
        q = select(File).where(File.project_id == p.project_id)
        if purpose:
            q = q.where(File.purpose == purpose)
        rows = list(s.scalars(q.order_by(File.created_at.desc(), File.id.desc())).all())
    if order == "asc":
        rows.reverse()
    if after:
        ids = [r.id for r in rows]
        rows = rows[ids.index(after) + 1:] if after in ids else []
    page = rows[:limit]
    return {"object": "list", "data": [file_json(r) for r in page], "has_more": len(rows) > limit,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


def get_file(s, p: Principal, file_id: str, param: str | None = None) -> File:
    row = s.get(File, file_id)
    if row is None or row.project_id != p.project_id:
        raise not_found("file", file_id, param)
    return row


@router.get("/v1/files/{file_id}")
def retrieve_file(file_id: str, request: Request, p: Principal = Depends(viewer)):
    with request.app.state.store.session() as s:
        return file_json(get_file(s, p, file_id))


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, request: Request, p: Principal = Depends(member)):
    with request.app.state.store.session() as s:
        row = get_file(s, p, file_id)
        key = row.storage_key
        s.delete(row)
        record(request, s, "file.delete", "file", file_id)
    request.app.state.files.delete(key)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, request: Request, p: Principal = Depends(viewer)):
    with request.app.state.store.session() as s:
        row = get_file(s, p, file_id)
    stream = request.app.state.files.open(row.storage_key)

    def chunks():
        with stream:
            while data := stream.read(_CHUNK):
                yield data

    media = "application/jsonl" if row.storage_key.endswith(".jsonl") else "application/octet-stream"
    return StreamingResponse(chunks(), media_type=media,
                             headers={"Content-Disposition": f"attachment; filename*=UTF-8''{_quote(row.filename)}"})


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")
