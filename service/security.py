"""API keys: ``mola_<prefix>_<secret>``. The database keeps the prefix (to find the row) and the
SHA-256 of the whole token; the token itself is shown once, when it is created. A revoked key
stays in the table (listed as revoked) and fails from the next request on."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.models import ApiKey, Tenant, utcnow

TOKEN_RE = re.compile(r"^mola_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# A key's public part as `mola keys list` shows it, or a whole token: either names its prefix.
PUBLIC_PART_RE = re.compile(r"^mola_([0-9a-f]{12})(_.*)?$")
# `last_used_at` is written at most this often per key: a write on every request would make
# each GET a database write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


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


def find_key(session: Session, token: str) -> ApiKey | None:
    """The key row of ``token``, or None for an unknown, malformed or revoked key."""
    match = TOKEN_RE.match(token.strip())
    if not match:
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == match.group(1)))
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.key_hash, hash_token(token.strip())):
        return None
    return key


def authenticate(session: Session, token: str) -> Tenant | None:
    """The tenant owning ``token``, or None for an unknown, malformed or revoked key."""
    key = find_key(session, token)
    return None if key is None else session.get(Tenant, key.tenant_id)


def record_use(session: Session, key: ApiKey) -> bool:
    """Set the key's `last_used_at` to now unless it was set less than LAST_USED_RESOLUTION ago;
    True when a write is pending (the caller commits)."""
    now = utcnow()
    if key.last_used_at is not None and now - key.last_used_at < LAST_USED_RESOLUTION:
        return False
    session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return True


def list_api_keys(session: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """Every key (or a tenant's), oldest first, with its tenant's name; revoked ones included."""
    query = select(ApiKey, Tenant.name).join(Tenant, ApiKey.tenant_id == Tenant.id)
    if tenant_name is not None:
        if session.scalar(select(Tenant.id).where(Tenant.name == tenant_name)) is None:
            raise ValueError(f"no tenant named {tenant_name!r}")
        query = query.where(Tenant.name == tenant_name)
    return [(key, name) for key, name in session.execute(query.order_by(Tenant.name, ApiKey.created_at, ApiKey.id))]


def find_key_by_id_or_prefix(session: Session, id_or_prefix: str) -> ApiKey:
    """The key named by its id (``key_...``), its 12-digit prefix, or its public part
    (``mola_<prefix>``, or a whole token); `ValueError` when none matches."""
    text = id_or_prefix.strip()
    public = PUBLIC_PART_RE.match(text)
    prefix = public.group(1) if public else text
    key = session.scalar(select(ApiKey).where((ApiKey.id == text) | (ApiKey.prefix == prefix)))
    if key is None:
        raise ValueError(f"no API key with id or prefix {id_or_prefix!r} (see `mola keys list`)")
    return key


def revoke_api_key(session: Session, id_or_prefix: str) -> tuple[ApiKey, bool]:
    """Revoke a key: from the next request on it is refused (401). Returns (key, newly revoked);
    revoking a revoked key changes nothing. Flushes only."""
    key = find_key_by_id_or_prefix(session, id_or_prefix)
    if key.revoked_at is not None:
        return key, False
    key.revoked_at = utcnow()
    session.flush()
    return key, True


def any_key_exists(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None

