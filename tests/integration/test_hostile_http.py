"""A second adversarial pass over real HTTP (uvicorn subprocess, fresh Postgres database, no worker
listens, so jobs stay queued): NUL bytes in path references, non-finite numbers, the job work cap,
the per-tenant queue quota, /metrics behind its token, the pickle refusal message, deeply nested
bodies and /docs served without a CDN. Every answer is a 4xx problem+json naming the field, never
a 5xx. A second server on SQLite shows a stored non-finite value never makes a read 500."""

from __future__ import annotations

import io
import os
import pickle
import re
import uuid

import httpx
import pytest
import torch

from tests.integration.api_harness import assert_problem, create_key, fresh_database, run_server, server_env

pytestmark = pytest.mark.integration

MAX_QUEUED = 3
METRICS_TOKEN = "metrics-" + uuid.uuid4().hex
TINY = {
    "dataset": "digits",
    "pruning": {"method": "lmp", "pretrain_epochs": 1, "search_epochs": 0, "finetune_epochs": 0},
    "certification": {"samples": 2, "n": 10, "l": 2},
}
PATH_FIELDS = {
    "dataset": lambda v: {"dataset": v},
    "model.weights": lambda v: {"model": {"weights": v}},
    "mask": lambda v: {"kind": "certify", "model": {"weights": "artifact:x"}, "mask": v},
    "transform.encoder": lambda v: {"transform": {"kind": "latent", "encoder": v}},
    "transform.decoder": lambda v: {"transform": {"kind": "latent", "decoder": v}},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with fresh_database() as db_url:
        tenants = ("alice", "bob", "carol", "dave")
        keys = {t: create_key(db_url, t) for t in tenants}
        e = server_env(
            db_url,
            tmp,
            CARCERT_BROKER_URL="redis://127.0.0.1:6379/14",  # no worker: jobs stay queued
            CARCERT_TENANT_MAX_QUEUED=str(MAX_QUEUED),
            CARCERT_METRICS_TOKEN=METRICS_TOKEN,
        )
        with run_server(e, tmp / "server.log", keys=keys) as srv:
            srv.tmp = tmp
            yield srv
        assert "Traceback" not in srv.log(), srv.log()[-3000:]


@pytest.fixture
def alice(env):
    with env.client("alice") as c:
        yield c


def post_raw(client: httpx.Client, body: str | bytes) -> httpx.Response:
    return client.post("/jobs", content=body, headers={"Content-Type": "application/json"})


def fields(problem: dict) -> list[str]:
    return [e["field"] for e in problem.get("errors", [])]


# ------------------------------------------------------------------------------------- 1. NUL bytes


@pytest.mark.parametrize("field", list(PATH_FIELDS))
@pytest.mark.parametrize("value", ["npz:\u0000", "\u0000", "artifact:\u0000abc", "npz:/tmp/a\u0000b.npz"])
def test_nul_byte_in_any_path_reference_is_422_naming_the_field(alice, field, value):
    import json

    r = post_raw(alice, json.dumps({**TINY, **PATH_FIELDS[field](value)}))
    body = assert_problem(r, 422)
    assert field in fields(body), body


def test_nul_bytes_elsewhere_never_500(env, alice):
    assert_problem(alice.get("/jobs/%00"), 404)
    assert_problem(alice.get("/jobs/abc%00def/certificate"), 404)
    assert_problem(alice.get("/artifacts/%00"), 404)
    assert alice.get("/jobs", params={"cursor": "\u0000"}).status_code == 422
    r = alice.post("/jobs", json={**TINY, "transform": {"name": "bright\u0000ness"}})
    assert "transform.name" in fields(assert_problem(r, 422))
    files = {"file": ("a\u0000b.bin", b"\x00" * 64)}
    up = alice.post("/artifacts", files=files, data={"kind": "dataset"})
    assert up.status_code in (201, 422), up.text
    if up.status_code == 201:
        assert "\u0000" not in up.json()["filename"]


def test_overlong_path_component_inside_a_data_root_is_422(env, alice):
    r = alice.post("/jobs", json={**TINY, "dataset": f"npz:{env.tmp / 'data' / ('a' * 300)}.npz"})
    assert "dataset" in fields(assert_problem(r, 422))


# ---------------------------------------------------------------------------- 2. non-finite numbers


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
@pytest.mark.parametrize(
    ("field", "template"),
    [
        ("certification.t_max", '{"certification": {"t_max": %s}}'),
        ("pruning.car.eta", '{"pruning": {"car": {"eta": %s}}}'),
        ("pruning.car.lambda_ratio", '{"pruning": {"car": {"lambda_ratio": %s}}}'),
        ("sweep_prune_ratios.0", '{"sweep_prune_ratios": [%s]}'),
    ],
)
def test_non_finite_numbers_are_422_naming_the_field(alice, field, template, literal):
    r = post_raw(alice, template % literal)
    body = assert_problem(r, 422)
    assert field in fields(body), body
    assert "finite" in body["detail"]


# ------------------------------------------------------------------------------------ 3. work cap

GREEDY = {
    "model": {"arch": "googlenet"},
    "pruning": {"pretrain_epochs": 1000, "search_epochs": 1000, "finetune_epochs": 1000},
    "certification": {"n": 1_000_000, "l": 10_000, "samples": 1_000_000},
    "sweep_methods": ["lmp", "hydra", "car", "advtrain+lmp"],
    "sweep_prune_ratios": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
}
# bench/table1.py's resnet18 command: the paper's epochs on full Fashion-MNIST, 4 methods x 2 ratios
TABLE1_RESNET18 = {
    "model": {"arch": "resnet18"},
    "dataset": "fashion-mnist",
    "transform": {"name": "illumination", "strength": 2.0},
    "pruning": {
        "pretrain_epochs": 50,
        "search_epochs": 100,
        "finetune_epochs": 50,
        "adv_steps": 10,
        "lr": 0.01,
        "augment_q": 1000,
    },
    "sweep_methods": ["vanilla", "lmp", "hydra", "car"],
    "sweep_prune_ratios": [0.5, 0.7],
    "train_subset": 60000,
}


def test_job_over_the_work_cap_is_422_with_estimate_and_cap(env):
    from core.spec import JobSpec
    from core.work import estimate_work

    with env.client("bob") as bob:
        r = bob.post("/jobs", json=GREEDY)
        body = assert_problem(r, 422)
        assert body["type"].endswith("job-too-large")
        assert body["estimated_work"] == estimate_work(JobSpec.model_validate(GREEDY))
        assert body["max_job_work"] == 2_000_000_000
        assert "CARCERT_MAX_JOB_WORK" in body["detail"]
        assert bob.get("/jobs").json()["items"] == []  # nothing stored
        ok = bob.post("/jobs", json=TABLE1_RESNET18)
        assert ok.status_code == 202, ok.text


# ---------------------------------------------------------------------------------- 4. queue quota


def test_tenant_queue_quota_is_429_with_retry_after(env):
    with env.client("carol") as carol, env.client("dave") as dave:
        ids = [carol.post("/jobs", json={**TINY, "seed": i}).json()["id"] for i in range(MAX_QUEUED)]
        assert len(set(ids)) == MAX_QUEUED
        over = carol.post("/jobs", json={**TINY, "seed": 99}, headers={"Idempotency-Key": "k-over"})
        body = assert_problem(over, 429)
        assert int(over.headers["Retry-After"]) > 0
        assert body["type"].endswith("too-many-queued-jobs")
        assert body["queued"] == MAX_QUEUED and body["max_queued"] == MAX_QUEUED
        assert len(carol.get("/jobs").json()["items"]) == MAX_QUEUED
        assert dave.post("/jobs", json=TINY).status_code == 202  # other tenants are not affected
        # cancelling a queued job frees a slot; a replay of a stored Idempotency-Key is never refused
        assert carol.post(f"/jobs/{ids[0]}/cancel").status_code == 200
        first = carol.post("/jobs", json={**TINY, "seed": 7}, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 202
        replay = carol.post("/jobs", json={**TINY, "seed": 7}, headers={"Idempotency-Key": "k-1"})
        assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
        assert_problem(carol.post("/jobs", json={**TINY, "seed": 8}), 429)


# ------------------------------------------------------------------------------------ 6. small leaks


def test_metrics_job_counts_need_the_metrics_token(env, alice):
    assert_problem(httpx.get(env.url + "/metrics"), 401)
    assert_problem(httpx.get(env.url + "/metrics", headers={"Authorization": "Bearer wrong"}), 401)
    api_key = {"Authorization": f"Bearer {env.keys['alice']}"}  # a tenant key is not the metrics token
    assert_problem(httpx.get(env.url + "/metrics", headers=api_key), 401)
    ok = httpx.get(env.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert ok.status_code == 200
    assert re.search(r'carcert_jobs\{status="queued"\} \d', ok.text)
    assert "carcert_http_requests_total" in ok.text


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/carcert-pwned",))


@pytest.mark.parametrize("wrap", ["torch_zip", "raw_pickle"])
def test_pickle_refusal_names_the_refused_global(alice, wrap):
    buf = io.BytesIO()
    if wrap == "torch_zip":
        torch.save({"w": torch.zeros(2), "x": Evil()}, buf)
    else:
        pickle.dump({"w": Evil()}, buf, protocol=4)
    r = alice.post("/artifacts", files={"file": ("w.pt", buf.getvalue())}, data={"kind": "weights"})
    body = assert_problem(r, 422)
    assert re.search(r"refused global (posix|os)\.system", body["detail"]), body["detail"]
    assert "weights_only=False" not in body["detail"] and "Re-running" not in body["detail"]


@pytest.mark.parametrize("body", ["[" * 100_000, '{"a":' * 20_000 + "1" + "}" * 20_000])
def test_deeply_nested_body_is_a_typed_400(alice, body):
    problem = assert_problem(post_raw(alice, body), 400)
    assert problem["type"] != "about:blank" and problem["type"].endswith("malformed-body")
    assert problem["title"] == "Malformed request body"


# --------------------------------------------------------------------------------- 7. offline /docs


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_reference_no_external_host_and_assets_are_served(env, page):
    html = httpx.get(env.url + page).text
    assert re.findall(r"https?://", html) == [], html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(a.endswith(".js") for a in assets), assets
    for url in assets:
        assert url.startswith("/"), url
        r = httpx.get(env.url + url)
        assert r.status_code == 200 and len(r.content) > 1000, (url, r.status_code)
    assert httpx.get(env.url + "/openapi.json").status_code == 200


# ----------------------------------------------------------- 2b. stored non-finite values (SQLite)


@pytest.fixture(scope="module")
def sqlite_env(tmp_path_factory):
    from store.db import init_db, make_engine

    tmp = tmp_path_factory.mktemp("hostile-sqlite")
    db_url = f"sqlite:///{tmp / 'carcert.db'}"
    engine = make_engine(db_url)
    init_db(engine)
    engine.dispose()
    e = server_env(db_url, tmp, CARCERT_BROKER_URL="redis://127.0.0.1:6379/14")
    with run_server(e, tmp / "server.log", keys={"erin": create_key(db_url, "erin")}) as srv:
        srv.db_url = db_url
        yield srv


def test_stored_non_finite_values_never_make_a_read_500(sqlite_env):
    """SQLite stores NaN / inf in JSON columns (Postgres refuses them): a job written before
    non-finite specs were refused, with inf in its spec, summary and certificate, reads as null."""
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from core.results import VariantResult
    from core.spec import JobSpec
    from store import jobs as repo
    from store.db import make_engine
    from store.models import Job

    engine = make_engine(sqlite_env.db_url)
    with Session(engine) as s:
        job, _ = repo.create_job(s, "erin", JobSpec.model_validate(TINY))
        s.flush()
        spec = {**job.spec, "certification": {**job.spec["certification"], "t_max": float("inf")}}
        s.execute(update(Job).where(Job.id == job.id).values(spec=spec))
        repo.add_result(
            s,
            job.id,
            VariantResult(name="lmp-0.50", method="lmp", prune_ratio=0.5, pca=0.0),
            certificate={
                "job_id": job.id,
                "pca": 0.0,
                "params": {"t_max": float("inf")},
                "z": [float("nan")],
            },
        )
        repo.finish_job(s, job.id, "succeeded", summary={"variants": [{"pca": float("-inf")}]})
        s.commit()
        job_id = job.id
    engine.dispose()
    with sqlite_env.client("erin") as erin:
        cert = erin.get(f"/jobs/{job_id}/certificate")
        assert cert.status_code == 200, cert.text
        assert cert.json()["params"]["t_max"] is None and cert.json()["z"] == [None]
        got = erin.get(f"/jobs/{job_id}")
        assert got.status_code == 200, got.text
        assert got.json()["summary"]["variants"][0]["pca"] is None
        assert erin.get("/jobs").status_code == 200
