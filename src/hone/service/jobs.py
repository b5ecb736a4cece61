"""/v1/fine_tuning/jobs: OpenAI-compatible create, list, retrieve, cancel, events, checkpoints (and metrics).

A job's request maps onto a hone run config (`hone_config`): method.type supervised -> method lora,
dpo -> method dpo (beta -> preference.beta); n_epochs -> train.epochs; learning_rate_multiplier m ->
train.learning_rate = m x 2e-4 (hone's LoRA default, for both methods); batch_size b ->
train.batch_tokens = b x 256 (hone packs examples into token batches; 256 tokens is a short chat example);
seed -> train.seed. The operator's settings.train_defaults sit under these. The worker fills in the data
paths and the output directory when it runs the job.

`Idempotency-Key` on create: the same key with the same body returns the job the first request made; the
same key with another body is refused (409, code idempotency_key_reused).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from hone.service.actions import record
from hone.service.auth import Principal, member, viewer
from hone.service.errors import APIError, not_found
from hone.service.files import get_file
from hone.service.jobstate import TERMINAL, add_event, transition
from hone.service.store import Checkpoint, Job, JobEvent, JobMetric, Model, new_id, now

router = APIRouter()
BASE_LR = 2e-4
TOKENS_PER_BATCH_ITEM = 256
SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | float | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    beta: float | Literal["auto"] = "auto"  # dpo only


class JobCreate(BaseModel):
    # OpenAI fields hone does not use (integrations, metadata) are accepted and ignored.
    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=255)
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    hyperparameters: Hyperparameters | None = None
    method: dict | None = None
    suffix: str | None = Field(None, max_length=40)
    seed: int | None = None


def method_of(body: JobCreate) -> tuple[str, Hyperparameters]:
    """(supervised | dpo, the hyperparameters that apply: method's own over the top-level ones)."""
    method = body.method or {"type": "supervised"}
    kind = method.get("type", "supervised")
    if kind not in ("supervised", "dpo"):
        raise APIError(400, f"method.type {kind!r} is not supported; use supervised or dpo.",
                       code="invalid_method", param="method.type")
    inner = method.get(kind) or {}
    raw = {**(body.hyperparameters.model_dump(exclude_defaults=True) if body.hyperparameters else {}),
           **((inner.get("hyperparameters") or {}) if isinstance(inner, dict) else {})}
    try:
        return kind, Hyperparameters.model_validate(raw)
    except Exception as e:  # pydantic's message names the field
        raise APIError(400, f"invalid hyperparameters: {e}", code="invalid_hyperparameters",
                       param="hyperparameters") from None


def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def hone_config(kind: str, hp: Hyperparameters, seed: int, base_path: str, defaults: dict) -> dict:
    """The run config for a job, without data paths and output_dir (the worker adds those)."""
    cfg: dict[str, Any] = deep_merge({"method": "lora" if kind == "supervised" else "dpo",
                                      "model": {"base": base_path}}, defaults)
    train: dict[str, Any] = {"seed": seed}
    if hp.n_epochs != "auto":
        train["epochs"] = hp.n_epochs
    if hp.learning_rate_multiplier != "auto":
        train["learning_rate"] = BASE_LR * hp.learning_rate_multiplier
    if hp.batch_size != "auto":
        train["batch_tokens"] = max(16, hp.batch_size * TOKENS_PER_BATCH_ITEM)
    cfg = deep_merge(cfg, {"train": train})
    if kind == "dpo" and hp.beta != "auto":
        cfg = deep_merge(cfg, {"preference": {"beta": hp.beta}})
    if kind == "dpo":
        cfg = _fit_prompt_budget(cfg)
    if kind != "dpo" and hp.beta != "auto":
        raise APIError(400, "beta applies to method dpo only.", code="invalid_hyperparameters", param="beta")
    from hone.config import ConfigError, parse_config

    try:
        parse_config(deep_merge(cfg, {"data": {"train": "train.jsonl"}}), source="job")
    except ConfigError as e:
        raise APIError(400, str(e), code="invalid_hyperparameters", param="hyperparameters") from None
    return cfg


def _fit_prompt_budget(cfg: dict) -> dict:
    """dpo needs preference.max_prompt_tokens below data.max_seq_len; when the server's defaults shorten
    max_seq_len under the prompt budget, give prompts half of it rather than fail every dpo job."""
    from hone.config import DataConfig, PreferenceConfig

    seq = (cfg.get("data") or {}).get("max_seq_len", DataConfig.model_fields["max_seq_len"].default)
    prompt = (cfg.get("preference") or {}).get("max_prompt_tokens",
                                               PreferenceConfig.model_fields["max_prompt_tokens"].default)
    if isinstance(seq, int) and isinstance(prompt, int) and prompt >= seq:
        cfg = deep_merge(cfg, {"preference": {"max_prompt_tokens": max(8, seq // 2)}})
    return cfg


def job_json(j: Job) -> dict:
    hp = dict(j.hyperparameters)
    return {"id": j.id, "object": "fine_tuning.job", "created_at": int(j.created_at), "error": j.error,
            "fine_tuned_model": j.fine_tuned_model,
            "finished_at": None if j.finished_at is None else int(j.finished_at),
            "hyperparameters": hp, "model": j.model, "organization_id": j.project_id, "result_files": [],
            "seed": j.seed, "status": j.status, "trained_tokens": j.trained_tokens,
            "training_file": j.training_file, "validation_file": j.validation_file, "method": j.method,
            "suffix": j.suffix, "estimated_finish": None, "integrations": [], "metadata": None}


def body_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _same_key_job(s, p: Principal, key: str, digest: str) -> Job | None:
    job = s.scalar(select(Job).where(Job.project_id == p.project_id, Job.idempotency_key == key))
    if job is not None and job.body_hash != digest:
        raise APIError(409, "This Idempotency-Key was used with a different request body; use a new key.",
                       code="idempotency_key_reused", param="Idempotency-Key")
    return job


@router.post("/v1/fine_tuning/jobs")
def create_job(body: JobCreate, request: Request, p: Principal = Depends(member),
               idempotency_key: str | None = Header(None, max_length=255)):
    digest = body_hash(body)
    store = request.app.state.store
    if idempotency_key:
        with store.session() as s:
            if (job := _same_key_job(s, p, idempotency_key, digest)) is not None:
                return job_json(job)
    try:
        with store.session() as s:
            job = _insert_job(s, request, p, body, idempotency_key, digest)
    except IntegrityError:  # a concurrent retry with the same key inserted first
        if not idempotency_key:
            raise
        with store.session() as s:
            job = _same_key_job(s, p, idempotency_key, digest)
    return job_json(job)


def _insert_job(s, request: Request, p: Principal, body: JobCreate, key: str | None, digest: str) -> Job:
    base = s.get(Model, body.model)
    if base is None or base.kind != "base":
        raise APIError(400, f"model {body.model!r} is not a base model on this server; GET /v1/models lists "
                            "them (fine-tuning a fine-tuned model is not supported).",
                       code="model_not_available", param="model")
    if body.suffix is not None and not SUFFIX.match(body.suffix):
        raise APIError(400, "suffix: use 1-40 letters, digits, '_' or '-'.", code="invalid_suffix", param="suffix")
    train = get_file(s, p, body.training_file, "training_file")
    valid = get_file(s, p, body.validation_file, "validation_file") if body.validation_file else None
    kind, hp = method_of(body)
    seed = body.seed if body.seed is not None else 0
    config = hone_config(kind, hp, seed, base.base_path, request.app.state.settings.train_defaults)
    job = Job(id=new_id("ftjob-"), project_id=p.project_id, model=body.model, training_file=train.id,
              validation_file=valid.id if valid else None, method={"type": kind, kind: {
                  "hyperparameters": hp.model_dump(exclude={"beta"} if kind != "dpo" else set())}},
              hyperparameters=hp.model_dump(exclude={"beta"}), suffix=body.suffix, seed=seed,
              status="validating_files", config=config, created_at=now(), idempotency_key=key, body_hash=digest)
    s.add(job)
    s.flush()
    add_event(s, job.id, f"Validating training file: {train.id}" + (f" and validation file: {valid.id}" if valid else ""))
    problem = _file_problem(kind, train, valid)
    if problem:
        transition(s, job.id, ("validating_files",), "failed", error=problem)
        add_event(s, job.id, problem["message"], level="error")
    else:
        transition(s, job.id, ("validating_files",), "queued")
        add_event(s, job.id, "Files validated, moving job to queued state")
    record(request, s, "job.create", "fine_tuning.job", job.id, model=body.model, training_file=train.id)
    s.flush()
    s.refresh(job)
    return job


def _file_problem(kind: str, train, valid) -> dict | None:
    """The job's error when a file's rows do not suit the method (files were validated at upload)."""
    needs = "preference" if kind == "dpo" else "supervised"
    for param, f in (("training_file", train), ("validation_file", valid)):
        if f is not None and f.kind != needs:
            what = "preference pairs" if f.kind == "preference" else "supervised examples"
            return {"code": f"invalid_{param}", "param": param,
                    "message": f"{param} {f.id} ({f.filename}) holds {what}, but method {kind} needs "
                               f"{'preference pairs' if needs == 'preference' else 'supervised examples'}."}
    return None


def get_job(s, p: Principal, job_id: str) -> Job:
    job = s.get(Job, job_id)
    if job is None or job.project_id != p.project_id:
        raise not_found("fine-tuning job", job_id)
    return job


def _page(rows: list, limit: int, to_json) -> dict:
    page = rows[:limit]
    return {"object": "list", "data": [to_json(r) for r in page], "has_more": len(rows) > limit}


@router.get("/v1/fine_tuning/jobs")
def list_jobs(request: Request, after: str | None = None, limit: int = 20, p: Principal = Depends(viewer)):
    limit = max(1, min(limit, 100))
    with request.app.state.store.session() as s:
        q = select(Job).where(Job.project_id == p.project_id)
        if after:
            anchor = get_job(s, p, after)
            q = q.where((Job.created_at < anchor.created_at) |
                        ((Job.created_at == anchor.created_at) & (Job.id < anchor.id)))
        rows = s.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
        return _page(list(rows), limit, job_json)


@router.get("/v1/fine_tuning/jobs/{job_id}")
def retrieve_job(job_id: str, request: Request, p: Principal = Depends(viewer)):
    with request.app.state.store.session() as s:
        return job_json(get_job(s, p, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request, p: Principal = Depends(member)):
    with request.app.state.store.session() as s:
        job = get_job(s, p, job_id)
        # A running job's worker sees the state on its next heartbeat and stops the training process.
        if not transition(s, job_id, ("validating_files", "queued", "running"), "cancelled"):
            s.refresh(job)
            raise APIError(409, f"Job {job_id} is already {job.status}; only an active job can be cancelled.",
                           code="job_not_cancellable")
        add_event(s, job_id, "Job cancelled")
        record(request, s, "job.cancel", "fine_tuning.job", job_id)
        s.flush()
        s.refresh(job)
        return job_json(job)


def event_json(e: JobEvent) -> dict:
    return {"id": f"ftevent-{e.id}", "object": "fine_tuning.job.event", "created_at": int(e.created_at),
            "level": e.level, "message": e.message, "type": e.type, "data": e.data}


def _after_int(after: str | None, prefix: str) -> int | None:
    if after is None:
        return None
    raw = after[len(prefix):] if after.startswith(prefix) else after
    if not raw.isdigit():
        raise APIError(400, f"after: expected an id like {prefix}123", code="invalid_value", param="after")
    return int(raw)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(job_id: str, request: Request, after: str | None = None, limit: int = 20,
                p: Principal = Depends(viewer)):
    limit, anchor = max(1, min(limit, 1000)), _after_int(after, "ftevent-")
    with request.app.state.store.session() as s:
        get_job(s, p, job_id)
        q = select(JobEvent).where(JobEvent.job_id == job_id)
        if anchor is not None:
            q = q.where(JobEvent.id < anchor)
        rows = s.scalars(q.order_by(JobEvent.id.desc()).limit(limit + 1)).all()
        return _page(list(rows), limit, event_json)


def checkpoint_json(c: Checkpoint, job: Job) -> dict:
    base = job.fine_tuned_model or f"ft:{job.model}:{job.suffix or ''}:{job.id}"
    return {"id": c.id, "object": "fine_tuning.job.checkpoint", "created_at": int(c.created_at),
            "fine_tuned_model_checkpoint": f"{base}:ckpt-step-{c.step}", "fine_tuning_job_id": job.id,
            "metrics": c.metrics, "step_number": c.step}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(job_id: str, request: Request, after: str | None = None, limit: int = 10,
                     p: Principal = Depends(viewer)):
    limit = max(1, min(limit, 100))
    with request.app.state.store.session() as s:
        job = get_job(s, p, job_id)
        rows = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                              .order_by(Checkpoint.step.desc())).all())
        if after:
            ids = [c.id for c in rows]
            rows = rows[ids.index(after) + 1:] if after in ids else []
        return _page(rows, limit, lambda c: checkpoint_json(c, job))


@router.get("/v1/fine_tuning/jobs/{job_id}/metrics")
def list_metrics(job_id: str, request: Request, after: int = 0, limit: int = 1000, p: Principal = Depends(viewer)):
    """hone's own: the run's metrics.jsonl rows (train/validation losses by step), oldest first."""
    limit = max(1, min(limit, 10000))
    with request.app.state.store.session() as s:
        get_job(s, p, job_id)
        rows = s.scalars(select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.id > after)
                         .order_by(JobMetric.id).limit(limit + 1)).all()
        return _page(list(rows), limit, lambda m: {"id": m.id, "step": m.step, "split": m.split, **m.data})


__all__ = ["router", "TERMINAL"]
