"""The service's queues: what goes to each, how many workers consume it, what waits and runs."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.schemas import ErrorResponse, QueueList, QueueState
from service import workers

router = APIRouter(prefix="/queues", tags=["queues"], responses={401: {"model": ErrorResponse}})


@router.get(
    "",
    response_model=QueueList,
    summary="The queues, their workers and what waits on them",
    description=(
        "Each queue the service sends work to (`MOLA_QUEUE`: jobs; `MOLA_QUICK_QUEUE`: an "
        "upload's token counts; `MOLA_GENERATION_QUEUE`, when set: generations), with its live "
        "workers (each worker reports itself every `MOLA_RECONCILE_SECONDS`; one unseen for "
        "three of them is not counted) and how much waits and runs there, across tenants. "
        "`workers: 0` means nothing will run what waits there until a worker starts."
    ),
)
def list_queues(_tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> QueueList:
    return QueueList(data=[QueueState(**state) for state in workers.queue_states(session, settings)])
