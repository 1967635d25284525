"""Bring a database to the newest schema (or back), through the Alembic migrations only."""

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the migrations up to `revision`."""
    command.upgrade(_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Undo the migrations down to `revision`."""
    command.downgrade(_config(url), revision)
