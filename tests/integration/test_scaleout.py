"""A sweep spread over workers (worker.fanout, store.units) on real Celery workers, Redis and
Postgres: the reference runs the whole job on one worker without fan-out; the same spec spread over
two workers, and again with one of the two SIGKILLed in the middle of a variant, gives the same
certificate body and evidence for every variant. Each run has its own queue, so no other worker of
the session takes its messages."""

from __future__ import annotations

import json
import os
import re
import signal
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import update

from api.routers.jobs import job_out
from core.spec import JobSpec
from store import jobs as repo
from store.db import session_scope
from store.joblogs import read_lines
from store.models import Job, JobUnit, utcnow
from store.units import units_of
from tests.integration.service_helpers import TINY_JOB, launch_worker, wait_for
from worker.queue import dispatch

pytestmark = pytest.mark.integration

FINAL = ("succeeded", "failed", "cancelled")
# 4 variants (car and lmp at two ratios) after one shared pretraining; a few seconds each
SWEEP = {
    **TINY_JOB,
    "pruning": {**TINY_JOB["pruning"], "search_epochs": 3, "finetune_epochs": 2},
    "sweep_methods": ["car", "lmp"],
    "sweep_prune_ratios": [0.5, 0.7],
    "certification": {**TINY_JOB["certification"], "samples": 20},
    "seed": 5,
}
VARIANTS = ["car-0.50", "car-0.70", "lmp-0.50", "lmp-0.70"]


def _job(job_id: str) -> Job:
    with session_scope() as s:
        return s.get(Job, job_id)


def _run(tenant: str, queue: str) -> str:
    with session_scope() as s:
        job, _ = repo.create_job(s, tenant, JobSpec.model_validate(SWEEP))
    assert dispatch(job.id, queue=queue)
    return job.id


def _wait(job_id: str, workers: list) -> Job:
    try:
        job = wait_for(lambda: (j := _job(job_id)).status in FINAL and j, 400, interval=0.5, what="the sweep")
    except AssertionError:
        raise AssertionError("\n".join(w.log()[-3000:] for w in workers)) from None
    assert job.status == "succeeded", job.error
    return job


def _outcome(job_id: str) -> dict[str, tuple[dict, str]]:
    """{variant: (certificate without job_id / created_at, evidence sha256)}."""
    out = {}
    with session_scope() as s:
        for res in repo.get_results(s, job_id):
            cert = dict(res.certificate)
            assert cert.pop("job_id") == job_id
            cert.pop("created_at")
            out[res.name] = (cert, cert["evidence_sha256"])
    return out


@pytest.fixture(scope="module")
def reference(settings_env, tmp_path_factory):
    """The sweep run whole on one worker (CARCERT_FAN_OUT=0), one torch thread like each spread worker
    (CPU results depend on the thread count: reductions split differently): its outcome."""
    queue = f"scale-ref-{uuid.uuid4().hex[:8]}"
    env = {**settings_env, "CARCERT_QUEUE": queue, "CARCERT_FAN_OUT": "0", "CARCERT_TORCH_THREADS": "1"}
    w = launch_worker(env, tmp_path_factory.mktemp("ref") / "w.log", "carcert-test-scale-ref")
    try:
        job_id = _run("scale-ref", queue)
        _wait(job_id, [w])
        with session_scope() as s:
            assert units_of(s, job_id) == []  # not spread
        return _outcome(job_id)
    finally:
        w.stop()


def _two_workers(settings_env, tmp_path, tag: str) -> tuple[str, list]:
    queue = f"scale-{tag}-{uuid.uuid4().hex[:8]}"
    env = {**settings_env, "CARCERT_QUEUE": queue, "CARCERT_TORCH_THREADS": "1"}
    return queue, [launch_worker(env, tmp_path / f"{tag}{i}.log", f"carcert-test-scale-{tag}{i}")
                   for i in (0, 1)]


