"""Dependencies of the routes, as `Annotated` aliases."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api.middleware import MISSING_KEY_DETAIL
from service import security
from service.models import ApiKey, Tenant
from service.queue import JobQueue
from service.settings import Settings
from service.storage import Storage

logger = logging.getLogger(__name__)

bearer = HTTPBearer(auto_error=False, description="an API key from `mola keys create --tenant NAME`")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


def get_current_tenant(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Tenant:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, MISSING_KEY_DETAIL, headers=challenge)
    key = security.find_key(session, credentials.credentials)
    if key is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key", headers=challenge)
    _record_use(session, key)
    return key.tenant


def _record_use(session: Session, key: ApiKey) -> None:
    """`mola keys list` shows when a key was last used; a failure to record it (a busy SQLite)
    must not fail the request it was checked for."""
    try:
        if security.record_use(session, key):
            session.commit()
    except SQLAlchemyError:
        session.rollback()
        logger.warning("could not record the use of API key %s", key.prefix, exc_info=True)


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
