"""Engine, sessions and migrations.

SQLite (the embedded default) is shared by the API and a worker process, so it runs in WAL mode
with a busy timeout: readers never block the writer and short write transactions queue up
instead of failing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = ROOT / "alembic.ini"
MIGRATIONS = ROOT / "migrations"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(settings: Settings) -> Engine:
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # A database host that does not answer fails a connection after 10 s, not the OS's minutes.
    connect_args = {"connect_timeout": 10} if make_url(url).get_driver_name() in ("psycopg", "psycopg2") else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits at the end of the block, or rolls back on an exception."""
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(settings: Settings):
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS))
    # env.py reads the URL from here (escaped: configparser interpolates '%').
    config.set_main_option("sqlalchemy.url", settings.resolved_database_url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    return config


def migrate(settings: Settings, revision: str = "head") -> None:
    """`alembic upgrade <revision>` on the configured database."""
    # Alembic announces each of its plugins at INFO when it is imported: a screenful before the
    # migrations that matter (and, at `mola serve`, before the first API key).
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from alembic import command

    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), revision)
    logger.info("database at %s is at revision %s", settings.resolved_database_url, revision)


def downgrade(settings: Settings, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(settings), revision)


def mark_each(session: Session, model: Any, conditions: tuple, values: dict[str, Any], limit: int = 1000) -> list[str]:
    """Set ``values`` on the rows of ``model`` that meet ``conditions``, one conditional UPDATE
    per row, and return the ids this call changed (in id order). A row that another session
    changed in between no longer meets the conditions and is left out, so concurrent callers
    (several reconcilers, say) each act on a row at most once."""
    ids = list(session.scalars(select(model.id).where(*conditions).order_by(model.id).limit(limit)))
    return [id_ for id_ in ids if session.execute(update(model).where(model.id == id_, *conditions).values(**values)).rowcount]