def test_sweep_on_two_workers_gives_the_same_certificates(settings_env, reference, tmp_path) -> None:
    queue, workers = _two_workers(settings_env, tmp_path, "two")
    try:
        job_id = _run("scale-two", queue)
        job = _wait(job_id, workers)
        spread = _outcome(job_id)
        logs = [w.log() for w in workers]
    finally:
        for w in workers:
            w.stop()
    assert sorted(spread) == sorted(reference) == VARIANTS
    for name in VARIANTS:
        assert spread[name] == reference[name], name
    with session_scope() as s:
        units = units_of(s, job_id)
    assert [u.name for u in units] == VARIANTS and all(u.status == "succeeded" for u in units)
    assert [v["name"] for v in job.summary["variants"]] == VARIANTS
    assert job.progress == 1.0 and job.stage == "done"
    with session_scope() as s:  # what GET /jobs/{id} shows
        shown = job_out(s.get(Job, job_id)).units
    assert [(u.name, u.status, u.progress, u.attempts) for u in shown] == [
        (n, "succeeded", 1.0, 1) for n in VARIANTS]
    # both workers ran variants (each logs the units it claimed)
    assert all(" unit " in log and "claimed by" in log for log in logs), logs
    with session_scope() as s:  # carcert logs: the job's own log has every unit's lines, under its name
        lines = [row.message for row in read_lines(s, job_id, limit=10_000)]
    for name in VARIANTS:
        assert any(m.startswith(f"[{name}] job {job_id} unit {name} claimed by") for m in lines), lines
    end = re.compile(rf"\[(\S+)\] job {job_id} finished: succeeded \(by unit \1\)")
    ends = [m for m in lines if end.fullmatch(m)]
    assert len(ends) == 1, lines


def test_sweep_survives_a_worker_killed_mid_variant(settings_env, reference, tmp_path) -> None:
    queue, workers = _two_workers(settings_env, tmp_path, "kill")
    victim, survivor = workers
    try:
        job_id = _run("scale-kill", queue)
        tag = f":{victim.proc.pid}:"

        def victim_mid_variant() -> bool:
            with session_scope() as s:
                return any(u.status == "running" and tag in (u.lease_owner or "")
                           and u.stage in ("search", "finetune") for u in units_of(s, job_id))

        wait_for(victim_mid_variant, 300, interval=0.2, what="the victim inside a variant")
        with session_scope() as s:
            killed, stage = next((u.name, u.stage) for u in units_of(s, job_id)
                                 if tag in (u.lease_owner or ""))
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        _wait(job_id, [survivor])
        after = _outcome(job_id)
    finally:
        for w in workers:
            w.stop()
    for name in VARIANTS:
        differ = sorted(k for k in reference[name][0] if after[name][0].get(k) != reference[name][0][k])
        assert after[name] == reference[name], (name, f"killed {killed} in {stage}", differ)
    with session_scope() as s:
        attempts = {u.name: u.attempts for u in units_of(s, job_id)}
    assert attempts[killed] == 2, attempts  # only the killed variant ran again
    # re-sent by a stale sweep (the survivor's or any other worker's of this database) to the unit's
    # own queue, where only the survivor listens
    assert f"unit {killed} claimed by" in survivor.log() and "(attempt 2)" in survivor.log()


def test_a_stale_unit_goes_back_to_its_own_queue(settings_env, redis_url) -> None:
    """Whichever worker's sweep finds a unit whose lease expired, the unit is re-sent to the queue it
    was fanned out on (else a worker of another queue, another machine class, would run it)."""
    import redis

    from store.units import claim_unit, fan_out
    from worker.queue import UNIT_TASK_NAME, sweep_stale_units

    queue = f"scale-own-{uuid.uuid4().hex[:8]}"
    with session_scope() as s:
        job, _ = repo.create_job(s, "scale-own", JobSpec.model_validate(SWEEP))
    with session_scope() as s:
        assert repo.claim_job(s, job.id, "parent")
        units = fan_out(s, job.id, "parent", VARIANTS, queue=queue)
    assert [q for _, q in units] == [queue] * len(VARIANTS)
    dead = units[0][0]
    with session_scope() as s:
        assert claim_unit(s, dead, "gone")
        s.execute(update(JobUnit).where(JobUnit.job_id == job.id).values(
            lease_expires_at=utcnow() - timedelta(seconds=1), updated_at=utcnow() - timedelta(minutes=1)))
    broker = redis.Redis.from_url(redis_url)
    assert sweep_stale_units() >= len(VARIANTS)  # this process's settings.queue is not `queue`
    sent = [json.loads(m)["headers"] for m in broker.lrange(queue, 0, -1)]
    assert sorted(h["argsrepr"] for h in sent) == sorted(repr([u]) for u, _ in units)
    assert {h["task"] for h in sent} == {UNIT_TASK_NAME}
    broker.delete(queue)
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job.id).values(status="cancelled", lease_owner=None))


