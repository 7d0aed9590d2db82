"""The tenant's webhook signing secret. (A job's deliveries are under the job:
GET /jobs/{id}/webhooks.)"""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.schemas import ErrorResponse, WebhookSecret, WebhookTest, WebhookTestResult
from service import webhooks
from service.errors import InvalidRequest

router = APIRouter(prefix="/webhooks", tags=["webhooks"], responses={401: {"model": ErrorResponse}})

SIGNING = (
    "Every webhook carries `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 "
    "HMAC-SHA256 of '<id>.<timestamp>.<body>'>`, keyed with the secret's base64 part decoded "
    "(the Standard Webhooks scheme; `mola.webhooks.verify(secret, headers, body)` checks it)."
)


@router.get(
    "/secret",
    response_model=WebhookSecret,
    summary="The secret that signs your webhooks",
    description="Made the first time it is asked for (or a webhook is sent). " + SIGNING,
)
def get_secret(tenant: CurrentTenant, session: SessionDep) -> WebhookSecret:
    secret = webhooks.secret_of(session, tenant.id)
    session.commit()
    return WebhookSecret(secret=secret)


@router.post(
    "/secret/rotate",
    response_model=WebhookSecret,
    summary="A new secret for your webhooks",
    description="Every webhook sent from now on, retries of earlier events included, is signed with the new secret. " + SIGNING,
)
def rotate_secret(tenant: CurrentTenant, session: SessionDep) -> WebhookSecret:
    secret = webhooks.rotate_secret(session, tenant.id)
    session.commit()
    return WebhookSecret(secret=secret)


@router.post(
    "/test",
    response_model=WebhookTestResult,
    summary="Try a receiver",
    description=(
        "POSTs a `ping` event (`{\"id\", \"type\": \"ping\", \"created_at\", \"data\": {}}`) to `url` "
        "now, signed as every webhook is, and answers whether the receiver took it (`delivered`: a "
        "2xx) or why not. Nothing is recorded or retried. A URL a job's `webhook_url` could not "
        "be is a 422 on `body.url`. " + SIGNING
    ),
    responses={422: {"model": ErrorResponse}},
)
def try_receiver(body: WebhookTest, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> WebhookTestResult:
    secret = webhooks.secret_of(session, tenant.id)
    session.commit()  # the secret, made here if it is the first time: not held across the POST
    try:
        return WebhookTestResult(**webhooks.ping(settings, secret, body.url))
    except webhooks.WebhookRefused as exc:
        raise InvalidRequest(("body", "url"), str(exc)) from None
