"""Fuzz every operation of the OpenAPI document with schemathesis (fixed seed, bounded number of
cases per operation, valid API key) against a real uvicorn + Postgres server whose broker is a
throwaway redis-server: every request and response is recorded (HAR) and counted; not a single
5xx is allowed. The server runs with a small tenant queue quota and work cap so the fuzzer meets
the 429 and the job-too-large 422 too, and after the fuzzer a fixed corpus of hostile requests the
generator does not make (NUL bytes in every path reference and in URLs, NaN / Infinity / 1e999,
a job over the work cap, deeply nested bodies, /metrics without its token) goes to the same
server. (test_api_http.py runs the conformance checks; this one counts and bounds.)"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.integration.api_harness import create_key, free_port, fresh_database, run_server, server_env
from tests.integration.test_reliability_broker import ThrowawayRedis

pytestmark = pytest.mark.integration
REQUIRE = os.environ.get("CARCERT_REQUIRE_SERVICES") == "1"  # CI: fail, do not skip

MAX_EXAMPLES = 12
SEED = 20261125
MAX_QUEUED = 5
MAX_WORK = 10_000_000
PATH_REFS = {
    "dataset": lambda v: {"dataset": v},
    "model.weights": lambda v: {"model": {"weights": v}},
    "mask": lambda v: {"kind": "certify", "model": {"weights": "artifact:x"}, "mask": v},
    "transform.encoder": lambda v: {"transform": {"kind": "latent", "encoder": v}},
    "transform.decoder": lambda v: {"transform": {"kind": "latent", "decoder": v}},
}
NON_FINITE_AT = [
    '{"certification": {"t_max": %s}}',
    '{"certification": {"alpha": %s}}',
    '{"pruning": {"car": {"eta": %s}}}',
    '{"pruning": {"car": {"lambda_ratio": %s}}}',
    '{"pruning": {"lr": %s}}',
    '{"transform": {"strength": %s}}',
    '{"sweep_prune_ratios": [0.5, %s]}',
]


def hostile_corpus() -> list[tuple[str, str, dict]]:
    """(method, path, httpx request kwargs) of the hand-made hostile cases (see the docstring)."""
    json_body = {"headers": {"Content-Type": "application/json"}}
    cases = []
    for make in PATH_REFS.values():
        for v in ("npz:\u0000", "\u0000", "artifact:\u0000", "npz:/tmp/a\u0000b.npz", "a\u001fb"):
            cases.append(("POST", "/jobs", {"content": json.dumps(make(v)), **json_body}))
    for template in NON_FINITE_AT:
        for lit in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999"):
            cases.append(("POST", "/jobs", {"content": template % lit, **json_body}))
    greedy = {
        "model": {"arch": "googlenet"},
        "pruning": {"pretrain_epochs": 1000, "search_epochs": 1000, "finetune_epochs": 1000},
        "certification": {"n": 1_000_000, "l": 10_000, "samples": 1_000_000},
        "sweep_methods": ["lmp", "hydra", "car", "advtrain+lmp"],
    }
    cases.append(("POST", "/jobs", {"json": greedy}))
    for seed in range(MAX_QUEUED + 1):  # valid small jobs until the tenant's queue quota answers 429
        cases.append(("POST", "/jobs", {"json": {"train_subset": 50, "seed": seed}}))
    for body in ("[" * 100_000, '{"a":' * 20_000 + "1" + "}" * 20_000):
        cases.append(("POST", "/jobs", {"content": body, **json_body}))
    for path in ("/jobs/%00", "/jobs/%00/certificate", "/jobs/a%00b/mask", "/artifacts/%00"):
        cases.append(("GET", path, {}))
    cases.append(("GET", "/jobs", {"params": {"cursor": "\u0000"}}))
    cases.append(("GET", "/metrics", {"headers": {"Authorization": "Bearer wrong"}}))
    cases.append(
        ("POST", "/artifacts", {"files": {"file": ("a\u0000.npz", b"PK")}, "data": {"kind": "dataset"}})
    )
    return cases


def send_corpus(url: str, key: str) -> collections.Counter:
    """Status of every hostile case; fails on the first 5xx (or a dropped connection)."""
    statuses: collections.Counter = collections.Counter()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        for method, path, kw in hostile_corpus():
            r = c.request(method, path, **kw)
            assert r.status_code < 500, (method, path, kw, r.status_code, r.text[:300])
            assert r.headers["content-type"].startswith(("application/problem+json", "application/json")) or (
                r.status_code < 300
            ), (path, r.headers)
            statuses[r.status_code] += 1
    return statuses


def test_fuzzed_requests_never_get_a_5xx(tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None or shutil.which("redis-server") is None:
        (pytest.fail if REQUIRE else pytest.skip)("schemathesis or redis-server not installed")
    broker = ThrowawayRedis(free_port())
    try:
        with fresh_database() as db_url:
            key = create_key(db_url, "fuzzer")
            env = server_env(
                db_url,
                tmp_path,
                CARCERT_BROKER_URL=broker.url,
                CARCERT_MAX_UPLOAD_BYTES="65536",
                CARCERT_TENANT_MAX_QUEUED=str(MAX_QUEUED),
                CARCERT_MAX_JOB_WORK=str(MAX_WORK),
                CARCERT_METRICS_TOKEN="fuzz-metrics-token",
            )
            with run_server(env, tmp_path / "server.log") as srv:
                doc = httpx.get(srv.url + "/openapi.json").json()
                har = tmp_path / "fuzz.har"
                cmd = [
                    st, "run", srv.url + "/openapi.json",
                    "-H", f"Authorization: Bearer {key}",
                    "--checks", "not_a_server_error",
                    "--max-examples", str(MAX_EXAMPLES),
                    "--seed", str(SEED),
                    "--generation-deterministic",
                    "--workers", "1",
                    "--request-timeout", "20",
                    "--phases", "examples,coverage,fuzzing",
                    "--exclude-path-regex", "report|/ui",
                    "--report", "har", "--report-har-path", str(har),
                    "--no-color",
                ]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
                hostile = send_corpus(srv.url, key)
                server_log = srv.log()
    finally:
        broker.kill()
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = collections.Counter(e["response"]["status"] for e in entries)
    server_errors = [
        (e["request"]["method"], e["request"]["url"], e["response"]["status"])
        for e in entries
        if e["response"]["status"] >= 500
    ]
    ops = {(e["request"]["method"], e["request"]["url"].split("?")[0]) for e in entries}
    summary = (
        f"{len(entries)} requests over {len(ops)} distinct URLs, statuses {dict(sorted(statuses.items()))}"
    )
    print(summary)
    print(f"hostile corpus: {sum(hostile.values())} requests, statuses {dict(sorted(hostile.items()))}")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert server_errors == [], (server_errors[:10], server_log[-3000:])
    # every operation of the document (but the excluded HTML report / dashboard) was exercised
    documented = {
        (m.upper(), p)
        for p, item in doc["paths"].items()
        for m in item
        if "report" not in p and "/ui" not in p
    }
    exercised = {
        (m, p)
        for m, p in documented
        if any(
            e["request"]["method"] == m
            and re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", p), urlsplit(e["request"]["url"]).path)
            for e in entries
        )
    }
    assert exercised == documented
    assert len(entries) >= len(documented) * 5, summary
    assert statuses[200] + statuses[201] + statuses[202] > 0 and sum(statuses[c] for c in (401, 404, 422)) > 0
    assert set(hostile) <= {202, 400, 401, 404, 422, 429} and hostile[422] >= 60, hostile
    assert hostile[429] >= 1  # the quota held (the fuzzer's own jobs count towards it)
    assert "Traceback" not in server_log, server_log[-3000:]
