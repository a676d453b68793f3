"""store/ repository functions on a real Postgres database: idempotency, keyset pagination, tenant
isolation, API keys, atomic claim and leases, stale-job detection."""

from __future__ import annotations

import hashlib
import io
import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from core.spec import JobSpec
from store import jobs as repo
from store.artifacts import ArtifactTooLarge, get_artifact, get_artifact_store, store_artifact
from store.db import get_sessionmaker, session_scope
from store.keys import authenticate, create_api_key, hash_key, revoke_api_key
from store.models import ApiKey, Job, utcnow

pytestmark = pytest.mark.integration


def spec(seed: int = 0) -> JobSpec:
    return JobSpec(seed=seed, train_subset=100)


def new_job(tenant: str, seed: int = 0, key: str | None = None) -> str:
    with session_scope() as s:
        job, created = repo.create_job(s, tenant, spec(seed), key)
        assert created
        return job.id


# ------------------------------------------------------------------------------------------ API keys


def test_api_keys_are_stored_hashed_and_revocable(db, tenant):
    key = create_api_key(db, tenant, "ci")
    db.commit()
    row = db.query(ApiKey).filter_by(tenant=tenant).one()
    assert key.startswith("cc_") and len(key) > 40
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest() == hash_key(key)
    assert key not in (row.key_hash, row.prefix) and key.startswith(row.prefix)
    assert authenticate(db, key) == tenant
    assert authenticate(db, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert authenticate(db, "") is None and authenticate(db, None) is None
    assert not revoke_api_key(db, "someone-else", row.id)
    assert revoke_api_key(db, tenant, row.id)
    db.commit()
    assert authenticate(db, key) is None


# ------------------------------------------------------------------------------------------ idempotency


def test_idempotency_same_body_same_job_other_body_conflict(db, tenant):
    a, created_a = repo.create_job(db, tenant, spec(1), "key-1")
    db.commit()
    b, created_b = repo.create_job(db, tenant, spec(1), "key-1")
    assert (created_a, created_b) == (True, False) and a.id == b.id
    with pytest.raises(repo.IdempotencyConflict) as err:
        repo.create_job(db, tenant, spec(2), "key-1")
    assert err.value.job_id == a.id
    other, created = repo.create_job(db, tenant + "-other", spec(1), "key-1")  # keys are per tenant
    assert created and other.id != a.id
    c, created_c = repo.create_job(db, tenant, spec(1), "key-2")
    assert created_c and c.id != a.id
    db.commit()
    assert db.query(Job).filter(Job.tenant == tenant).count() == 2


def test_concurrent_creates_with_one_key_make_one_job(tenant):
    barrier = threading.Barrier(6)
    out: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            with session_scope() as s:
                barrier.wait()
                job, created = repo.create_job(s, tenant, spec(7), "same-key")
                out.append((job.id, created))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({job_id for job_id, _ in out}) == 1
    assert sum(created for _, created in out) == 1
    with session_scope() as s:
        assert s.query(Job).filter(Job.tenant == tenant).count() == 1


# ------------------------------------------------------------------------------------------ pagination


def test_keyset_pagination_walks_every_job_once_newest_first(db, tenant):
    ids = [new_job(tenant, seed) for seed in range(7)]
    # two jobs with the very same created_at: the id breaks the tie
    same = utcnow() - timedelta(hours=1)
    db.execute(update(Job).where(Job.id.in_(ids[2:4])).values(created_at=same))
    db.commit()
    expected = [
        j.id
        for j in sorted(
            db.query(Job).filter(Job.tenant == tenant).all(), key=lambda j: (j.created_at, j.id), reverse=True
        )
    ]
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = repo.list_jobs(db, tenant, cursor=cursor, limit=3)
        seen += [j.id for j in page]
        pages += 1
        if cursor is None:
            break
    assert seen == expected and sorted(seen) == sorted(ids)
    assert pages == 3  # 3 + 3 + 1
    with pytest.raises(repo.InvalidCursor):
        repo.list_jobs(db, tenant, cursor="not-a-cursor")


def test_status_filter_and_limit(db, tenant):
    ids = [new_job(tenant, seed) for seed in range(3)]
    with session_scope() as s:
        repo.request_cancel(s, tenant, ids[1])
    page, cursor = repo.list_jobs(db, tenant, status="cancelled")
    assert [j.id for j in page] == [ids[1]] and cursor is None
    page, _ = repo.list_jobs(db, tenant, status="queued")
    assert sorted(j.id for j in page) == sorted([ids[0], ids[2]])


# ------------------------------------------------------------------------------------------ isolation


def test_tenant_isolation_of_jobs_and_artifacts(db, tenant):
    job_id = new_job(tenant)
    intruder = tenant + "-intruder"
    assert repo.get_job(db, intruder, job_id) is None
    assert repo.request_cancel(db, intruder, job_id) is None
    assert repo.list_jobs(db, intruder)[0] == []
    assert repo.get_job(db, tenant, job_id).id == job_id

    payload = b"\x00weights" * 1000
    art = store_artifact(db, tenant, "weights", "../../etc/passwd.safetensors", io.BytesIO(payload))
    db.commit()
    assert art.filename == "passwd.safetensors"  # no path parts kept
    assert art.size == len(payload) and art.sha256 == hashlib.sha256(payload).hexdigest()
    assert get_artifact(db, intruder, art.id) is None
    assert get_artifact(db, tenant, art.id).id == art.id
    with get_artifact_store().open(art.storage_key) as f:
        assert f.read() == payload


def test_upload_over_the_limit_stores_nothing(db, tenant, service_dirs):
    before = {p for p in service_dirs["artifacts"].rglob("*") if p.is_file()}
    with pytest.raises(ArtifactTooLarge):
        store_artifact(db, tenant, "dataset", "big.npz", io.BytesIO(b"x" * 5000), max_bytes=4096)
    after = {p for p in service_dirs["artifacts"].rglob("*") if p.is_file()}
    assert after == before


# ------------------------------------------------------------------------------------------ claim / lease


def _race(job_id: str, workers: tuple[str, ...]) -> list[str]:
    """Every worker claims `job_id` at the same moment, each on its own connection."""
    barrier = threading.Barrier(len(workers))
    wins: list[str] = []

    def claim(worker: str) -> None:
        s = get_sessionmaker()()
        try:
            barrier.wait()
            if repo.claim_job(s, job_id, worker) is not None:
                wins.append(worker)
        finally:
            s.close()

    threads = [threading.Thread(target=claim, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins


def test_two_concurrent_claims_only_one_wins(tenant):
    for i in range(5):
        job_id = new_job(tenant, seed=i)
        wins = _race(job_id, ("w1", "w2", "w3"))
        assert len(wins) == 1
        with session_scope() as s:
            job = s.get(Job, job_id)
            assert job.status == "running" and job.lease_owner == wins[0] and job.attempts == 1


def test_lease_expiry_lets_another_worker_take_over(tenant):
    job_id = new_job(tenant)
    with session_scope() as s:
        assert repo.claim_job(s, job_id, "w1") is not None
        assert repo.claim_job(s, job_id, "w2") is None  # live lease
        assert repo.update_progress(s, job_id, "w1", "pretrain", 0.25) is False
    with session_scope() as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    with session_scope() as s:
        job = repo.claim_job(s, job_id, "w2")
        assert job is not None and job.lease_owner == "w2" and job.attempts == 2
    with session_scope() as s, pytest.raises(repo.LeaseLost):
        repo.update_progress(s, job_id, "w1", "pretrain", 0.5)
    with session_scope() as s:
        assert not repo.finish_job(s, job_id, "succeeded", worker_id="w1")
        assert repo.finish_job(s, job_id, "succeeded", summary={"variants": []}, worker_id="w2")
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert (job.status, job.progress, job.lease_owner) == ("succeeded", 1.0, None)
        assert job.finished_at is not None and job.finished_at >= job.started_at
        assert repo.claim_job(s, job_id, "w3") is None  # finished jobs never run again


def test_cancel_queued_and_running(tenant):
    queued = new_job(tenant, 1)
    running = new_job(tenant, 2)
    with session_scope() as s:
        repo.claim_job(s, running, "w1")
    with session_scope() as s:
        assert repo.request_cancel(s, tenant, queued).status == "cancelled"
        job = repo.request_cancel(s, tenant, running)
        assert job.status == "running" and job.cancel_requested
    with session_scope() as s:
        assert repo.claim_job(s, queued, "w2") is None
        assert repo.update_progress(s, running, "w1", "search", 0.5) is True


def test_stale_jobs_finds_lost_messages_and_dead_workers(tenant, settings_env):
    fresh, old, dead, hopeless = (new_job(tenant, i) for i in range(4))
    past = utcnow() - timedelta(seconds=int(settings_env["CARCERT_QUEUED_STALE_SECONDS"]) + 5)
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == old).values(updated_at=past))
        for job_id in (dead, hopeless):
            repo.claim_job(s, job_id, "gone")
        s.execute(
            update(Job)
            .where(Job.id.in_([dead, hopeless]))
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        s.execute(update(Job).where(Job.id == hopeless).values(attempts=3))
        s.commit()
    with session_scope() as s:
        stale = set(repo.stale_jobs(s)) & {fresh, old, dead, hopeless}
    assert stale == {old, dead}
    with session_scope() as s:
        assert s.get(Job, hopeless).status == "failed"
        assert s.get(Job, hopeless).error["title"] == "Worker lost"
        # touched: the next sweep does not send the queued one again at once
        assert old not in repo.stale_jobs(s)
