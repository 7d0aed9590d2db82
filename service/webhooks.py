"""Webhooks: a job created with a `webhook_url` gets a signed POST when it ends.

- `check_url` refuses, when the job is created, a URL the server will not send to.
- `record_job_end` writes the event (a `WebhookDelivery` row) in the transaction that ends the
  job: an outbox, so a committed end always has its event and a rolled-back one has none.
- `send_due`, run by the quick workers (task `mola.send_webhooks`, asked for after each end is
  committed, and by every reconciler pass), claims the deliveries that are due, POSTs each
  signed with the tenant's secret (`mola.webhooks.sign`), and records the outcome: a 2xx
  answer delivers it; anything else is retried after 30 s, 1, 2, 4 ... minutes (at most an
  hour apart) until MOLA_WEBHOOK_MAX_ATTEMPTS attempts have failed.

A receiver may get an event twice (a sender that died after the POST but before recording it):
`webhook-id` is the same on every attempt, so it deduplicates on that.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from mola.webhooks import new_secret, sign
from service.db import mark_each, session_scope
from service.models import Job, Tenant, WebhookDelivery, new_id, utcnow
from service.settings import Settings

logger = logging.getLogger(__name__)

EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
FIRST_RETRY_SECONDS = 30.0
MAX_RETRY_SECONDS = 3600.0
MAX_URL_LENGTH = 2048
USER_AGENT = "mola-webhooks"


class WebhookRefused(ValueError):
    """A URL the server does not send to (its scheme, or an address it may not reach)."""


# ---- the tenant's signing secret -----------------------------------------------------------
def secret_of(session: Session, tenant_id: str) -> str:
    """The tenant's webhook secret, made (and flushed) the first time it is asked for."""
    tenant = session.get(Tenant, tenant_id)
    if tenant.webhook_secret is None:
        tenant.webhook_secret = new_secret()
        session.flush()
    return tenant.webhook_secret


def rotate_secret(session: Session, tenant_id: str) -> str:
    """A new secret for the tenant: every webhook sent from now on, retries included, is signed
    with it."""
    tenant = session.get(Tenant, tenant_id)
    tenant.webhook_secret = new_secret()
    session.flush()
    return tenant.webhook_secret


# ---- where webhooks may go -------------------------------------------------------------------
def _address_refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> str | None:
    if address.is_link_local or address.is_multicast or address.is_unspecified or address.is_reserved:
        return f"{address} is a link-local, multicast or reserved address (cloud metadata lives there): webhooks never go to one"
    if (address.is_private or address.is_loopback) and not allow_private:
        return (
            f"{address} is a loopback or private-network address, which this server's webhooks may not reach "
            "(MOLA_WEBHOOK_PRIVATE_ADDRESSES=false)"
        )
    return None


def check_url(url: str, allow_private: bool) -> None:
    """`WebhookRefused` saying why, for a URL the server will not POST to: not http(s), no host,
    credentials in it, or an address it may not reach (a name is resolved when sending)."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError as exc:
        raise WebhookRefused(f"not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"{url!r} is not an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("credentials in the URL would be stored with the job: verify the signature instead (GET /webhooks/secret)")
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return  # a name: checked against what it resolves to at each attempt
    refusal = _address_refusal(address, allow_private)
    if refusal:
        raise WebhookRefused(refusal)


def _check_resolved(url: str, allow_private: bool) -> None:
    """Every address the URL's host resolves to now must be one the server may reach."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise httpx.ConnectError(f"cannot resolve {parts.hostname}: {exc}") from None
    for *_, sockaddr in found:
        refusal = _address_refusal(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]), allow_private)
        if refusal:
            raise WebhookRefused(f"{parts.hostname} resolves to {refusal}")


# ---- the outbox --------------------------------------------------------------------------------
def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


def record_job_end(session: Session, job: Job) -> WebhookDelivery | None:
    """The event of ``job`` having ended (its row as it is now in this transaction), to send
    to its `webhook_url`; None for a job without one. Flushes."""
    url = (job.spec or {}).get("webhook_url")
    if not url or job.status not in EVENTS:
        return None
    delivery_id, now = new_id("whd"), utcnow()
    result = job.result or {}
    payload = {
        "id": delivery_id,
        "type": EVENTS[job.status],
        "created_at": _iso(now),
        "data": {
            "job_id": job.id,
            "status": job.status,
            "error": job.error,
            "error_kind": job.error_kind,
            "step": job.step,
            "total_steps": job.total_steps,
            "finished_at": _iso(job.finished_at),
            "adapter_available": job.adapter_key is not None,
            # The run's last training metrics and evaluation: enough for a pipeline to decide
            # on the adapter without asking for the job.
            "train": result.get("train"),
            "eval": result.get("eval"),
        },
    }
    delivery = WebhookDelivery(
        id=delivery_id, job_id=job.id, tenant_id=job.tenant_id, url=url, event=EVENTS[job.status], payload=payload,
        status="pending", attempts=0, next_attempt_at=now, created_at=now,
    )  # fmt: skip
    session.add(delivery)
    session.flush()
    return delivery


