"""The tenant's webhook signing secret. (A job's deliveries are under the job:
GET /jobs/{id}/webhooks.)"""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentTenant, SessionDep
from api.schemas import ErrorResponse, WebhookSecret
from service import webhooks

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
