from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentTenant, SessionDep
from api.schemas import BaseModelList, BaseModelPublic, ErrorResponse, Text
from service import catalogue
from service.errors import NotFound
from service.models import BaseModelEntry

router = APIRouter(prefix="/models", tags=["models"], responses={401: {"model": ErrorResponse}})


@router.get("", response_model=BaseModelList, summary="Base models this server can train")
def list_models(session: SessionDep, _tenant: CurrentTenant) -> BaseModelList:
    return BaseModelList(data=[BaseModelPublic.of(m) for m in catalogue.list_models(session)])


@router.get("/{name:path}", response_model=BaseModelPublic, responses={404: {"model": ErrorResponse}})
def get_model(name: Text, session: SessionDep, _tenant: CurrentTenant) -> BaseModelPublic:
    entry = session.get(BaseModelEntry, name)
    if entry is None:
        names = ", ".join(m.name for m in catalogue.list_models(session)) or "none"
        raise NotFound(f"base model {name!r} not found; available: {names}")
    return BaseModelPublic.of(entry)
