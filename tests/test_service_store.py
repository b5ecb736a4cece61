"""The store and the job queue, on SQLite and on a real PostgreSQL server.

PostgreSQL: $HONE_TEST_POSTGRES_URL when set (CI starts one with scripts/start-postgres), else a throwaway
server started here with that script; the postgres cases skip when neither works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from hone.service.auth import create_key
from hone.service.jobstate import TERMINAL, transition
from hone.service.settings import Settings
from hone.service.store import ApiKey, Job, Project, Store, new_id, now, open_store
from hone.service.worker import Worker

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "start-postgres"
TABLES = {"projects", "api_keys", "files", "jobs", "job_events", "job_metrics", "checkpoints", "models"}


@pytest.fixture(scope="session")
def postgres_server():
    url = os.environ.get("HONE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    pytest.importorskip("psycopg")
    workdir = tempfile.mkdtemp(prefix="hone-pg-")  # under /tmp itself: the postgres user must reach it
    port = _free_port()
    try:
        out = subprocess.run([str(SCRIPT), workdir, str(port)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(f"no PostgreSQL server could be started: {e}")
    if out.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(f"no PostgreSQL server could be started: {out.stderr.strip()[-300:]}")
    yield out.stdout.strip()
    subprocess.run([str(SCRIPT), "--stop", workdir], capture_output=True, timeout=120)
    shutil.rmtree(workdir, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_db(postgres_server):
    """A fresh database on the test server, dropped afterwards; its URL."""
    name = f"hone_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, tmp_path):
    if request.param == "sqlite":
        return Settings(data_dir=tmp_path / "data")
    return Settings(data_dir=tmp_path / "data", db_url=request.getfixturevalue("postgres_db"))


@pytest.fixture
def store(settings):
    s = open_store(settings)
    yield s
    s.dispose()


def queued_jobs(store: Store, n: int) -> list[str]:
    with store.session() as s:
        _, _ = create_key(s, "p", "member")
        project = s.scalar(select(Project.id))
        ids = []
        for i in range(n):
            job = Job(id=new_id("ftjob-"), project_id=project, model="tiny", training_file=None, method={},
                      hyperparameters={}, seed=0, status="queued", config={}, created_at=now() + i * 1e-3)
            s.add(job)
            ids.append(job.id)
    return ids


def test_migration_creates_the_schema(store, settings):
    assert TABLES <= set(inspect(store.engine).get_table_names())
    with store.engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"  # 0002: audit_events
        if not store.is_postgres:
            assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert Path(settings.data_dir / "hone.db").is_file()
    open_store(settings).dispose()  # upgrading an up-to-date database is a no-op


def test_models_match_the_migrations(store):
    """A model change without a migration shows up here (what `alembic revision --autogenerate` would add)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from hone.service.store import Base

    with store.engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diff == []


def test_foreign_keys_are_enforced(store):
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.add(ApiKey(id="key_x", project_id="proj_missing", role="admin", key_hash="0" * 64, prefix="x"))


def test_claims_are_exclusive_under_contention(store, settings):
    ids = queued_jobs(store, 6)
    claimed: list[str] = []
    lock = threading.Lock()

    def work(n):
        w = Worker(settings, store=store, worker_id=f"w{n}")
        while (job := w.claim()) is not None:
            with lock:
                claimed.append(job)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # each job exactly once
    with store.session() as s:
        rows = s.scalars(select(Job)).all()
        assert {r.status for r in rows} == {"running"} and {r.attempts for r in rows} == {1}
        assert all(r.worker_id and r.heartbeat_at for r in rows)


def test_claim_skips_a_locked_job_on_postgres(store, settings):
    if not store.is_postgres:
        pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite serialises writers")
    first, second = queued_jobs(store, 2)
    with store.engine.connect() as holder:
        tx = holder.begin()
        holder.execute(select(Job.id).where(Job.id == first).with_for_update())
        assert Worker(settings, store=store, worker_id="w").claim() == second  # not blocked by the lock
        tx.rollback()
    assert Worker(settings, store=store, worker_id="w2").claim() == first


def test_terminal_states_never_change(store):
    (job,) = queued_jobs(store, 1)
    with store.session() as s:
        assert transition(s, job, ("queued",), "cancelled")
    for to in ("queued", "running", "succeeded", "failed"):
        with store.session() as s:
            assert not transition(s, job, ("validating_files", "queued", "running"), to)
    with store.session() as s:
        row = s.get(Job, job)
        assert row.status == "cancelled" and row.finished_at is not None and "cancelled" in TERMINAL


def test_stale_running_job_is_requeued_live_one_is_not(store, settings):
    stale, live = queued_jobs(store, 2)
    w = Worker(settings.__class__(data_dir=settings.data_dir, db_url=settings.db_url, stale_after_seconds=30),
               store=store, worker_id="old")
    assert w.claim() == stale and w.claim() == live
    with store.session() as s:
        s.get(Job, stale).heartbeat_at = now() - 120
    assert w.requeue_stale() == 1
    with store.session() as s:
        assert (s.get(Job, stale).status, s.get(Job, stale).worker_id) == ("queued", None)
        assert s.get(Job, live).status == "running"
    # The dead worker's late heartbeat no longer holds the job; the new claim does.
    assert not w.heartbeat(stale)
    assert Worker(settings, store=store, worker_id="new").claim() == stale
