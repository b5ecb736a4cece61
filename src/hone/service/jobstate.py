"""A job's life: validating_files -> queued -> running -> succeeded | failed | cancelled.

Every change of state is one conditional UPDATE (`... WHERE id = ? AND status IN (...)`) checked by its row
count, so the API cancelling and a worker finishing can race safely: whichever lands first wins, and a
terminal state never changes afterwards.
"""

from __future__ import annotations

from sqlalchemy import update

from hone.service.store import Job, JobEvent, now

ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


def transition(session, job_id: str, from_states: tuple[str, ...], to: str, *, held_by: str | None = None,
               **fields) -> bool:
    """Move the job to `to` if it is in one of `from_states` (and, if given, held by worker `held_by`)."""
    values = dict(fields, status=to)
    if to in TERMINAL:
        values.setdefault("finished_at", now())
    q = update(Job).where(Job.id == job_id, Job.status.in_(from_states))
    if held_by is not None:
        q = q.where(Job.worker_id == held_by)
    return session.execute(q.values(**values).execution_options(synchronize_session=False)).rowcount == 1


def add_event(session, job_id: str, message: str, level: str = "info", type: str = "message",
              data: dict | None = None, at: float | None = None) -> None:
    session.add(JobEvent(job_id=job_id, message=message, level=level, type=type, data=data,
                         created_at=at or now()))