def test_cancel_stops_every_unit(settings_env, tmp_path) -> None:
    queue, workers = _two_workers(settings_env, tmp_path, "cancel")
    slow = {**SWEEP, "pruning": {**SWEEP["pruning"], "search_epochs": 200}}
    try:
        with session_scope() as s:
            job, _ = repo.create_job(s, "scale-cancel", JobSpec.model_validate(slow))
        assert dispatch(job.id, queue=queue)

        def two_running() -> bool:
            with session_scope() as s:
                return sum(u.status == "running" for u in units_of(s, job.id)) == 2

        wait_for(two_running, 300, interval=0.2, what="two units running")
        with session_scope() as s:
            assert repo.request_cancel(s, "scale-cancel", job.id).cancel_requested
        done = wait_for(lambda: (j := _job(job.id)).status in FINAL and j, 60, interval=0.2, what="cancel")
        assert done.status == "cancelled"

        def units_cancelled() -> bool:
            with session_scope() as s:
                return all(u.status == "cancelled" for u in units_of(s, job.id))

        wait_for(units_cancelled, 30, what="every unit cancelled")
        with session_scope() as s:
            assert repo.get_results(s, job.id) == []
    finally:
        for w in workers:
            w.stop()


def test_certification_shards_on_two_workers_give_the_unsharded_bytes(settings_env, service_dirs,
                                                                       tmp_path) -> None:
    """A certify job split into 3 shards (+ the merge unit) on two workers: the certificate and the
    evidence are those of the same certification run whole in this process."""
    import torch

    from core.certify import certificate_body
    from core.context import LocalContext
    from core.models import build_model, default_small_input, save_weights
    from core.pipeline import run_job

    torch.manual_seed(0)
    weights = service_dirs["data"] / f"scale-{uuid.uuid4().hex[:8]}.safetensors"
    save_weights(build_model("small_cnn", 10, 1, small_input=default_small_input(8, 8)), weights)
    spec = {"kind": "certify", "model": {"arch": "small_cnn", "weights": str(weights)}, "dataset": "digits",
            "transform": {"kind": "parametric", "name": "brightness"}, "seed": 4,
            "certification": {"n": 20, "l": 10, "samples": 120, "t_steps": 50, "batch_size": 64}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker (CARCERT_TORCH_THREADS=1)
    try:
        out = tmp_path / "whole"
        run_job(JobSpec.model_validate(spec), out, LocalContext(out), device="cpu")
    finally:
        torch.set_num_threads(threads)
    whole = json.loads((tmp_path / "whole" / "certify" / "certificate.json").read_text())
    assert not (tmp_path / "whole" / "certify" / "shards").exists()  # unsplit

    queue, workers = _two_workers(settings_env, tmp_path, "shards")
    sharded = {**spec, "certification": {**spec["certification"], "shards": 3}}
    try:
        with session_scope() as s:
            job, _ = repo.create_job(s, "scale-shards", JobSpec.model_validate(sharded))
        assert dispatch(job.id, queue=queue)
        _wait(job.id, workers)
        logs = [w.log() for w in workers]
    finally:
        for w in workers:
            w.stop()
    with session_scope() as s:
        (res,) = repo.get_results(s, job.id)
        cert = dict(res.certificate)
        names = [(u.name, u.status) for u in units_of(s, job.id)]
    assert names == [("shard-0", "succeeded"), ("shard-1", "succeeded"), ("shard-2", "succeeded"),
                     ("certify", "succeeded")]
    assert certificate_body(cert) == certificate_body(whole)
    assert cert["evidence_sha256"] == whole["evidence_sha256"]
    assert all("unit shard-" in log for log in logs), "both workers computed shards"
