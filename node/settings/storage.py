"""Settings of the node's storage: the spool of received files, the database, free disk,
and how long studies and the receive log are kept (``docs/configuration.md``, "Storage").

A base of :class:`node.settings.Settings` (each field is ``CXR_NODE_<FIELD>``);
:meth:`StorageSettings.prepare_runtime` holds the checks that touch the filesystem.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, field_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from node.settings.values import ConfigError, NonNegative

__all__ = ["StorageSettings"]


class StorageSettings(BaseModel):
    """Spool, database and retention; every refusal names its setting."""

    spool_dir: Path = Path("var/spool")
    # several receivers (other processes or hosts) share spool_dir: see Spool.clean_incoming
    spool_shared: bool = False
    database_url: str = "sqlite:///var/cxr-node.sqlite3"
    min_free_disk_mb: NonNegative = 512
    retention_days: NonNegative = 30
    receive_log_days: NonNegative = 90

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, v: str) -> str:
        try:
            url = make_url(v)
        except ArgumentError as exc:
            raise ValueError(f"database_url: not an SQLAlchemy URL ({exc})") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(
                f"database_url: backend {url.get_backend_name()!r} is not supported "
                "(sqlite or postgresql)"
            )
        return v

    @property
    def database_backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return make_url(self.database_url).get_backend_name()

    def prepare_runtime(self) -> None:
        """Create and check the spool directory (writable, enough free disk) before serving.

        The spool holds patient data: it is created with mode 0700, and an existing one this
        user owns is tightened to 0700 (:mod:`node.filemodes`).

        Raises
        ------
        ConfigError
            Naming ``spool_dir`` or ``min_free_disk_mb``.
        """
        from node.filemodes import make_private_dir

        spool = self.spool_dir
        try:
            make_private_dir(spool, tighten_existing=True)
        except OSError as exc:
            raise ConfigError(f"spool_dir: cannot create {spool}: {exc.strerror}") from None
        try:
            with tempfile.NamedTemporaryFile(dir=spool, prefix=".probe-") as fh:
                fh.write(b"x")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise ConfigError(f"spool_dir: {spool} is not writable: {exc.strerror}") from None
        free_mb = shutil.disk_usage(spool).free // (1024 * 1024)
        if free_mb < self.min_free_disk_mb:
            raise ConfigError(
                f"min_free_disk_mb: only {free_mb} MB free under spool_dir {spool}, "
                f"below {self.min_free_disk_mb} MB"
            )
