"""Request dependencies: settings, database session, artifact store (all per app, from
`app.state`, so several apps with different settings can live in one process, as in tests)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import require_tenant
from store.artifacts import ArtifactStore
from store.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request; routes commit explicitly, anything uncommitted is rolled back.

    Async on purpose: creating a Session does no I/O, so it costs no worker-thread hop (a sync
    generator dependency costs two); closing one that holds a connection (rollback + return to
    the pool) runs in the thread pool. The close runs after the response has started: a connection
    that died meanwhile (database outage; its 503 is already sent) is logged and dropped by the
    pool, not raised into the server."""
    session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        try:
            if session.in_transaction():
                await run_in_threadpool(session.close)
            else:
                session.close()
        except DBAPIError as exc:
            logging.getLogger("carcert.api").warning("closing a database session failed: %s", exc)


def get_artifact_store(request: Request) -> ArtifactStore:
    return request.app.state.artifact_store


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_artifact_store)]
TenantDep = Annotated[str, Depends(require_tenant)]
