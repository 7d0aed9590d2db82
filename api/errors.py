"""One JSON error shape for every failure: ``{"detail": "..."}``, plus the field paths for a
422. Unexpected exceptions become a 500 without a stack trace (it goes to the log)."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import InvalidRequest, ServiceError

logger = logging.getLogger(__name__)


def _field(loc: tuple | list) -> str:
    return ".".join(str(part) for part in loc)


def _message(error: dict[str, Any]) -> str:
    msg = str(error.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    body: dict[str, Any] = {"detail": exc.detail}
    if isinstance(exc, InvalidRequest):
        body["detail"] = f"{exc.field}: {exc.detail}"
        body["errors"] = [{"loc": list(exc.loc), "field": exc.field, "msg": exc.detail}]
        body.update(exc.extra)
    return JSONResponse(body, status_code=exc.status_code)


def _public(error: dict[str, Any]) -> dict[str, Any]:
    loc = list(error.get("loc", ()))
    if error.get("type") == "json_invalid":  # loc is ("body", position)
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        return {"loc": ["body"], "field": "body", "msg": f"the request body is not valid JSON ({reason}{where})"}
    message = _message(error)
    choices = _choices((error.get("ctx") or {}).get("pattern")) if error.get("type") == "string_pattern_mismatch" else None
    if choices:  # `^(train|eval)$` is a list of words to a person
        message = f"must be {' or '.join(repr(c) for c in choices)}, got {error.get('input')!r}"
    if "Expected UploadFile" in message:  # a multipart part without a filename arrives as text
        message = "must be a file: a multipart part with a filename"
    return {"loc": loc, "field": _field(loc), "msg": message}


def _choices(pattern: Any) -> list[str] | None:
    """The words of a pattern that only lists words (``^(train|eval)$``), else None."""
    match = re.fullmatch(r"\^\(([\w|]+)\)\$", str(pattern or ""))
    return match.group(1).split("|") if match else None


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [_public(e) for e in exc.errors()]
    detail = "; ".join(f"{e['field']}: {e['msg']}" for e in errors) or "invalid request"
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
