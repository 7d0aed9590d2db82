"""Signed webhooks: how the service signs the POST it sends when a job ends, and how a receiver
checks one (standard library only: a receiver needs neither torch nor the service).

The scheme is Standard Webhooks' (https://www.standardwebhooks.com): three headers,

    webhook-id:         the delivery's id (the same on every retry: deduplicate on it)
    webhook-timestamp:  when it was sent, in Unix seconds
    webhook-signature:  "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.".encode() + body))

where ``key`` is the base64 part of the tenant's secret ``whsec_...`` (`GET /webhooks/secret`)
decoded. A receiver checks it with::

    from mola.webhooks import verify

    event = verify(secret, request.headers, request.body)   # WebhookVerificationError if forged
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

SECRET_PREFIX = "whsec_"
# How old (or how far ahead) a timestamp `verify` accepts: a replayed request is refused after it.
TOLERANCE_SECONDS = 300


class WebhookVerificationError(ValueError):
    """The request is not a webhook signed with this secret, or not a fresh one."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r} (from GET /webhooks/secret)")
    return base64.b64decode(secret[len(SECRET_PREFIX) :])


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of ``body`` sent as ``message_id`` at ``timestamp``."""
    digest = hmac.new(_key(secret), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, tolerance_seconds: float = TOLERANCE_SECONDS, now: float | None = None
) -> dict[str, Any]:
    """The event of a webhook request (its JSON body) after checking that ``secret`` signed it
    within ``tolerance_seconds`` of ``now``; `WebhookVerificationError` saying what is wrong
    otherwise. ``headers``: any mapping of the request's headers (names in any case)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        message_id, timestamp, signatures = (lowered[name] for name in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    except KeyError as missing:
        raise WebhookVerificationError(f"no {missing.args[0]} header: not a mola webhook") from None
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {timestamp!r} is not a number of seconds") from None
    if abs((time.time() if now is None else now) - sent_at) > tolerance_seconds:
        raise WebhookVerificationError(f"webhook-timestamp {sent_at} is more than {tolerance_seconds:g} s away: a replay, or a clock that is off")
    expected = sign(secret, message_id, sent_at, body)
    # Several signatures, space-separated, may come while a secret is being rotated.
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures.split()):
        raise WebhookVerificationError("webhook-signature does not match: another secret signed it, or the body was changed")
    return json.loads(body)
