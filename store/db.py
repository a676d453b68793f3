"""Engine, sessions and schema set-up. migrations/ (Alembic) is the only source of DDL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from store.settings import get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    """SQLite: shared across threads, WAL, 30 s busy timeout, foreign keys on (the parent folder is
    created). Postgres and others: pool_pre_ping so a restarted server does not break the pool."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


@lru_cache
def get_engine() -> Engine:
    """The engine for settings.database_url (cached; tests clear it with get_engine.cache_clear())."""
    return make_engine(get_settings().database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    """Session factory on get_engine(); expire_on_commit=False so rows stay readable after commit."""
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def reset_caches() -> None:
    """Forget the cached settings, engine and session factory (after changing CARCERT_* env)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_sessionmaker.cache_clear()
    get_engine.cache_clear()
    get_settings.cache_clear()


@contextmanager
def session_scope(factory: sessionmaker[Session] | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = (factory or get_sessionmaker())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str | None = None) -> Any:
    """Alembic Config for migrations/alembic.ini; `url` overrides settings.database_url."""
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.attributes["database_url"] = url
    return cfg


def init_db(engine: Engine | None = None) -> None:
    """Bring the schema to the latest revision (Alembic upgrade head) on `engine` (default: settings)."""
    from alembic import command

    engine = engine or get_engine()
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def downgrade_db(engine: Engine | None = None, revision: str = "base") -> None:
    """Alembic downgrade (default: to an empty schema)."""
    from alembic import command

    engine = engine or get_engine()
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


@contextmanager
def scratch_database(
    server_url: str, prefix: str = "carcert_scratch", *, migrate: bool = True
) -> Iterator[str]:
    """CREATE DATABASE <prefix>_<random> on the Postgres server of `server_url` (migrated to head
    unless migrate=False), yield its URL, DROP DATABASE ... WITH (FORCE) afterwards. For tests and
    benchmarks that need a database of their own."""
    import uuid

    from sqlalchemy import text

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
            if migrate:
                engine = make_engine(url)
                init_db(engine)
                engine.dispose()
            yield url
        finally:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
