"""Dependencies of the routes, as `Annotated` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.middleware import MISSING_KEY_DETAIL
from service import security
from service.models import Tenant
from service.queue import JobQueue
from service.settings import Settings
from service.storage import Storage

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
    tenant = security.authenticate(session, credentials.credentials)
    if tenant is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key", headers=challenge)
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
