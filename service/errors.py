"""Domain errors. The API maps each to one status code with a JSON `detail`; the CLI prints them."""

from __future__ import annotations

from collections.abc import Sequence


class ServiceError(Exception):
    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class PayloadTooLarge(ServiceError):
    status_code = 413


class TooManyRequests(ServiceError):
    """Over a per-tenant limit (queued and running jobs): fine again once some work ends."""

    status_code = 429


class InvalidRequest(ServiceError):
    """A request that is well-formed but wrong for this server (unknown model, an allocation of
    the wrong length, ...). ``loc`` is the field path, e.g. ``("body", "allocation")``."""

    status_code = 422

    def __init__(self, loc: Sequence[str | int], message: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.loc = tuple(loc)
        self.extra = extra or {}

    @property
    def field(self) -> str:
        return ".".join(str(part) for part in self.loc)
