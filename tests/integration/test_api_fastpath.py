"""GET /jobs/{id}/certificate through the ASGI fast path (api.fastpath) and the route: the same
bytes and headers, the same tenant and key checks, and no cached document served for a URL
whose own answer differs. In process, on a migrated SQLite database; no worker (the succeeded job
and its results are written with the store's repository functions)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import httpx
import pytest

from core.results import VariantResult
from store.db import init_db, make_engine
from store.jobs import add_result, create_job, finish_job, get_job
from store.keys import create_api_key, revoke_api_key
from store.models import ApiKey

pytestmark = pytest.mark.integration

SPEC = {"dataset": "digits", "pruning": {"method": "lmp", "prune_ratio": 0.5}}


def cert(name: str) -> dict:
    return {"name": name, "samples": [{"index": 0, "certified": True}], "pca": 0.5}


@pytest.fixture
def app(tmp_path):
    from api.main import create_app
    from core.spec import JobSpec
    from store.settings import Settings

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url)
    init_db(engine)
    engine.dispose()
    settings = Settings(
        database_url=url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        artifact_root=tmp_path / "a",
        work_root=tmp_path / "w",
    )
    app = create_app(settings)
    with app.state.sessionmaker() as s:
        keys = {t: create_api_key(s, t) for t in ("alice", "bob")}
        ids = {}
        for name, variants in (("one", ["lmp-0.50"]), ("sweep", ["lmp-0.30", "lmp-0.50"])):
            job, _ = create_job(s, "alice", JobSpec.model_validate(SPEC))
            for v in variants:
                add_result(
                    s,
                    job.id,
                    VariantResult(name=v, method="lmp", prune_ratio=float(v[-4:])),
                    certificate=cert(v),
                )
            finish_job(s, job.id, "succeeded")
            ids[name] = job.id
        queued, _ = create_job(s, "alice", JobSpec.model_validate(SPEC))
        ids["queued"] = queued.id
        s.commit()
    app.state.test_keys, app.state.test_ids = keys, ids
    return app


def call(app, requests: list[tuple[str, str | None, dict]]) -> list[httpx.Response]:
    """GET each (path, tenant, extra headers) in order on one in-process client."""

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            out = []
            for path, tenant, headers in requests:
                h = dict(headers)
                if tenant is not None:
                    h["Authorization"] = f"Bearer {app.state.test_keys[tenant]}"
                out.append(await c.get(path, headers=h))
            return out

    return asyncio.run(go())


@pytest.fixture
def counted(app, monkeypatch):
    """The app, counting the answers the fast path gives (app.state.test_fast_hits)."""
    from api.fastpath import CertificateFastPath

    app.state.test_fast_hits = 0
    original = CertificateFastPath._answer

    async def answer(self, scope, send, hit):
        app.state.test_fast_hits += 1
        await original(self, scope, send, hit)

    monkeypatch.setattr(CertificateFastPath, "_answer", answer)
    return app


def test_fast_path_answers_exactly_what_the_route_answers(counted):
    app = counted
    job = app.state.test_ids["one"]
    path = f"/jobs/{job}/certificate"
    r1, r2 = call(app, [(path, "alice", {}), (path, "alice", {})])
    assert app.state.test_fast_hits == 1  # the first filled the caches, the second came from the fast path
    assert r1.status_code == r2.status_code == 200
    assert r1.content == r2.content
    assert json.loads(r1.content) == cert("lmp-0.50")
    etag = '"' + hashlib.sha256(r1.content).hexdigest() + '"'
    for r in (r1, r2):
        assert r.headers["etag"] == etag
        assert r.headers["cache-control"] == "private, max-age=0, must-revalidate"
        assert r.headers["content-type"] == "application/json"
        assert int(r.headers["content-length"]) == len(r1.content)
    # If-None-Match: 304 with the same headers and no body, from the fast path and from the route
    # (a query string always goes through the route)
    inm = {"If-None-Match": etag}
    r3, r4 = call(app, [(path, "alice", inm), (path + "?variant=lmp-0.50", "alice", inm)])
    assert app.state.test_fast_hits == 2
    for r in (r3, r4):
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag


def test_another_tenant_missing_or_revoked_key_never_gets_the_cached_certificate(counted):
    app = counted
    app.state.key_cache.ttl_s = 0.5  # KEY_CACHE_TTL_S (30 s) shortened for the revocation below
    path = f"/jobs/{app.state.test_ids['one']}/certificate"
    ok, other, anon, bad = call(
        app,
        [
            (path, "alice", {}),
            (path, "bob", {}),
            (path, None, {}),
            (path, None, {"Authorization": "Bearer cc_not-a-key"}),
        ],
    )
    assert ok.status_code == 200
    assert other.status_code == 404 and other.headers["content-type"] == "application/problem+json"
    assert anon.status_code == 401 and bad.status_code == 401
    assert app.state.test_fast_hits == 0
    # revoke alice's key: once its cached lookup has expired (the documented TTL) the cached
    # certificate is not served to it any more
    with app.state.sessionmaker() as s:
        key = s.query(ApiKey).filter_by(tenant="alice").one()
        assert revoke_api_key(s, "alice", key.id)
        s.commit()
    time.sleep(0.6)
    (revoked,) = call(app, [(path, "alice", {})])
    assert revoked.status_code == 401 and app.state.test_fast_hits == 0


def test_variant_and_job_id_do_not_share_cache_entries(app):
    """GET /jobs/{id}/certificate?variant=v and GET /jobs/{id}%3Fv/certificate (a job id holding
    "?": no such job) must not answer each other's cached document."""
    job = app.state.test_ids["sweep"]
    one, confused = call(
        app,
        [
            (f"/jobs/{job}/certificate?variant=lmp-0.30", "alice", {}),
            (f"/jobs/{job}%3Flmp-0.30/certificate", "alice", {}),
        ],
    )
    assert one.status_code == 200 and json.loads(one.content) == cert("lmp-0.30")
    assert confused.status_code == 404


def test_unfinished_job_is_409_and_not_cached(app):
    path = f"/jobs/{app.state.test_ids['queued']}/certificate"
    r1, r2 = call(app, [(path, "alice", {}), (path, "alice", {})])
    assert r1.status_code == r2.status_code == 409
    assert app.state.cert_cache.get((app.state.test_ids["queued"], None)) is None
    with app.state.sessionmaker() as s:
        assert get_job(s, "alice", app.state.test_ids["queued"]).status == "queued"
