"""hone as a service: an OpenAI-compatible fine-tuning API (`hone api`) and job workers (`hone worker`).

    app.py            FastAPI app factory `create_app(settings)`; mounts every router
    settings.py       where the database and the data directory are, limits, training defaults
    store.py          SQLAlchemy 2.0 models (projects, keys, files, jobs, events, metrics, checkpoints, models)
    migrations/       Alembic; `hone api` and `hone worker` upgrade the database to head at start
    auth.py           API keys (sha256-hashed), roles, project scoping; keys routes
    actions.py        the one place every mutating route reports what it did (the audit log hooks in here)
    storage.py        the one class that writes and reads stored bytes (encryption at rest hooks in here)
    files.py          /v1/files;  jobs.py /v1/fine_tuning/jobs;  models_routes.py /v1/models
    worker.py         claims queued jobs, runs `hone train` in a subprocess, streams its progress into the store
"""
