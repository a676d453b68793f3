"""Job names, labels and the completion webhook through the real service: a uvicorn API and a
Celery worker (own Postgres database and queue) run real jobs; a real HTTP receiver on loopback
(allowed through CARCERT_WEBHOOK_ALLOWED_HOSTS) checks the signature with its own hmac."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.integration.api_harness import (
    REDIS_URL,
    assert_problem,
    create_key,
    fresh_database,
    poll_job,
    run_server,
    server_env,
)
from tests.integration.service_helpers import TINY_JOB, launch_worker, wait_for

pytestmark = pytest.mark.integration
SECRET = "webhook-test-secret"


class Receiver:
    """A loopback HTTP server that records every POST and answers with the next queued status."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.codes: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(receiver.codes.pop(0) if receiver.codes else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_job(self, job_id: str) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith(job_id)]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("webhooks")
    receiver = Receiver()
    with fresh_database() as db_url:
        env = server_env(
            db_url,
            tmp,
            CARCERT_BROKER_URL=REDIS_URL,
            CARCERT_QUEUE=f"webhooks-{uuid.uuid4().hex[:8]}",
            CARCERT_WEBHOOK_SECRET=SECRET,
            CARCERT_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
            CARCERT_WEBHOOK_BACKOFF_S="0.2",
            CARCERT_WEBHOOK_MAX_ATTEMPTS="3",
            CARCERT_PUBLIC_URL="https://carcert.example",
            CARCERT_SWEEP_INTERVAL_S="1",
            CARCERT_METRICS_TOKEN="hooks-metrics",
            CARCERT_PROGRESS_INTERVAL_S="0.2",
        )
        worker = launch_worker(env, tmp / "worker.log", f"webhooks-{uuid.uuid4().hex[:6]}")
        try:
            keys = {t: create_key(db_url, t) for t in ("alice", "bob")}
            with run_server(env, tmp / "api.log", keys=keys) as srv:
                srv.receiver, srv.worker = receiver, worker
                yield srv
        finally:
            worker.stop()
            receiver.server.shutdown()


def _verified_event(request: dict) -> dict:
    expected = "sha256=" + hmac.new(SECRET.encode(), request["body"], hashlib.sha256).hexdigest()
    assert request["headers"]["X-Carcert-Signature"] == expected
    return json.loads(request["body"])


def test_succeeded_job_event_signed_and_retried(service):
    service.receiver.codes[:] = [500]  # the first attempt fails, the retry succeeds
    with service.client("alice") as alice:
        spec = {**TINY_JOB, "name": "nightly", "labels": {"team": "vision"}}
        r = alice.post("/jobs", json={**spec, "webhook": {"url": service.receiver.url + "/hook/done"}})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.json()["name"] == "nightly" and r.json()["labels"] == {"team": "vision"}
        assert r.json()["webhook"]["state"] == "pending"
        job = poll_job(alice, job_id, timeout=180, log=service.worker.log)
        assert job["status"] == "succeeded", job

        def delivered():
            j = alice.get(f"/jobs/{job_id}").json()
            return j if j["webhook"]["state"] in ("delivered", "failed") else None

        job = wait_for(delivered, 30, what="webhook delivery")
        note = f"job {job_id}: webhook delivered after 2 attempt(s)"  # also in the job's own log
        wait_for(lambda: alice.get(f"/jobs/{job_id}/logs").json()["lines"][-1]["message"] == note, 10)
    assert job["webhook"]["state"] == "delivered", job["webhook"]
    assert job["webhook"]["attempts"] == 2 and job["webhook"]["status_code"] == 204
    assert job["webhook"]["delivered_at"] and job["webhook"]["error"] is None
    sent = [r for r in service.receiver.requests if r["path"] == "/hook/done"]
    assert len(sent) == 2 and sent[0]["body"] == sent[1]["body"]  # the same signed bytes, resent
    event = _verified_event(sent[1])
    assert sent[1]["headers"]["X-Carcert-Event"] == "job.succeeded"
    assert sent[1]["headers"]["Host"] == service.receiver.url.removeprefix("http://")
    assert event["id"] == job_id and event["status"] == "succeeded" and event["event"] == "job.succeeded"
    assert event["name"] == "nightly" and event["labels"] == {"team": "vision"}
    assert event["summary"] == job["summary"]
    assert event["links"]["certificate"] == f"https://carcert.example/jobs/{job_id}/certificate"


