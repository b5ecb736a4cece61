"""The worker on the tiny model: a job trains in a `hone train` subprocess, its progress streams into the store,
cancel stops it, and a job whose worker died is re-queued and resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from hone.service.app import create_app
from hone.service.auth import create_key
from hone.service.models_routes import register_base
from hone.service.settings import Settings
from hone.service.store import Checkpoint, Job, JobMetric
from hone.service.worker import Worker

TOY = {"billing": "charged invoice payment", "shipping": "package delivery courier", "login": "password locked"}


def toy_jsonl(n: int) -> bytes:
    rows = []
    for i in range(n):
        label = list(TOY)[i % 3]
        word = TOY[label].split()[i % len(TOY[label].split())]
        rows.append({"messages": [{"role": "user", "content": f"my {word} issue number {i}"},
                                  {"role": "assistant", "content": label}]})
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def service(tmp_path, tiny_model_dir, max_steps: int, **settings):
    defaults = {"train": {"max_steps": max_steps, "threads": 1, "batch_tokens": 256, "log_every": 1,
                          "save_every": 2, "warmup_ratio": 0.0},
                "data": {"max_seq_len": 64}, "eval": {"enabled": False}}
    st = Settings(data_dir=tmp_path / "data", train_defaults=defaults, heartbeat_seconds=0.2, **settings)
    app = create_app(st)
    with app.state.store.session() as s:
        register_base(s, "tiny", str(tiny_model_dir))
        key = create_key(s, "team", "member")[1]
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    fid = client.post("/v1/files", files={"file": ("t.jsonl", toy_jsonl(30))}, data={"purpose": "fine-tune"}).json()["id"]
    return SimpleNamespace(app=app, client=client, settings=st, file_id=fid, store=app.state.store)


def new_job(svc, **body) -> str:
    r = svc.client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": svc.file_id, **body})
    assert r.json()["status"] == "queued", r.text
    return r.json()["id"]


def job_row(svc, job_id) -> Job:
    with svc.store.session() as s:
        return s.get(Job, job_id)


def wait_for(predicate, timeout=120.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_runs_job_and_streams_progress(tmp_path, tiny_model_dir):
    svc = service(tmp_path, tiny_model_dir, max_steps=6)
    job_id = new_job(svc, suffix="toy")
    worker = Worker(svc.settings, store=svc.store)
    assert worker.run(once=True) == 1
    job = svc.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_model"] == f"ft:tiny:toy:{job_id.removeprefix('ftjob-')}"
    assert job["trained_tokens"] > 0 and job["finished_at"] >= job["created_at"]
    events = svc.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    messages = [e["message"] for e in events]
    assert messages[0] == "The job has successfully completed"
    assert any(m.startswith("Step 6: training loss=") for m in messages)
    assert "saved final weights to <run>/final" in messages  # hone train's own events, server paths hidden
    assert not any(str(tmp_path) in m for m in messages)
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # each metrics line stored once
    with svc.store.session() as s:
        assert s.scalar(select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.id.desc())) == 6
    ckpts = svc.client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in ckpts][:2] == [6, 4]
    assert ckpts[0]["fine_tuned_model_checkpoint"] == f"{job['fine_tuned_model']}:ckpt-step-6"
    models = [m["id"] for m in svc.client.get("/v1/models").json()["data"]]
    assert job["fine_tuned_model"] in models
    resolved = svc.app.state.model_resolver(job["organization_id"], job["fine_tuned_model"])
    assert (resolved.adapter_path and os.path.isfile(os.path.join(resolved.adapter_path, "adapter_config.json")))
    assert resolved.base_path == str(tiny_model_dir.resolve())
    # Terminal: cancelling now is refused and changes nothing.
    assert svc.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 409
    assert svc.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "succeeded"


def test_dpo_job_on_openai_preference_rows(tmp_path, tiny_model_dir):
    svc = service(tmp_path, tiny_model_dir, max_steps=2)
    rows = [{"input": {"messages": [{"role": "user", "content": f"where is parcel {i}?"}]},
             "preferred_output": [{"role": "assistant", "content": "shipping"}],
             "non_preferred_output": [{"role": "assistant", "content": "billing"}]} for i in range(12)]
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fid = svc.client.post("/v1/files", files={"file": ("pairs.jsonl", content)}, data={"purpose": "fine-tune"}).json()["id"]
    r = svc.client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny", "training_file": fid,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}}})
    job_id = r.json()["id"]
    assert Worker(svc.settings, store=svc.store).run(once=True) == 1
    job = job_row(svc, job_id)
    assert job.status == "succeeded", job.error
    run_config = (tmp_path / "data" / "runs" / job.project_id / job_id / "config.yaml").read_text()
    assert "method: dpo" in run_config and "beta: 0.3" in run_config
    converted = (tmp_path / "data" / "jobs" / job_id / "train.jsonl").read_text().splitlines()[0]
    assert json.loads(converted)["chosen"] == [{"role": "assistant", "content": "shipping"}]


def test_failed_training_carries_an_error(tmp_path, tiny_model_dir):
    svc = service(tmp_path, tiny_model_dir, max_steps=2)
    (tmp_path / "empty").mkdir()
    with svc.store.session() as s:
        register_base(s, "broken", str(tmp_path / "empty"))  # not a model: hone train exits 2 (bad input)
    r = svc.client.post("/v1/fine_tuning/jobs", json={"model": "broken", "training_file": svc.file_id})
    job_id = r.json()["id"]
    assert Worker(svc.settings, store=svc.store).run(once=True) == 1
    job = svc.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["fine_tuned_model"] is None
    assert job["error"]["code"] == "invalid_input" and job["error"]["message"]
    assert str(tmp_path) not in job["error"]["message"]  # no server paths in what users see
    assert "base model broken: not a model directory" in job["error"]["message"]
    events = svc.client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    assert events[0]["level"] == "error" and events[0]["message"].startswith("The job failed:")


def test_cancel_stops_the_training_process(tmp_path, tiny_model_dir):
    svc = service(tmp_path, tiny_model_dir, max_steps=100000)
    job_id = new_job(svc)
    worker = Worker(svc.settings, store=svc.store)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(r=worker.run_job(worker.claim())))
    thread.start()
    with svc.store.session() as s:
        wait_for(lambda: s.scalar(select(JobMetric.id).where(JobMetric.job_id == job_id).limit(1)) is not None,
                 what="the first metrics line")
    assert svc.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    thread.join(timeout=60)
    assert not thread.is_alive() and outcome["r"] == "stopped"
    job = job_row(svc, job_id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    manifest = json.loads((tmp_path / "data" / "runs" / job.project_id / job_id / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"  # hone train got SIGTERM and stopped cleanly


def test_dead_worker_job_is_requeued_and_resumes(tmp_path, tiny_model_dir):
    svc = service(tmp_path, tiny_model_dir, max_steps=40, stale_after_seconds=1.0)
    job_id = new_job(svc)
    # A worker in its own process (the CLI), killed with SIGKILL once a checkpoint is recorded.
    proc = subprocess.Popen([sys.executable, "-m", "hone", "worker", "--once", "--data-dir", str(tmp_path / "data")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with svc.store.session() as s:
            wait_for(lambda: s.scalar(select(Checkpoint.step).where(Checkpoint.job_id == job_id).limit(1)),
                     what="a checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert job_row(svc, job_id).status == "running"
    time.sleep(1.5)  # let the heartbeat go stale (and the orphaned trainer die with its parent)
    worker = Worker(svc.settings, store=svc.store)
    assert worker.run(once=True) == 1
    job = job_row(svc, job_id)
    assert job.status == "succeeded" and job.attempts == 2, job.error
    events = [e["message"] for e in svc.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]]
    assert any("stopped heartbeating; job re-queued" in m for m in events)
    resumed = [m for m in events if m.startswith("resumed from step-")]
    assert len(resumed) == 1 and "of 40" in resumed[0]
    steps = [e for e in svc.client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics?limit=10000").json()["data"]
             if e["split"] == "train"]
    assert steps[-1]["step"] == 40


def test_sigterm_hands_the_job_back(tmp_path, tiny_model_dir):
    svc = service(tmp_path, tiny_model_dir, max_steps=40)
    job_id = new_job(svc)
    proc = subprocess.Popen([sys.executable, "-m", "hone", "worker", "--once", "--data-dir", str(tmp_path / "data")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with svc.store.session() as s:
            wait_for(lambda: s.scalar(select(Checkpoint.step).where(Checkpoint.job_id == job_id).limit(1)),
                     what="a checkpoint")
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == 0 and "re-queued" in output, output[-2000:]
    job = job_row(svc, job_id)
    assert job.status == "queued" and job.worker_id is None
    assert Worker(svc.settings, store=svc.store).run(once=True) == 1
    job = job_row(svc, job_id)
    assert job.status == "succeeded" and job.attempts == 2
    events = [e["message"] for e in svc.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]]
    assert any("stopped; job re-queued" in m for m in events) and any(m.startswith("resumed from") for m in events)


@pytest.mark.parametrize("attempts", [3])
def test_stale_job_fails_after_max_attempts(tmp_path, tiny_model_dir, attempts):
    svc = service(tmp_path, tiny_model_dir, max_steps=2, stale_after_seconds=0.0, max_attempts=attempts)
    job_id = new_job(svc)
    with svc.store.session() as s:
        s.get(Job, job_id).status, s.get(Job, job_id).attempts, s.get(Job, job_id).heartbeat_at = "running", 3, 1.0
    assert Worker(svc.settings, store=svc.store).requeue_stale() == 1
    job = svc.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
