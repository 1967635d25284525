"""Creating, listing, revoking and checking API keys.

Keys are 256 random bits, so a plain SHA-256 of the key is as hard to reverse as the key is to
guess; a slow password hash would only slow every request down.
"""

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.db import utcnow
from services.errors import InputError
from services.tenants.models import ApiKey, Tenant

KEY_PREFIX = "ldr_"
SHOWN = 12  # characters of a key kept in clear (ApiKey.prefix) to tell keys apart: "ldr_" and 8 random ones


def digest(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str) -> str:
    """A new key for the tenant (created if new); the only time the key is seen in clear."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, prefix=key[:SHOWN], digest=digest(key)))
    return key


def tenant_of(session: Session, key: str) -> uuid.UUID | None:
    """The tenant that owns an active key, or None."""
    return session.scalar(select(ApiKey.tenant_id).where(ApiKey.digest == digest(key), ApiKey.revoked_at.is_(None)))


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown of a key: never the key or its digest."""

    prefix: str
    tenant: str
    created_at: datetime
    revoked_at: datetime | None


def _info(key: ApiKey, tenant: str) -> KeyInfo:
    return KeyInfo(key.prefix, tenant, key.created_at, key.revoked_at)


def list_keys(session: Session, tenant_name: str | None = None) -> list[KeyInfo]:
    """Every key, or one tenant's, oldest first; an unknown tenant is an error (a typo, not "no keys")."""
    query = select(ApiKey, Tenant.name).join(Tenant, ApiKey.tenant_id == Tenant.id).order_by(ApiKey.created_at, ApiKey.prefix)
    if tenant_name is not None:
        if session.scalar(select(Tenant.id).where(Tenant.name == tenant_name)) is None:
            raise InputError(f"no tenant is named {tenant_name!r}; `ladder keys list` shows every tenant's keys")
        query = query.where(Tenant.name == tenant_name)
    return [_info(k, name) for k, name in session.execute(query).all()]


def revoke(session: Session, prefix: str) -> tuple[KeyInfo, bool]:
    """Revoke the one key named by its prefix as `ladder keys list` shows it, or by the whole key;
    (the key, whether this call revoked it: False when it already was)."""
    prefix = prefix.strip()
    if len(prefix) > SHOWN:  # the whole key: matched by its digest, never ambiguous
        rows = session.execute(select(ApiKey, Tenant.name).join(Tenant, ApiKey.tenant_id == Tenant.id)
                               .where(ApiKey.digest == digest(prefix))).all()
        if not rows:
            raise InputError(f"no API key is {prefix[:SHOWN]}… (a whole key was given); `ladder keys list` shows the keys' prefixes")
    else:
        if len(prefix) < SHOWN or not prefix.startswith(KEY_PREFIX):
            raise InputError(f"{prefix!r} is not a key prefix: give the {SHOWN} characters that `ladder keys list` shows "
                             f"({KEY_PREFIX} and {SHOWN - len(KEY_PREFIX)} more), or the whole key")
        rows = session.execute(select(ApiKey, Tenant.name).join(Tenant, ApiKey.tenant_id == Tenant.id)
                               .where(ApiKey.prefix == prefix)).all()
        if not rows:
            raise InputError(f"no API key has the prefix {prefix}; `ladder keys list` shows them")
        if len(rows) > 1:  # 48 random bits make this rare; refuse rather than revoke a stranger's key too
            tenants = ", ".join(sorted({name for _, name in rows}))
            raise InputError(f"{len(rows)} keys share the prefix {prefix} (tenants {tenants}); revoke by the whole key")
    key, tenant = rows[0]
    if key.revoked_at is not None:
        return _info(key, tenant), False
    key.revoked_at = utcnow()
    session.flush()
    return _info(key, tenant), True
