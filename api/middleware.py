"""What is refused before a request's body is read.

`UploadSizeLimit`: a request whose Content-Length is too large is refused before it is read, and
one without (chunked) is cut off once it passes the limit; the route checks the file's own size
again exactly. `CredentialsBeforeBody`: a request with a body but no credentials gets its 401
before the body is read."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Room for the multipart framing around the file.
MULTIPART_SLACK = 64 * 1024
MISSING_KEY_DETAIL = "missing API key: send the header 'Authorization: Bearer <key>'"


def too_large_detail(max_bytes: int) -> str:
    return f"upload larger than the limit of {max_bytes / 1024 / 1024:g} MiB"


class UploadSizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, paths: tuple[str, ...] = ("/datasets",)) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") not in self.paths:
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes + MULTIPART_SLACK
        detail = too_large_detail(self.max_bytes)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, limited, send)


class CredentialsBeforeBody:
    """Answers 401 to a request that carries a body but no credentials, before the body is read.

    FastAPI parses a request's body (a multipart upload is spooled to disk) before it runs the
    dependencies that check the API key, so without this an anonymous client could make the
    server read megabytes, or learn how it validates a body. Only the presence of a bearer token
    is checked here; the key itself is checked by `api.deps.get_current_tenant` as before.
    """

    BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.BODY_METHODS:
            await self.app(scope, receive, send)
            return
        authorization = dict(scope["headers"]).get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer " and authorization[7:].strip():
            await self.app(scope, receive, send)
            return
        # The same response as the key check's 401 (api/errors.py), plus closing the connection:
        # the body it did not read is still on it.
        response = JSONResponse(
            {"detail": MISSING_KEY_DETAIL}, status_code=401, headers={"WWW-Authenticate": "Bearer", "Connection": "close"}
        )
        await response(scope, receive, send)
