"""API keys: ``mola_<prefix>_<secret>``. The database keeps the prefix (to find the row) and the
SHA-256 of the whole token; the token itself is shown once, when it is created."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import ApiKey, Tenant

TOKEN_RE = re.compile(r"^mola_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_key(session: Session, tenant_name: str, key_name: str | None = None) -> tuple[ApiKey, str]:
    """Create the tenant if needed and a new key for it; returns (row, token). Flushes only."""
    if not TENANT_NAME_RE.match(tenant_name):
        raise ValueError(
            f"tenant name {tenant_name!r} must be 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    prefix = secrets.token_hex(6)
    token = f"mola_{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_token(token), name=key_name)
    session.add(key)
    session.flush()
    return key, token


def authenticate(session: Session, token: str) -> Tenant | None:
    """The tenant owning ``token``, or None for an unknown, malformed or revoked key."""
    match = TOKEN_RE.match(token.strip())
    if not match:
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == match.group(1)))
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.key_hash, hash_token(token.strip())):
        return None
    return session.get(Tenant, key.tenant_id)


def any_key_exists(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None

