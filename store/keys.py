"""API keys: "cc_" + secrets.token_urlsafe(32), stored only as their sha256 hex digest."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.models import ApiKey, utcnow

KEY_PREFIX = "cc_"
_PREFIX_LEN = len(KEY_PREFIX) + 8  # stored in clear to find the candidate rows (and show in listings)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_api_key(session: Session, tenant: str, name: str = "") -> str:
    """Create a key for `tenant` and return its plaintext (shown once; only the hash is stored)."""
    if not tenant or len(tenant) > 200:
        raise ValueError("tenant must be 1..200 characters")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(tenant=tenant, name=name or "", key_hash=hash_key(plaintext), prefix=plaintext[:_PREFIX_LEN])
    )
    session.flush()
    return plaintext


def active_key_count(session: Session) -> int:
    """How many unrevoked keys exist, over all tenants (`carcert keys create --if-none`)."""
    return session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None))) or 0


def authenticate(session: Session, plaintext: str | None) -> str | None:
    """The tenant of a valid, unrevoked key, else None. The sha256 digests are compared in
    constant time (hmac.compare_digest)."""
    if not plaintext or not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 200:
        return None
    digest = hash_key(plaintext)
    rows = session.scalars(
        select(ApiKey).where(ApiKey.prefix == plaintext[:_PREFIX_LEN], ApiKey.revoked_at.is_(None))
    ).all()
    tenant = None
    for row in rows:
        if hmac.compare_digest(row.key_hash, digest):
            tenant = row.tenant
    return tenant


def list_api_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    """The keys (of `tenant`, or of every tenant), oldest first; only their prefixes are known."""
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant == tenant)
    return list(session.scalars(stmt))


def revoke_api_key(session: Session, tenant: str | None, key_id: str) -> bool:
    """Revoke one of `tenant`'s keys (tenant None: the key of any tenant, for the operator's CLI);
    False when there is no such key. Revoking twice keeps the first revocation time."""
    row = session.get(ApiKey, key_id) if key_id.isalnum() and len(key_id) <= 32 else None
    if row is None or (tenant is not None and row.tenant != tenant):
        return False
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return True
