"""Bearer-key authentication: `Authorization: Bearer <api key>` -> tenant.

Keys are stored hashed (store.keys.authenticate compares sha256 digests in constant time). A
successful lookup is cached in-process, keyed by the key's sha256 (never the plaintext), for
`KEY_CACHE_TTL_S` seconds in a bounded LRU, so a hot client costs no database round trip; a
revoked key therefore stops working within that TTL. Failures are not cached. Missing or bad
key -> 401 problem+json with `WWW-Authenticate: Bearer`."""

from __future__ import annotations

import hashlib

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.errors import ApiProblem
from api.lru import LruCache

KEY_CACHE_TTL_S = 30.0
KEY_CACHE_SIZE = 4096
DISABLED_TENANT = "default"

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer cc_...`")


class KeyCache(LruCache[str]):
    """sha256(key) -> tenant, for KEY_CACHE_TTL_S seconds, at most KEY_CACHE_SIZE keys."""

    def __init__(self, ttl_s: float = KEY_CACHE_TTL_S, size: int = KEY_CACHE_SIZE) -> None:
        super().__init__(size, ttl_s)


def _unauthorized(detail: str, error: str = "invalid_token") -> ApiProblem:
    return ApiProblem(
        401,
        "unauthorized",
        detail,
        title="Unauthorized",
        headers={"WWW-Authenticate": f'Bearer realm="carcert", error="{error}"'},
    )


def _lookup(request: Request, key: str) -> str | None:
    from store.keys import authenticate

    with request.app.state.sessionmaker() as session:
        return authenticate(session, key)


async def require_tenant(
    request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> str:
    """The authenticated tenant (dependency of every /artifacts and /jobs route)."""
    if request.app.state.settings.auth_disabled:
        return DISABLED_TENANT
    if creds is None or not creds.credentials:
        raise _unauthorized("Missing API key: send 'Authorization: Bearer <key>'.", "invalid_request")
    if creds.scheme.lower() != "bearer":
        raise _unauthorized("Unsupported authorization scheme; use 'Bearer <key>'.", "invalid_request")
    key = creds.credentials.strip()
    cache: KeyCache = request.app.state.key_cache
    digest = hashlib.sha256(key.encode()).hexdigest()
    tenant = cache.get(digest)
    if tenant is not None:
        return tenant
    tenant = await run_in_threadpool(_lookup, request, key)
    if tenant is None:
        raise _unauthorized("Invalid or revoked API key.")
    cache.put(digest, tenant)
    return tenant
