"""Typed dependencies, so that routes read like sentences."""

import time
import uuid
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from api.problems import Problem
from services.context import Context
from services.tenants.service import digest, tenant_of

T = TypeVar("T")


async def get_context(request: Request) -> Context:
    """The app's context (settings, database, store, dispatcher)."""
    return request.app.state.ctx


ContextDep = Annotated[Context, Depends(get_context)]


async def in_session(ctx: Context, fn: Callable[[Session], T], *, write: bool = False) -> T:
    """Run `fn` with a session in the threadpool (one hop per request); a writing one commits before it returns."""

    def run() -> T:
        with ctx.db.session() if write else ctx.db.reading() as session:
            return fn(session)

    return await run_in_threadpool(run)


_keys: dict[str, tuple[uuid.UUID, float]] = {}  # key digest → (tenant, until): spares a query per poll


async def get_tenant(request: Request, ctx: ContextDep) -> uuid.UUID:
    """The tenant whose bearer key came with the request (401 without a valid one)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise Problem(401, "send your API key as 'Authorization: Bearer <key>' (create one with: ladder keys create --tenant NAME)",
                      {"WWW-Authenticate": "Bearer"})
    d, now = digest(key.strip()), time.monotonic()
    hit = _keys.get(d)
    if hit is not None and hit[1] > now:
        return hit[0]
    tenant = await in_session(ctx, lambda s: tenant_of(s, key.strip()))
    if tenant is None:
        raise Problem(401, "this API key is unknown or revoked; create one with: ladder keys create --tenant NAME",
                      {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    _keys[d] = (tenant, now + ctx.settings.api_key_cache_s)
    return tenant


TenantDep = Annotated[uuid.UUID, Depends(get_tenant)]
