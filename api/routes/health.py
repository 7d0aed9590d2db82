from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import SettingsDep, StorageDep
from api.schemas import Health, Readiness
from service.readiness import check_all

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the API process answers")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: the database, the broker and the storage are reachable",
    description=(
        "Checks the three backends at once, each with a short timeout (`MOLA_READY_TIMEOUT_SECONDS`). "
        "503 when any of them fails, with the reason per backend."
    ),
    responses={503: {"model": Readiness, "description": "a backend is not reachable"}},
)
def readyz(request: Request, settings: SettingsDep, storage: StorageDep) -> JSONResponse:
    checks = check_all(request.app.state.engine, settings, storage)
    failed = [name for name, result in checks.items() if result != "ok"]
    body = Readiness(status="unavailable" if failed else "ready", checks=checks, failed=failed)
    return JSONResponse(body.model_dump(), status_code=503 if failed else 200)
