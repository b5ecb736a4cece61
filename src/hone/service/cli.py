"""The service's commands: `hone api` (serve), `hone api create-key`, `hone api add-base`, `hone worker`.

    hone api [--host 127.0.0.1 --port 8000 --db URL --data-dir DIR --train-set train.threads=2]
    hone api create-key --project P --role admin|member|viewer [--name N]
    hone api add-base NAME PATH           register a base model (a local HF directory or .gguf file)
    hone api rotate-key [--key-file F] [--encrypt-plaintext]   re-encrypt stored files under a new key
    hone worker [--db URL --data-dir DIR --key-file F --once]

Each opens the database named by --db (or $HONE_DB), else SQLite at <data-dir>/hone.db, and upgrades it to
the newest schema first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hone.cli_common import fail, out

api_app = typer.Typer(help="The OpenAI-compatible fine-tuning API server, and its keys and base models.",
                      invoke_without_command=True, no_args_is_help=False)

_DB = typer.Option(None, "--db", help="Database URL (sqlite:///... or postgresql+psycopg://...); default: "
                                       "$HONE_DB, else SQLite at <data-dir>/hone.db.")
_DATA = typer.Option(None, "--data-dir", help="Where uploads, job data and runs are kept; default: "
                                              "$HONE_DATA_DIR, else ./hone-data.")
_KEYS = typer.Option(None, "--key-file", help="Encryption keys for stored files (JSON, created with mode 0600 "
                                              "if absent); default $HONE_KEY_FILE, else "
                                              "<data-dir>/encryption-keys.json. $HONE_ENCRYPTION_KEY, when set, "
                                              "is used instead.")


def _settings(db: Optional[str], data_dir: Optional[Path], train_set: list[str] | None = None,
              key_file: Optional[Path] = None):
    from hone.config import ConfigError, apply_overrides
    from hone.service.settings import Settings

    s = Settings()
    if data_dir is not None:
        s.data_dir = Path(data_dir)
    if db:
        s.db_url = db
    if key_file is not None:
        s.key_file = Path(key_file)
    try:
        s.train_defaults = apply_overrides({}, train_set or [])
    except ConfigError as e:
        fail(str(e))
    return s


def _open(settings):
    from hone.service.store import open_store

    try:
        return open_store(settings)
    except Exception as e:  # a bad URL, an unreachable server: say which database
        fail(f"cannot open the database {settings.database_url}: {e}")


@api_app.callback()
def api(ctx: typer.Context,
        host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
        port: int = typer.Option(8000, help="Port to listen on."),
        db: Optional[str] = _DB, data_dir: Optional[Path] = _DATA, key_file: Optional[Path] = _KEYS,
        train_set: list[str] = typer.Option([], "--train-set", help=(
            "Default for every job's run config, KEY=VALUE as `hone train --set` (e.g. train.threads=2); "
            "a job's own hyperparameters override it."))):
    """Serve the API (OpenAI-compatible /v1/files, /v1/fine_tuning/jobs, /v1/models, /v1/chat/completions)."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from hone.service.app import create_app

    settings = _settings(db, data_dir, train_set, key_file)
    try:
        app = create_app(settings, store=_open(settings))
    except ValueError as e:  # a malformed key file or $HONE_ENCRYPTION_KEY
        fail(str(e))
    out.print(f"hone api on http://{host}:{port}/v1 (database {settings.database_url}, data {settings.data_dir})")
    uvicorn.run(app, host=host, port=port, log_level="info")


@api_app.command("create-key")
def create_key_cmd(project: str = typer.Option(..., "--project", help="Project name (created if new)."),
                   role: str = typer.Option(..., "--role", help="admin, member or viewer."),
                   name: Optional[str] = typer.Option(None, "--name", help="A label for the key."),
                   db: Optional[str] = _DB, data_dir: Optional[Path] = _DATA):
    """Make an API key and print it once (only its hash is stored). The first admin key is made this way."""
    from hone.service.auth import ROLES, create_key

    if role not in ROLES:
        fail(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
    store = _open(_settings(db, data_dir))
    with store.session() as s:
        row, key = create_key(s, project, role, name)
    out.print(f"created {role} key {row.id} for project {project!r}; it is shown only now:")
    print(key)


@api_app.command("add-base")
def add_base_cmd(name: str = typer.Argument(..., help="The model id jobs and chat requests use."),
                 path: str = typer.Argument(..., help="A local HF model directory or .gguf file."),
                 db: Optional[str] = _DB, data_dir: Optional[Path] = _DATA):
    """Register a base model that every project can fine-tune and chat with."""
    from hone.service.models_routes import register_base

    store = _open(_settings(db, data_dir))
    try:
        with store.session() as s:
            row = register_base(s, name, path)
    except ValueError as e:
        fail(str(e))
    out.print(f"base model {row.id} -> {row.base_path}")


@api_app.command("rotate-key")
def rotate_key_cmd(data_dir: Optional[Path] = _DATA, key_file: Optional[Path] = _KEYS,
                   encrypt_plaintext: bool = typer.Option(False, "--encrypt-plaintext", help=(
                       "Also encrypt stored files written before encryption at rest (unencrypted blobs)."))):
    """Re-encrypt every stored file under a new key. Key file: a new key is added (old ones stay readable
    while this runs), every file is re-sealed, then the old keys are dropped. $HONE_ENCRYPTION_KEY: put the new
    key first and the old ones after it, run this, then remove the old ones."""
    from hone.service.storage import FileStore, rotate

    settings = _settings(None, data_dir, key_file=key_file)
    try:
        store = FileStore.from_settings(settings)
        counts = rotate(store, encrypt_plaintext)
    except ValueError as e:
        fail(str(e))
    except Exception as e:  # a blob that fails its check or has no key: nothing more is re-sealed
        fail(f"rotation stopped: {e}")
    out.print(f"re-encrypted {counts['resealed']} file(s) under key {counts['new_key_id']} "
              f"({counts['current']} already under it, {counts['plaintext_left']} unencrypted left); "
              f"old key ids: {', '.join(counts['old_key_ids']) or 'none'}")


def worker_command(db: Optional[str] = _DB, data_dir: Optional[Path] = _DATA, key_file: Optional[Path] = _KEYS,
                   once: bool = typer.Option(False, "--once", help="Run at most one queued job, then exit.")):
    """Claim queued fine-tuning jobs and run them (several workers may share one PostgreSQL database).

    SIGTERM or Ctrl-C stops the running training (it saves a checkpoint) and re-queues its job, so another
    worker resumes it."""
    from hone.service.worker import Worker

    settings = _settings(db, data_dir, key_file=key_file)
    try:
        worker = Worker(settings, store=_open(settings))
    except ValueError as e:  # a malformed key file or $HONE_ENCRYPTION_KEY
        fail(str(e))
    worker.stop_on_signals()
    out.print(f"hone worker {worker.id} (database {settings.database_url})")
    n = worker.run(once=once)
    back = f"; stopped by a signal, re-queued {', '.join(worker.handed_back)}" if worker.handed_back else ""
    out.print(f"ran {n} job(s){back}")
