"""Fuzz every operation of the OpenAPI document with schemathesis (fixed seed, bounded number of
cases per operation, valid API key) against a real uvicorn + Postgres server whose broker is a
throwaway redis-server: every request and response is recorded (HAR) and counted; not a single
5xx is allowed. (test_api_http.py runs the conformance checks; this one counts and bounds.)"""

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


def test_fuzzed_requests_never_get_a_5xx(tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None or shutil.which("redis-server") is None:
        (pytest.fail if REQUIRE else pytest.skip)("schemathesis or redis-server not installed")
    broker = ThrowawayRedis(free_port())
    try:
        with fresh_database() as db_url:
            key = create_key(db_url, "fuzzer")
            env = server_env(
                db_url, tmp_path, CARCERT_BROKER_URL=broker.url, CARCERT_MAX_UPLOAD_BYTES="65536"
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