def test_cancelled_job_event_and_tampered_body_fails_the_check(service):
    with service.client("alice") as alice:
        spec = {**TINY_JOB, "webhook": {"url": service.receiver.url + "/hook/cancel"}}
        job_id = alice.post("/jobs", json=spec).json()["id"]
        alice.post(f"/jobs/{job_id}/cancel")
        job = poll_job(alice, job_id, timeout=120, done=("cancelled", "succeeded"))
        wait_for(
            lambda: [r for r in service.receiver.requests if r["path"] == "/hook/cancel"], 30, what="event"
        )
    request = next(r for r in service.receiver.requests if r["path"] == "/hook/cancel")
    event = _verified_event(request)
    assert event["id"] == job_id and event["status"] == job["status"] and "certificate" not in event["links"]
    tampered = {**request, "body": request["body"].replace(b'"status"', b'"Status"')}
    with pytest.raises(AssertionError):
        _verified_event(tampered)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2/h",
        "http://10.0.0.1/h",
        "http://[::1]/h",
        "http://169.254.169.254/h",
        "http://localhost/h",
    ],
)
def test_private_webhook_hosts_refused_at_submit(service, url):
    with service.client("alice") as alice:
        body = assert_problem(alice.post("/jobs", json={**TINY_JOB, "webhook": {"url": url}}), 422)
    assert body["type"].endswith("webhook-refused") and "CARCERT_WEBHOOK_ALLOWED_HOSTS" in body["detail"]


def test_label_filter_and_bad_labels(service):
    tag = uuid.uuid4().hex[:8]
    wanted = {"run": tag, "env": "prod"}
    ids = {}
    with service.client("alice") as alice, service.client("bob") as bob:
        for name, labels in [("both", wanted), ("env-only", {"run": tag, "env": "dev"}), ("none", {})]:
            r = alice.post(
                "/jobs", json={**TINY_JOB, "name": name, "labels": labels, "pruning": {"method": "vanilla"}}
            )
            assert r.status_code == 202, r.text
            ids[name] = r.json()["id"]
            alice.post(f"/jobs/{ids[name]}/cancel")
        bob_job = bob.post("/jobs", json={**TINY_JOB, "labels": wanted}).json()["id"]
        bob.post(f"/jobs/{bob_job}/cancel")

        def listed(*labels: str) -> set[str]:
            return {j["id"] for j in alice.get("/jobs", params={"label": list(labels)}).json()["items"]}

        assert listed(f"run:{tag}") == {ids["both"], ids["env-only"]}
        assert listed(f"run:{tag}", "env:prod") == {ids["both"]}  # repeated = AND
        assert listed(f"run:{tag}", "env:staging") == set()
        items = alice.get("/jobs", params={"label": f"run:{tag}", "limit": 1}).json()
        assert len(items["items"]) == 1 and items["next_cursor"]  # pagination keeps the filter
        assert items["items"][0]["name"] in ("both", "env-only")
        for bad in ("no-colon", ":v", "a b:c"):
            assert_problem(alice.get("/jobs", params={"label": bad}), 422)
        bad_spec = {**TINY_JOB, "labels": {"bad:key": "v"}}
        body = assert_problem(alice.post("/jobs", json=bad_spec), 422)
        assert "labels" in json.dumps(body["errors"])


def test_metrics_count_the_live_worker(service):
    """The worker's sweep records a heartbeat; /metrics counts the one worker node alive."""
    import httpx

    def workers() -> str | None:
        body = httpx.get(service.url + "/metrics", headers={"Authorization": "Bearer hooks-metrics"}).text
        return next((line for line in body.splitlines() if line.startswith("carcert_workers ")), None)

    assert wait_for(workers, 10, what="carcert_workers") == "carcert_workers 1.0"
