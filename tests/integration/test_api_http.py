"""The REST API over real HTTP: a uvicorn subprocess on a fresh Postgres database (no worker runs
here, so jobs stay queued). Auth, tenant isolation, problem+json on every error, validation with
nothing written, upload limits and safe weights checks, idempotency, pagination, cancel, database
down, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save
from sqlalchemy import create_engine, text

from tests.integration.api_harness import assert_problem, create_key, fresh_database, run_server, server_env

pytestmark = pytest.mark.integration

MAX_UPLOAD = 256 * 1024
MULTIPART_B = "multipart/form-data; boundary=B"
TINY = {
    "dataset": "digits",
    "pruning": {
        "method": "lmp",
        "prune_ratio": 0.5,
        "pretrain_epochs": 1,
        "search_epochs": 0,
        "finetune_epochs": 0,
    },
    "certification": {"samples": 2, "n": 10, "l": 2},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    with fresh_database() as db_url:
        keys = {"alice": create_key(db_url, "alice"), "bob": create_key(db_url, "bob")}
        # a Redis database no worker listens on: submitted jobs stay queued
        e = server_env(
            db_url,
            tmp,
            CARCERT_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
            CARCERT_BROKER_URL="redis://127.0.0.1:6379/14",
        )
        with run_server(e, tmp / "server.log") as srv:
            srv.keys.update(keys)
            srv.db_url = db_url
            srv.tmp = tmp
            yield srv


@pytest.fixture(scope="module")
def alice(env):
    with env.client("alice") as c:
        yield c


@pytest.fixture(scope="module")
def bob(env):
    with env.client("bob") as c:
        yield c


def count(db_url: str, table: str, tenant: str | None = None) -> int:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        sql = f"SELECT count(*) FROM {table}" + (" WHERE tenant = :t" if tenant else "")
        n = conn.execute(text(sql), {"t": tenant}).scalar_one()
    engine.dispose()
    return int(n)


def stored_blobs(env) -> list[Path]:
    root = Path(env.env["CARCERT_ARTIFACT_ROOT"])
    return sorted(p for p in root.rglob("*") if p.is_file())


def safetensors_bytes(seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return st_save({"conv.weight": torch.randn(4, 1, 3, 3, generator=g), "fc.bias": torch.zeros(3)})


# ------------------------------------------------------------------------------------------ auth


def test_missing_malformed_and_unknown_keys_are_401(env):
    with env.client() as anon:
        r = anon.get("/jobs")
        body = assert_problem(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert body["instance"] == "/jobs"
        assert_problem(anon.get("/jobs", headers={"Authorization": "Basic YWxpY2U6eA=="}), 401)
        r = anon.get("/jobs", headers={"Authorization": "Bearer cc_not-a-real-key"})
        assert_problem(r, 401)
        assert "invalid_token" in r.headers["www-authenticate"]
        # a key of the right shape with one character changed is still refused
        forged = env.keys["alice"][:-1] + ("A" if env.keys["alice"][-1] != "A" else "B")
        assert_problem(anon.get("/jobs", headers={"Authorization": f"Bearer {forged}"}), 401)
        assert_problem(anon.post("/artifacts", files={"file": ("w", b"x")}), 401)


def test_health_needs_no_key_and_readyz_checks_db_and_broker(env):
    with env.client() as anon:
        assert anon.get("/healthz").json()["status"] == "ok"
        r = anon.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {"database": "ok", "broker": "ok"}


# ------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"pruning": {"prune_ratio": 1.5}}, "pruning.prune_ratio"),
        ({"certification": {"n": 0}}, "certification.n"),
        ({"certification": {"alpha": 1.2}}, "certification.alpha"),
        ({"model": {"arch": "vgg99"}}, "model.arch"),
        ({"pruning": {"method": "magic"}}, "pruning.method"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"seed": False}, "seed"),  # strict JSON types: no bool -> int or str -> int coercion
        ({"certification": {"n": "5"}}, "certification.n"),
    ],
)
def test_out_of_range_parameters_are_422_and_write_nothing(env, alice, patch, field):
    before = count(env.db_url, "jobs")
    r = alice.post("/jobs", json={**TINY, **patch})
    body = assert_problem(r, 422)
    assert any(e["field"] == field for e in body["errors"]), body["errors"]
    assert count(env.db_url, "jobs") == before


def test_malformed_json_body_is_a_problem(env, alice):
    before = count(env.db_url, "jobs")
    r = alice.post("/jobs", content=b'{"dataset": "digits",', headers={"Content-Type": "application/json"})
    assert_problem(r, 400)
    r = alice.post("/jobs", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert_problem(r, 422)
    assert count(env.db_url, "jobs") == before


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"dataset": "npz:{root}/../../../etc/passwd"}, "outside the allowed data roots"),
        ({"dataset": "npz:/etc/passwd"}, "outside the allowed data roots"),
        ({"dataset": "imagefolder:{root}/missing"}, "does not exist"),
        ({"dataset": "ftp://example.org/x"}, "unknown dataset reference"),
        ({"model": {"weights": "/etc/hostname"}}, "outside the allowed data roots"),
        ({"model": {"weights": "artifact:0123456789abcdef0123456789abcdef"}}, "not found"),
        ({"transform": {"kind": "parametric", "name": "brightness+teleport"}}, "unknown parametric"),
    ],
)
def test_bad_references_are_422_and_write_nothing(env, alice, patch, needle):
    root = str(env.tmp / "data")
    patch = {k: (v.format(root=root) if isinstance(v, str) else v) for k, v in patch.items()}
    before = count(env.db_url, "jobs")
    body = assert_problem(alice.post("/jobs", json={**TINY, **patch}), 422)
    assert needle in body["detail"], body
    assert count(env.db_url, "jobs") == before


def test_dataset_path_inside_data_roots_is_accepted(env, alice):
    path = env.tmp / "data" / "tiny.npz"
    np.savez(
        path,
        x_train=np.zeros((4, 8, 8, 1), np.uint8),
        y_train=np.arange(4) % 2,
        x_test=np.zeros((2, 8, 8, 1), np.uint8),
        y_test=np.arange(2),
    )
    r = alice.post("/jobs", json={**TINY, "dataset": f"npz:{path}"})
    assert r.status_code == 202, r.text


# --------------------------------------------------------------------------------------- uploads


def test_upload_safetensors_metadata_and_tenant_isolation(env, alice, bob):
    data = safetensors_bytes()
    r = alice.post("/artifacts", files={"file": ("net.safetensors", data)}, data={"kind": "weights"})
    assert r.status_code == 201, r.text
    art = r.json()
    assert art["sha256"] == hashlib.sha256(data).hexdigest()
    assert art["size"] == len(data)
    assert (art["kind"], art["filename"]) == ("weights", "net.safetensors")
    assert art["ref"] == f"artifact:{art['id']}"
    assert r.headers["location"] == f"/artifacts/{art['id']}"
    got = alice.get(f"/artifacts/{art['id']}")
    assert got.status_code == 200 and got.json()["sha256"] == art["sha256"]
    # the stored blob has exactly the uploaded bytes
    assert any(p.read_bytes() == data for p in stored_blobs(env))
    # bob neither sees it nor can reference it
    assert_problem(bob.get(f"/artifacts/{art['id']}"), 404)
    before = count(env.db_url, "jobs")
    body = assert_problem(bob.post("/jobs", json={**TINY, "model": {"weights": art["ref"]}}), 422)
    assert "not found" in body["detail"]
    assert count(env.db_url, "jobs") == before
    # alice can; a dataset-kind artifact is refused as weights
    assert alice.post("/jobs", json={**TINY, "model": {"weights": art["ref"]}}).status_code == 202


def test_upload_torch_weights_only_checkpoint_is_accepted(env, alice):
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2, 2), "b": torch.zeros(2)}}, buf)
    r = alice.post("/artifacts", files={"file": ("ckpt.pt", buf.getvalue())}, data={"kind": "weights"})
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == hashlib.sha256(buf.getvalue()).hexdigest()


def test_upload_over_the_limit_is_413_and_keeps_nothing(env, alice):
    rows, blobs = count(env.db_url, "artifacts"), stored_blobs(env)
    big = os.urandom(MAX_UPLOAD + 1)
    assert_problem(alice.post("/artifacts", files={"file": ("big.bin", big)}, data={"kind": "other"}), 413)

    # without Content-Length (chunked): the streamed count stops it, too
    def chunks():
        boundary = b"XyZ"
        yield b'--XyZ\r\nContent-Disposition: form-data; name="kind"\r\n\r\nother\r\n'
        yield b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="b.bin"\r\n\r\n'
        for _ in range(MAX_UPLOAD // 65536 + 2):
            yield os.urandom(65536)
        yield b"\r\n--" + boundary + b"--\r\n"

    ctype = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    r = alice.post("/artifacts", content=chunks(), headers=ctype)
    assert_problem(r, 413)
    assert count(env.db_url, "artifacts") == rows
    assert stored_blobs(env) == blobs


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_pickle_with_code_is_refused_without_running_it(env, alice, tmp_path, container):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    payload = {"weight": _Exploit(marker)}
    if container == "pickle":
        pickle.dump(payload, buf)
    else:
        torch.save(payload, buf)
    rows, blobs = count(env.db_url, "artifacts"), stored_blobs(env)
    r = alice.post("/artifacts", files={"file": ("evil.pt", buf.getvalue())}, data={"kind": "weights"})
    body = assert_problem(r, 422)
    assert "weights_only" in body["detail"]
    assert not marker.exists()
    assert count(env.db_url, "artifacts") == rows
    assert stored_blobs(env) == blobs


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}       ', 422),  # safetensors header, bad entry
        (b"\xff\x00\x00\x00\x00\x00\x00\x00{", 422),  # header longer than the file
        (b"not a checkpoint at all", 422),
    ],
)
def test_corrupt_weights_are_422(env, alice, content, status):
    r = alice.post("/artifacts", files={"file": ("w.safetensors", content)}, data={"kind": "weights"})
    assert_problem(r, status)


def test_truncated_safetensors_is_422(env, alice):
    data = safetensors_bytes()
    r = alice.post("/artifacts", files={"file": ("w.safetensors", data[:-7])}, data={"kind": "weights"})
    assert "truncated" in assert_problem(r, 422)["detail"]


def test_upload_form_errors(env, alice):
    assert_problem(alice.post("/artifacts", json={"file": "x"}), 415)
    assert_problem(alice.post("/artifacts", files={"other": ("w", b"x")}), 400)
    r = alice.post("/artifacts", files={"file": ("w", safetensors_bytes())}, data={"kind": "rootkit"})
    assert "kind must be one of" in assert_problem(r, 422)["detail"]
    truncated = b'--B\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\nabc'
    r = alice.post("/artifacts", content=truncated, headers={"Content-Type": MULTIPART_B})
    assert_problem(r, 400)


# ------------------------------------------------------------------------------------------ jobs


def test_submit_returns_202_location_and_tenant_isolation(env, alice, bob):
    r = alice.post("/jobs", json=TINY)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0.0
    assert job["spec"]["certification"]["samples"] == 2
    got = alice.get(r.headers["location"])
    assert got.status_code == 200 and got.json()["id"] == job["id"]
    for path in ("", "/certificate", "/mask", "/model"):
        assert_problem(bob.get(f"/jobs/{job['id']}{path}"), 404)
    assert_problem(bob.post(f"/jobs/{job['id']}/cancel"), 404)
    assert job["id"] not in [j["id"] for j in bob.get("/jobs", params={"limit": 200}).json()["items"]]
    assert_problem(alice.get("/jobs/does-not-exist"), 404)


def test_results_of_an_unfinished_job_are_409(env, alice):
    job = alice.post("/jobs", json=TINY).json()
    for path in ("/certificate", "/mask", "/model"):
        body = assert_problem(alice.get(f"/jobs/{job['id']}{path}"), 409)
        assert body["job_status"] == "queued"


def test_idempotency_key(env, alice, bob):
    before = count(env.db_url, "jobs")
    r1 = alice.post("/jobs", json=TINY, headers={"Idempotency-Key": "same-key"})
    r2 = alice.post("/jobs", json=TINY, headers={"Idempotency-Key": "same-key"})
    assert (r1.status_code, r2.status_code) == (202, 200)
    assert r1.json()["id"] == r2.json()["id"]
    assert r2.headers["location"] == f"/jobs/{r1.json()['id']}"
    # the same body spelled differently (defaults written out) is the same request
    explicit = {**TINY, "seed": 0, "kind": "prune"}
    key = {"Idempotency-Key": "same-key"}
    assert alice.post("/jobs", json=explicit, headers=key).json()["id"] == r1.json()["id"]
    assert count(env.db_url, "jobs") == before + 1
    body = assert_problem(alice.post("/jobs", json={**TINY, "seed": 7}, headers=key), 409)
    assert r1.json()["id"] in body["detail"]
    # keys are per tenant: bob's same key makes bob's own job
    r3 = bob.post("/jobs", json=TINY, headers={"Idempotency-Key": "same-key"})
    assert r3.status_code == 202 and r3.json()["id"] != r1.json()["id"]
    assert count(env.db_url, "jobs") == before + 2


def test_pagination_walks_every_job_exactly_once(env):
    key = create_key(env.db_url, "pager")
    with httpx.Client(base_url=env.url, headers={"Authorization": f"Bearer {key}"}) as c:
        made = {c.post("/jobs", json={**TINY, "seed": i}).json()["id"] for i in range(7)}
        cancelled = next(iter(made))
        assert c.post(f"/jobs/{cancelled}/cancel").status_code == 200
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
            page = c.get("/jobs", params=params).json()
            assert len(page["items"]) <= 3
            seen += [j["id"] for j in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)) == 7 and set(seen) == made
        assert pages == 3
        created = [j["created_at"] for j in c.get("/jobs", params={"limit": 200}).json()["items"]]
        assert created == sorted(created, reverse=True)
        queued = c.get("/jobs", params={"status": "queued", "limit": 200}).json()["items"]
        assert {j["id"] for j in queued} == made - {cancelled}
        only = c.get("/jobs", params={"status": "cancelled"}).json()["items"]
        assert [j["id"] for j in only] == [cancelled]
        assert_problem(c.get("/jobs", params={"cursor": "garbage!"}), 422)
        assert_problem(c.get("/jobs", params={"limit": 0}), 422)
        assert_problem(c.get("/jobs", params={"status": "exploded"}), 422)


def test_cancel_a_queued_job(env, alice):
    job = alice.post("/jobs", json=TINY).json()
    r = alice.post(f"/jobs/{job['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["finished_at"] is not None
    assert alice.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"
    assert alice.post(f"/jobs/{job['id']}/cancel").status_code == 200  # idempotent
    assert_problem(alice.get(f"/jobs/{job['id']}/certificate"), 409)


def test_cancel_of_a_finished_job_is_409(env, alice):
    job = alice.post("/jobs", json=TINY).json()
    engine = create_engine(env.db_url)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET status='succeeded', finished_at=now() WHERE id=:i"), {"i": job["id"]}
        )
    engine.dispose()
    body = assert_problem(alice.post(f"/jobs/{job['id']}/cancel"), 409)
    assert body["job_status"] == "succeeded"


# ------------------------------------------------------------------------------ metrics, openapi


def test_metrics_count_requests_and_jobs_by_status(env, alice, tmp_path):
    alice.get("/jobs")
    text_ = httpx.get(env.url + "/metrics").text
    assert re.search(r'carcert_http_requests_total\{method="GET",route="/jobs",status="200"\} [1-9]', text_)
    assert 'carcert_http_request_duration_seconds_bucket{le="0.05",method="GET",route="/jobs"}' in text_
    # every tenant's job counts are not for anyone who can reach the port: only with the token
    assert "carcert_jobs" not in text_
    token = {"Authorization": "Bearer m-token"}
    with run_server({**env.env, "CARCERT_METRICS_TOKEN": "m-token"}, tmp_path / "metrics.log") as srv:
        text_ = httpx.get(srv.url + "/metrics", headers=token).text
    engine = create_engine(env.db_url)
    with engine.connect() as conn:
        queued = conn.execute(text("SELECT count(*) FROM jobs WHERE status='queued'")).scalar_one()
    engine.dispose()
    assert f'carcert_jobs{{status="queued"}} {float(queued)}' in text_


def test_openapi_declares_problem_json_for_every_error(env):
    doc = httpx.get(env.url + "/openapi.json").json()
    ops = [(p, m, op) for p, item in doc["paths"].items() for m, op in item.items()]
    assert {
        "/artifacts",
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/certificate",
        "/jobs/{job_id}/mask",
        "/jobs/{job_id}/model",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(doc["paths"])
    for path, method, op in ops:
        errors = {c: r for c, r in op["responses"].items() if c[0] in "45"}
        assert "500" in errors, (path, method)
        for code, resp in errors.items():
            assert list(resp["content"]) == ["application/problem+json"], (path, method, code)
    assert {"401", "404", "409"} <= set(doc["paths"]["/jobs/{job_id}/certificate"]["get"]["responses"])
    assert "multipart/form-data" in doc["paths"]["/artifacts"]["post"]["requestBody"]["content"]
    assert httpx.get(env.url + "/docs").status_code == 200


# ------------------------------------------------------------------------------------- DB down


def test_database_down_is_503_problem_not_a_stack_trace(env, tmp_path):
    e = dict(env.env, CARCERT_DATABASE_URL="postgresql+psycopg://root@127.0.0.1:1/test")
    with run_server(e, tmp_path / "down.log") as down:
        down.keys.update(env.keys)
        with down.client("alice") as c:
            for r in (c.get("/jobs"), c.post("/jobs", json=TINY), c.get("/jobs/abc/certificate")):
                body = assert_problem(r, 503)
                assert "database" in body["detail"].lower()
                assert r.headers.get("retry-after")
                assert "127.0.0.1:1" not in r.text and "psycopg" not in r.text
            assert c.get("/healthz").status_code == 200
            body = assert_problem(c.get("/readyz"), 503)
            assert body["checks"]["database"] == "unreachable"


def test_unknown_routes_and_methods_are_problems(env, alice):
    assert_problem(alice.get("/no/such/thing"), 404)
    assert_problem(alice.delete("/jobs"), 405)


def test_unexpected_error_is_500_problem_without_internals(env, tmp_path):
    """A route that fails unexpectedly (added to a real app on the test database) answers a bare
    500 problem: no exception text, no stack trace."""
    import asyncio

    from api.main import create_app
    from store.settings import Settings

    settings = Settings(
        database_url=env.db_url,
        broker_url=env.env["CARCERT_BROKER_URL"],
        artifact_root=tmp_path / "a",
        work_root=tmp_path / "w",
    )
    app = create_app(settings)

    def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    app.add_api_route("/boom", boom)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/boom")

    r = asyncio.run(call())
    body = assert_problem(r, 500)
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert body["type"].endswith("internal-error")


def test_schemathesis_finds_no_server_error_or_undeclared_response(env, tmp_path):
    """Property-based requests generated from /openapi.json (schemathesis, fixed seed): no 5xx,
    every status code, content type, header and body as declared, auth enforced, invalid input
    refused. (positive_data_acceptance is left out: a schema-valid spec may still be refused with
    422 for reasons the schema cannot express, such as an unknown artifact id.)"""
    import shutil
    import subprocess
    import sys

    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis is not installed")
    checks = (
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_headers_conformance,response_schema_conformance,negative_data_rejection,"
        "unsupported_method,allow_header_conformance,ignored_auth,missing_required_header"
    )
    cmd = [
        st,
        "run",
        env.url + "/openapi.json",
        "-H",
        f"Authorization: Bearer {env.keys['alice']}",
        "--checks",
        checks,
        "--max-examples",
        "15",
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--exclude-path-regex",
        "report|/ui",
        "--exclude-path",
        "/readyz",
        "--phases",
        "examples,coverage,fuzzing",
        "--no-color",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_broker_down_still_accepts_jobs_and_readyz_says_so(env, tmp_path):
    """The job is committed before dispatch; a failed dispatch leaves it queued for the workers'
    stale-job sweep instead of failing the request."""
    e = dict(env.env, CARCERT_BROKER_URL="redis://127.0.0.1:1/0")
    with run_server(e, tmp_path / "nobroker.log") as srv:
        srv.keys.update(env.keys)
        with srv.client("alice") as c:
            t0 = time.monotonic()
            r = c.post("/jobs", json={**TINY, "seed": 4242})
            assert r.status_code == 202, r.text
            assert time.monotonic() - t0 < 5
            assert c.get(r.headers["location"]).json()["status"] == "queued"
            body = assert_problem(c.get("/readyz"), 503)
            assert body["checks"] == {"database": "ok", "broker": "unreachable"}
        engine = create_engine(env.db_url)
        with engine.connect() as conn:
            status = conn.execute(
                text("SELECT status FROM jobs WHERE id = :i"), {"i": r.json()["id"]}
            ).scalar_one()
        engine.dispose()
        assert status == "queued"