def due_count(session: Session) -> int:
    return session.scalar(
        select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
    )


def list_deliveries(session: Session, job_id: str) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)))


def retry_delay(attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: 30 s, doubling, at most an hour."""
    return min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (attempts - 1))


# ---- sending -----------------------------------------------------------------------------------
def _http_client(settings: Settings) -> httpx.Client:
    # No redirects (one could lead to an address the checks refused); no proxy from the
    # environment (the address checked is the address connected to).
    return httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False)


def send_due(settings: Settings, sessions: sessionmaker[Session], limit: int = 50) -> dict[str, str]:
    """Send the deliveries that are due, at most ``limit``, oldest first: ``{delivery id: its
    status after this attempt}``. Each is claimed just before its attempt (its `next_attempt_at`
    moved past the attempt's time limit), so concurrent senders never POST the same one at
    once, and one that dies leaves it to another once the claim runs out."""
    outcomes: dict[str, str] = {}
    with _http_client(settings) as client:
        while len(outcomes) < limit:
            with session_scope(sessions) as session:
                due = (WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
                claim = {"next_attempt_at": utcnow() + timedelta(seconds=settings.webhook_timeout_seconds + 60)}
                claimed = mark_each(session, WebhookDelivery, due, claim, limit=1)
            if not claimed:
                break
            outcomes[claimed[0]] = _attempt(settings, sessions, claimed[0], client)
    return outcomes


def _post(settings: Settings, client: httpx.Client, url: str, secret: str, delivery_id: str, payload: dict[str, Any]) -> httpx.Response:
    _check_resolved(url, settings.webhooks_reach_private)
    body = json.dumps(payload).encode()
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, delivery_id, timestamp, body),
    }
    return client.post(url, content=body, headers=headers, timeout=settings.webhook_timeout_seconds)


def ping(settings: Settings, secret: str, url: str) -> dict[str, Any]:
    """A `ping` event POSTed to ``url`` now, signed as every webhook is, to try a receiver
    before a job depends on it: ``{"id", "url", "delivered", "response_status", "error"}``.
    Nothing is recorded or retried. `WebhookRefused` for a URL the server will not send to."""
    check_url(url, settings.webhooks_reach_private)
    delivery_id = new_id("whd")
    payload = {"id": delivery_id, "type": "ping", "created_at": _iso(utcnow()), "data": {}}
    status_code, error = None, None
    try:
        with _http_client(settings) as client:
            status_code = _post(settings, client, url, secret, delivery_id, payload).status_code
        error = _answer_error(status_code)
    except WebhookRefused as exc:
        error = str(exc)
    except httpx.HTTPError as exc:
        error = _http_error(exc)
    return {"id": delivery_id, "url": url, "delivered": error is None, "response_status": status_code, "error": error}


def _answer_error(status_code: int) -> str | None:
    """Why an answer does not deliver a webhook; None for a 2xx."""
    if 200 <= status_code < 300:
        return None
    moved = " (redirects are not followed: give the final URL)" if 300 <= status_code < 400 else ""
    return f"the receiver answered {status_code}{moved}"


def _http_error(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _attempt(settings: Settings, sessions: sessionmaker[Session], delivery_id: str, client: httpx.Client) -> str:
    with session_scope(sessions) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:  # its job was deleted meanwhile
            return "deleted"
        url, payload, attempts = delivery.url, delivery.payload, delivery.attempts + 1
        secret = secret_of(session, delivery.tenant_id)
    status_code, error, final = None, None, False
    try:
        status_code = _post(settings, client, url, secret, delivery_id, payload).status_code
        error = _answer_error(status_code)
    except WebhookRefused as exc:  # it would be refused again: no retry
        error, final = str(exc), True
    except httpx.HTTPError as exc:
        error = _http_error(exc)
    now = utcnow()
    values: dict[str, Any] = {"attempts": attempts, "response_status": status_code, "last_error": error}
    if error is None:
        values.update(status="delivered", delivered_at=now)
    elif final or attempts >= settings.webhook_max_attempts:
        values.update(status="failed")
    else:
        values.update(next_attempt_at=now + timedelta(seconds=retry_delay(attempts)))
    with session_scope(sessions) as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending").values(**values))
    status = values.get("status", "pending")
    if error is not None:
        logger.warning("webhook %s to %s, attempt %d: %s%s", delivery_id, url, attempts, error, "" if status == "pending" else f"; {status}")
    return status
