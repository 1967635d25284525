"""Creating and checking API keys.

Keys are 256 random bits, so a plain SHA-256 of the key is as hard to reverse as the key is to
guess; a slow password hash would only slow every request down.
"""

import hashlib
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.db import utcnow
from services.tenants.models import ApiKey, Tenant

KEY_PREFIX = "ldr_"


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
    session.add(ApiKey(tenant_id=tenant.id, prefix=key[:12], digest=digest(key)))
    return key


def tenant_of(session: Session, key: str) -> uuid.UUID | None:
    """The tenant that owns an active key, or None."""
    return session.scalar(select(ApiKey.tenant_id).where(ApiKey.digest == digest(key), ApiKey.revoked_at.is_(None)))


def revoke(session: Session, prefix: str) -> int:
    """Revoke the keys that start with `prefix`; the number revoked."""
    keys = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix[:12], ApiKey.revoked_at.is_(None))).all()
    for k in keys:
        k.revoked_at = utcnow()
    return len(keys)
