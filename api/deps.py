"""Typed dependencies, so that routes read like sentences."""

import time
import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.problems import Problem
from services.tenants.service import digest, tenant_of
from workers.context import Context


def get_context(request: Request) -> Context:
    """The app's context (settings, database, store, dispatcher)."""
    return request.app.state.ctx


ContextDep = Annotated[Context, Depends(get_context)]


def get_session(ctx: ContextDep) -> Iterator[Session]:
    """A session for the request: commits on success, rolls back on error."""
    with ctx.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_keys: dict[str, tuple[uuid.UUID, float]] = {}  # key digest → (tenant, until): spares a query per poll


def get_tenant(request: Request, ctx: ContextDep) -> uuid.UUID:
    """The tenant whose bearer key came with the request (401 without a valid one)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise Problem(401, "send your API key as 'Authorization: Bearer <key>' (create one with: ladder keys create --tenant NAME)",
                      {"WWW-Authenticate": "Bearer"})
    d, now = digest(key.strip()), time.monotonic()
    hit = _keys.get(d)
    if hit is not None and hit[1] > now:
        return hit[0]
    with ctx.db.session() as s:
        tenant = tenant_of(s, key.strip())
    if tenant is None:
        raise Problem(401, "this API key is unknown or revoked; create one with: ladder keys create --tenant NAME",
                      {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    _keys[d] = (tenant, now + ctx.settings.api_key_cache_s)
    return tenant


TenantDep = Annotated[uuid.UUID, Depends(get_tenant)]
