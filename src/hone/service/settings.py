"""Service settings: the database URL, the data directory, limits and the defaults jobs train with.

Defaults need no set-up: SQLite at <data_dir>/hone.db, files and runs under <data_dir>. Environment
variables (HONE_DB, HONE_DATA_DIR) fill what the command line does not give.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = "hone-data"


@dataclass
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("HONE_DATA_DIR", DEFAULT_DATA_DIR)))
    # SQLAlchemy URL; None means sqlite at <data_dir>/hone.db. PostgreSQL: postgresql+psycopg://user@host/db
    db_url: str | None = field(default_factory=lambda: os.environ.get("HONE_DB") or None)
    max_upload_bytes: int = 512 * 2**20
    max_request_bytes: int = 16 * 2**20  # any other request body (chat messages, job bodies)
    # A running job whose worker has not heartbeaten for this long is re-queued (and resumes).
    heartbeat_seconds: float = 10.0
    stale_after_seconds: float = 60.0
    max_attempts: int = 3
    poll_seconds: float = 2.0
    # Merged into every job's generated training config (e.g. {"train": {"threads": 2}}).
    train_defaults: dict = field(default_factory=dict)
    # Encryption keys for stored files (storage.Keyring): $HONE_ENCRYPTION_KEY if set, else this key file
    # (created 0600 on first start); None means <data_dir>/encryption-keys.json.
    key_file: Path | None = field(default_factory=lambda: os.environ.get("HONE_KEY_FILE") or None)

    def __post_init__(self):
        self.data_dir = Path(self.data_dir)

    @property
    def key_path(self) -> Path:
        return Path(self.key_file) if self.key_file else self.data_dir / "encryption-keys.json"

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'hone.db').resolve()}"
