"""The official `openai` SDK against a real `hone api` server (uvicorn on a free port) and a worker, on the tiny
model: files.create -> fine_tuning.jobs.create -> poll retrieve / list_events -> chat.completions.create with
the fine-tuned model id."""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from hone.service.app import create_app  # noqa: E402
from hone.service.auth import create_key  # noqa: E402
from hone.service.models_routes import register_base  # noqa: E402
from hone.service.settings import Settings  # noqa: E402
from hone.service.worker import Worker  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread (in-process, so the test sees the same store), stopped on exit."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def training_file() -> bytes:
    rows = [{"messages": [{"role": "system", "content": "Route the ticket."},
                          {"role": "user", "content": f"my package {i} is late"},
                          {"role": "assistant", "content": "shipping"}]} for i in range(12)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_openai_sdk_full_flow(tmp_path, tiny_model_dir):
    defaults = {"train": {"max_steps": 4, "threads": 1, "batch_tokens": 256, "log_every": 1, "save_every": 2},
                "data": {"max_seq_len": 64}, "eval": {"enabled": False}}
    settings = Settings(data_dir=tmp_path / "data", train_defaults=defaults, heartbeat_seconds=0.5,
                        poll_seconds=0.2)
    app = create_app(settings)
    with app.state.store.session() as s:
        register_base(s, "tiny", str(tiny_model_dir))
        key = create_key(s, "sdk", "member")[1]
    worker = Worker(settings, store=app.state.store)
    worker_thread = threading.Thread(target=worker.run, kwargs={"once": True}, daemon=True)
    with Server(app) as server:
        client = openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{server.port}/v1", max_retries=0)
        f = client.files.create(file=("tickets.jsonl", io.BytesIO(training_file())), purpose="fine-tune")
        assert f.id.startswith("file-") and f.purpose == "fine-tune"
        job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, suffix="tickets", seed=3,
                                             hyperparameters={"n_epochs": 1})
        assert job.status == "queued"
        worker_thread.start()
        end = time.monotonic() + 300
        while job.status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < end, f"job still {job.status}"
            time.sleep(0.5)
            job = client.fine_tuning.jobs.retrieve(job.id)
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        assert job.status == "succeeded", (job.error, [e.message for e in events])
        assert job.fine_tuned_model == f"ft:tiny:tickets:{job.id.removeprefix('ftjob-')}"
        assert events[0].message == "The job has successfully completed"
        assert any(e.type == "metrics" for e in events)
        assert [j.id for j in client.fine_tuning.jobs.list(limit=5).data] == [job.id]
        assert job.fine_tuned_model in [m.id for m in client.models.list().data]
        assert client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number == 4
        reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                               messages=[{"role": "user", "content": "my package 3 is late"}])
        assert reply.model == job.fine_tuned_model and reply.choices[0].message.role == "assistant"
        assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens >= 1
        # Another project's key cannot use the model.
        with app.state.store.session() as s:
            other = create_key(s, "other", "member")[1]
        stranger = openai.OpenAI(api_key=other, base_url=f"http://127.0.0.1:{server.port}/v1", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            stranger.chat.completions.create(model=job.fine_tuned_model, max_tokens=2,
                                             messages=[{"role": "user", "content": "hi"}])
    worker_thread.join(timeout=30)
