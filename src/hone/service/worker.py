"""`hone worker`: claim queued fine-tuning jobs, run each as a `hone train` subprocess, stream its progress.

    hone worker [--db URL] [--data-dir DIR] [--once]

Claiming is transactional: on PostgreSQL `SELECT ... FOR UPDATE SKIP LOCKED` then an UPDATE in the same
transaction (several workers on several machines share one database); on SQLite a conditional
`UPDATE jobs SET status='running' ... WHERE id=? AND status='queued'` whose row count says who won.

While `hone train` runs, the worker copies new complete lines of the run's events.jsonl and metrics.jsonl
into the store (byte offsets kept on the job row, so a worker taking over never stores a line twice),
records complete checkpoints, and heartbeats. A heartbeat that finds the job no longer running (cancelled
through the API) stops the subprocess. A running job whose heartbeat is older than
settings.stale_after_seconds is re-queued by any worker and resumes from its newest checkpoint
(`hone train --resume`), up to settings.max_attempts; the training process dies with its worker (Linux
parent-death signal), so a dead worker leaves no orphan writing the same run directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml
from sqlalchemy import select, update

from hone.service.files import openai_dpo_row
from hone.service.jobstate import add_event, transition
from hone.service.settings import Settings
from hone.service.storage import FileStore
from hone.service.store import Checkpoint, File, Job, JobMetric, Model, new_id, now, open_store

POLL_SECONDS = 0.5


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    def __init__(self, settings: Settings, store=None, worker_id: str | None = None):
        self.settings = settings
        self.store = store or open_store(settings)
        self.files = FileStore.from_settings(settings)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stopping = False  # set by SIGTERM/SIGINT (see stop_on_signals): hand the job back and exit
        self.handed_back: list[str] = []  # jobs re-queued because this worker was stopping

    def stop_on_signals(self) -> None:
        """On SIGTERM/SIGINT: stop the training process (it checkpoints), re-queue its job, then exit."""
        def handler(_signum, _frame):
            self.stopping = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    # --- the loop ----------------------------------------------------------------------------------------

    def run(self, once: bool = False) -> int:
        """Work until stopped; with `once`, run at most one job and return. Returns jobs run."""
        done = 0
        while not self.stopping:
            self.requeue_stale()
            job_id = self.claim()
            if job_id:
                self.run_job(job_id)
                done += 1
                if once:
                    return done
            elif once:
                return done
            else:
                time.sleep(self.settings.poll_seconds)
        return done

    def claim(self) -> str | None:
        with self.store.session() as s:
            q = select(Job.id).where(Job.status == "queued").order_by(Job.created_at, Job.id)
            if self.store.is_postgres:
                candidates = [s.scalar(q.limit(1).with_for_update(skip_locked=True))]
            else:
                candidates = list(s.scalars(q.limit(8)).all())
            for job_id in candidates:
                if job_id and self._take(s, job_id):
                    return job_id
        return None

    def _take(self, s, job_id: str) -> bool:
        taken = transition(s, job_id, ("queued",), "running", worker_id=self.id, heartbeat_at=now(),
                           attempts=Job.attempts + 1)
        if taken:
            add_event(s, job_id, f"Fine-tuning job started (worker {self.id})")
        return taken

    def requeue_stale(self) -> int:
        """Re-queue running jobs whose worker stopped heartbeating (or fail them after max_attempts)."""
        limit = now() - self.settings.stale_after_seconds
        moved = 0
        with self.store.session() as s:
            stale = s.execute(select(Job.id, Job.worker_id, Job.heartbeat_at, Job.attempts)
                              .where(Job.status == "running", Job.heartbeat_at < limit)).all()
            for job_id, worker, beat, attempts in stale:
                # Conditional on the heartbeat we saw: a worker that beats in between keeps its job.
                same = update(Job).where(Job.id == job_id, Job.status == "running", Job.heartbeat_at == beat)
                if attempts >= self.settings.max_attempts:
                    error = {"code": "worker_lost", "param": None,
                             "message": f"the worker running this job stopped {attempts} time(s); giving up"}
                    values = {"status": "failed", "error": error, "finished_at": now()}
                    message = error["message"]
                else:
                    values = {"status": "queued", "worker_id": None}
                    message = (f"Worker {worker} stopped heartbeating; job re-queued (attempt {attempts} ended), "
                               "it resumes from its last checkpoint")
                if s.execute(same.values(**values)).rowcount == 1:
                    add_event(s, job_id, message, level="warn")
                    moved += 1
        return moved

    # --- one job -----------------------------------------------------------------------------------------

    def prepare(self, job: Job) -> tuple[Path, Path]:
        """(config path, run dir): the job's data copied out of storage and its run config written."""
        job_dir = self.settings.data_dir / "jobs" / job.id
        job_dir.mkdir(parents=True, exist_ok=True)
        data = {"train": str(self._materialize(job.training_file, job_dir / "train"))}
        if job.validation_file:
            data["validation"] = str(self._materialize(job.validation_file, job_dir / "validation"))
        output = self.settings.data_dir / "runs" / job.project_id
        cfg = dict(job.config, name=job.id, output_dir=str(output))
        cfg["data"] = {**cfg.get("data", {}), **data}
        path = job_dir / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path, output / job.id

    def _materialize(self, file_id: str, stem: Path) -> Path:
        with self.store.session() as s:
            f = s.get(File, file_id)
            if f is None:
                raise FileNotFoundError(f"file {file_id} was deleted before the job ran")
            key, kind = f.storage_key, f.kind
        dest = stem.with_suffix(Path(key).suffix)
        self.files.copy_to(key, dest)
        if kind == "preference" and dest.suffix == ".jsonl":
            # OpenAI's DPO rows become hone's {prompt, chosen, rejected}; hone's own rows pass unchanged.
            rows = [json.loads(x) for x in dest.read_text(encoding="utf-8").splitlines() if x.strip()]
            dest.write_text("".join(json.dumps(openai_dpo_row(r)) + "\n" for r in rows), encoding="utf-8")
        return dest

    def run_job(self, job_id: str) -> str:
        with self.store.session() as s:
            job = s.get(Job, job_id)
        try:
            if not job.training_file:
                raise FileNotFoundError("the training file was deleted before the job ran")
            config, run_dir = self.prepare(job)
        except (OSError, ValueError) as e:
            return self._fail(job, {"code": "file_unavailable", "message": str(e), "param": "training_file"})
        resume = (run_dir / "config.yaml").is_file()
        with self.store.session() as s:
            s.execute(update(Job).where(Job.id == job.id).values(run_dir=str(run_dir)))
            if resume:
                add_event(s, job.id, "Resuming the run from its newest checkpoint")
        cmd = [sys.executable, "-m", "hone", "train", str(config)] + (["--resume"] if resume else [])
        log_path = config.parent / "train.log"
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
            kept = self._watch(job, proc, run_dir)
        self.sync(job.id, run_dir)
        if self.stopping and kept and proc.returncode != 0:
            return self._hand_back(job)
        if not kept:
            return "stopped"
        if proc.returncode == 0:
            return self._succeed(job, run_dir)
        return self._fail(job, self._error_of(job, proc.returncode, run_dir, log_path))

    def _watch(self, job: Job, proc: subprocess.Popen, run_dir: Path) -> bool:
        """Stream progress and heartbeat until the process ends; False if the job was taken away (cancel)."""
        next_beat = 0.0
        while proc.poll() is None:
            if self.stopping:
                self._stop(proc)
                return True
            self.sync(job.id, run_dir)
            if time.monotonic() >= next_beat:
                if not self.heartbeat(job.id):
                    self._stop(proc)
                    return False
                next_beat = time.monotonic() + self.settings.heartbeat_seconds
            time.sleep(POLL_SECONDS)
        return True

    def heartbeat(self, job_id: str) -> bool:
        with self.store.session() as s:
            q = update(Job).where(Job.id == job_id, Job.status == "running", Job.worker_id == self.id)
            return s.execute(q.values(heartbeat_at=now())).rowcount == 1

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _succeed(self, job: Job, run_dir: Path) -> str:
        manifest = _read_json(run_dir / "manifest.json")
        training = manifest.get("training") or {}
        model_id = f"ft:{job.model}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')}"
        with self.store.session() as s:
            if not transition(s, job.id, ("running",), "succeeded", held_by=self.id, fine_tuned_model=model_id,
                              trained_tokens=_trained_tokens(training)):
                return "stopped"
            base = s.get(Model, job.model)
            s.add(Model(id=model_id, project_id=job.project_id, kind="fine-tuned", base=job.model,
                        base_path=base.base_path if base else job.config["model"]["base"],
                        adapter_path=str(run_dir / "final"), job_id=job.id, created_at=now()))
            add_event(s, job.id, f"New fine-tuned model created: {model_id}",
                      data={"steps": training.get("steps"), "final_train_loss": training.get("final_train_loss"),
                            "final_val_loss": training.get("final_val_loss")})
            add_event(s, job.id, "The job has successfully completed")
        return "succeeded"

    def _hand_back(self, job: Job) -> str:
        """This worker is stopping: the job goes back to the queue and resumes from its checkpoint."""
        with self.store.session() as s:
            if transition(s, job.id, ("running",), "queued", held_by=self.id, worker_id=None):
                self.handed_back.append(job.id)
                add_event(s, job.id, f"Worker {self.id} stopped; job re-queued, it resumes from its last checkpoint",
                          level="warn")
                return "requeued"
        return "stopped"

    def _fail(self, job: Job, error: dict) -> str:
        with self.store.session() as s:
            if transition(s, job.id, ("running",), "failed", held_by=self.id, error=error):
                add_event(s, job.id, f"The job failed: {error['message']}", level="error")
                return "failed"
        return "stopped"

    def _error_of(self, job: Job, rc: int, run_dir: Path, log_path: Path) -> dict:
        """The job's error from hone train's last error event (or its log's tail), with server paths hidden."""
        errors = [e["message"] for e in _jsonl(run_dir / "events.jsonl") if e.get("level") == "error"]
        tail = [x for x in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()][-5:]
        message = errors[-1] if errors else " ".join(tail)[-2000:] or f"hone train exited with {rc}"
        job_dir = log_path.parent
        param = None
        for name, file_id, key in (("train", job.training_file, "training_file"),
                                   ("validation", job.validation_file, "validation_file")):
            for f in job_dir.glob(f"{name}.*"):
                if str(f) in message:
                    message, param = message.replace(str(f), file_id or name), param or key
        base_path = str((job.config.get("model") or {}).get("base") or "")
        if base_path and base_path != job.model:
            message = message.replace(base_path, f"base model {job.model}")
        message = message.replace(str(self.settings.data_dir.resolve()), "<data>").replace(
            str(self.settings.data_dir), "<data>")
        # hone's exit code 2 is bad input (data, config, model); anything else is a failure while training.
        code = ("invalid_training_data" if param else "invalid_input") if rc == 2 else "training_failed"
        return {"code": code, "message": message, "param": param}

    # --- streaming the run directory into the store --------------------------------------------------------

    def sync(self, job_id: str, run_dir: Path) -> None:
        with self.store.session() as s:
            job = s.get(Job, job_id)
            events, job.events_offset = _new_lines(run_dir / "events.jsonl", job.events_offset)
            metrics, job.metrics_offset = _new_lines(run_dir / "metrics.jsonl", job.metrics_offset)
            for e in events:
                add_event(s, job_id, self._hide_paths(str(e.get("message", "")), run_dir),
                          level=_level(e.get("level")), at=e.get("time"),
                          data={k: v for k, v in e.items() if k not in ("message", "level", "time")} or None)
            for m in metrics:
                s.add(JobMetric(job_id=job_id, step=m.get("step"), split=m.get("split"), data=m,
                                created_at=m.get("time") or now()))
                if m.get("split") == "train" and "loss" in m:
                    add_event(s, job_id, f"Step {m['step']}: training loss={m['loss']:.4f}", type="metrics",
                              data={"step": m["step"], "train_loss": m["loss"]}, at=m.get("time"))
            self._sync_checkpoints(s, job_id, run_dir)

    def _hide_paths(self, message: str, run_dir: Path) -> str:
        """Users see the run's own files by name (`<run>/final`), never the server's directories."""
        for path, name in ((run_dir, "<run>"), (self.settings.data_dir.resolve(), "<data>"),
                           (self.settings.data_dir, "<data>")):
            message = message.replace(str(path), name)
        return message

    @staticmethod
    def _sync_checkpoints(s, job_id: str, run_dir: Path) -> None:
        from hone.train.checkpoint import STEP_DIR

        root = run_dir / "checkpoints"
        if not root.is_dir():
            return
        known = set(s.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)).all())
        for d in sorted(root.iterdir()):
            m = STEP_DIR.match(d.name)
            if not m or int(m.group(1)) in known or not (d / "state.json").is_file():
                continue
            step = int(m.group(1))
            last = s.scalar(select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.split == "train",
                                                    JobMetric.step <= step).order_by(JobMetric.step.desc()).limit(1))
            metrics = {"step": step, **({"train_loss": last.data.get("loss")} if last else {})}
            s.add(Checkpoint(id=new_id("ftckpt-"), job_id=job_id, step=step, path=str(d), metrics=metrics,
                             created_at=d.stat().st_mtime))


def _level(level) -> str:
    return {"warn": "warn", "error": "error"}.get(level, "info")


def _new_lines(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSON lines after byte `offset`, and the offset after the last complete one."""
    if not path.is_file() or path.stat().st_size <= offset:
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next sync
    rows = []
    for line in chunk[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + end


def _jsonl(path: Path) -> list[dict]:
    rows, _ = _new_lines(path, 0)
    return rows


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _trained_tokens(training: dict) -> int | None:
    """Tokens trained on, from the manifest's throughput and time (the loop logs no running total)."""
    tps, seconds = training.get("tokens_per_second"), training.get("seconds")
    return round(tps * seconds) if isinstance(tps, (int, float)) and isinstance(seconds, (int, float)) else None
