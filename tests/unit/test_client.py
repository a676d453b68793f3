"""carcert.client pure logic against httpx.MockTransport (the HTTP behaviour against a real server
is in tests/integration/test_client_server.py): problem+json parsing, cursor pagination, retries,
sha256-checked downloads, wait(); and the CLI's spec building / exit codes."""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
import pytest

from carcert import cli
from carcert.cli_client import build_spec_dict
from carcert.client import CarcertAPIError, CarcertClient, ChecksumMismatch
from core.errors import InvalidInput
from core.spec import JobSpec


def _client(handler, **kw) -> CarcertClient:
    return CarcertClient("http://test", "cc_key", transport=httpx.MockTransport(handler), **kw)


def test_problem_json_is_parsed_into_the_error():
    doc = {"type": "urn:carcert:problem:x", "title": "Not Found", "status": 404, "detail": "no job abc"}

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer cc_key"
        return httpx.Response(404, json=doc, headers={"content-type": "application/problem+json"})

    with _client(handler) as c, pytest.raises(CarcertAPIError) as info:
        c.get_job("abc")
    err = info.value
    assert (err.status, err.title, err.detail, err.body) == (404, "Not Found", "no job abc", doc)
    assert str(err) == "404 Not Found: no job abc"


def test_non_json_error_body_still_readable():
    with (
        _client(lambda r: httpx.Response(500, text="<html>boom</html>")) as c,
        pytest.raises(CarcertAPIError) as i,
    ):
        c.get_job("x")
    assert i.value.status == 500 and i.value.title == "Internal Server Error"
    assert i.value.detail == "<html>boom</html>"


def test_validation_errors_list_used_when_no_detail():
    body = {"title": "Invalid request", "status": 422, "errors": [{"msg": "bad ratio"}, {"msg": "bad arch"}]}
    with _client(lambda r: httpx.Response(422, json=body)) as c, pytest.raises(CarcertAPIError) as i:
        c.get_job("x")
    assert i.value.detail == "bad ratio; bad arch"


def test_list_jobs_follows_every_cursor():
    jobs = [{"id": f"j{i:03d}", "status": "queued"} for i in range(23)]
    seen_params = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        seen_params.append(params)
        limit = int(params["limit"])
        start = int(params.get("cursor", "0"))
        selected = [j for j in jobs if params.get("status") in (None, j["status"])]
        items = selected[start : start + limit]
        nxt = str(start + limit) if start + limit < len(selected) else None
        return httpx.Response(200, json={"items": items, "next_cursor": nxt})

    with _client(handler) as c:
        got = list(c.list_jobs(limit=5))
        assert got == jobs
        assert len(seen_params) == 5  # ceil(23 / 5)
        assert [p.get("cursor") for p in seen_params] == [None, "5", "10", "15", "20"]
        seen_params.clear()
        assert list(c.list_jobs(status="queued", limit=100)) == jobs
        assert seen_params == [{"limit": "100", "status": "queued"}]


def test_list_jobs_stops_on_a_repeated_cursor():
    handler = lambda r: httpx.Response(200, json={"items": [{"id": "a"}], "next_cursor": "same"})  # noqa: E731
    with _client(handler) as c, pytest.raises(CarcertAPIError, match="Pagination loop"):
        list(c.list_jobs())


def test_get_retries_503_then_succeeds_but_post_without_key_does_not():
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] < 3:
            return httpx.Response(
                503, json={"title": "Service Unavailable", "detail": "db"}, headers={"retry-after": "0"}
            )
        return httpx.Response(200, json={"id": "j", "status": "queued"})

    with _client(handler) as c:
        assert c.get_job("j")["status"] == "queued"
        assert calls["n"] == 3
        calls["n"] = 0
        with pytest.raises(CarcertAPIError) as info:
            c.submit(JobSpec())
        assert info.value.status == 503 and calls["n"] == 1
        calls["n"] = 0
        assert c.submit(JobSpec(), idempotency_key="k")["id"] == "j"
        assert calls["n"] == 3


def test_submit_sends_the_validated_spec_and_idempotency_key():
    sent = {}

    def handler(request: httpx.Request) -> httpx.Response:
        sent["body"] = json.loads(request.content)
        sent["key"] = request.headers.get("idempotency-key")
        return httpx.Response(202, json={"id": "j1", "status": "queued"})

    with _client(handler) as c:
        c.submit(
            {"dataset": "digits", "pruning": {"method": "lmp", "prune_ratio": 0.7}}, idempotency_key="abc"
        )
        assert sent["key"] == "abc"
        assert JobSpec.model_validate(sent["body"]).pruning.prune_ratio == 0.7
        assert sent["body"] == JobSpec.model_validate(sent["body"]).model_dump(mode="json")
        with pytest.raises(InvalidInput, match="pruning.prune_ratio"):
            c.submit({"pruning": {"method": "car", "prune_ratio": 1.5}})


@pytest.mark.parametrize("header", ["x-content-sha256", "repr-digest"])
def test_download_checks_the_sha256_header(tmp_path, header):
    payload = b"safetensors-bytes" * 1000
    good = hashlib.sha256(payload).hexdigest()

    def make(value_hex: str):
        value = (
            value_hex
            if header == "x-content-sha256"
            else f"sha-256=:{base64.b64encode(bytes.fromhex(value_hex)).decode()}:"
        )
        return lambda r: httpx.Response(200, content=payload, headers={header: value})

    with _client(make(good)) as c:
        path = c.download_model("j", tmp_path / "m.safetensors", variant="car-0.50")
        assert path.read_bytes() == payload
    bad = hashlib.sha256(b"other").hexdigest()
    with _client(make(bad)) as c, pytest.raises(ChecksumMismatch):
        c.download_mask("j", tmp_path / "mask.safetensors")
    assert not (tmp_path / "mask.safetensors").exists()
    assert not list(tmp_path.glob("*.part"))


def test_download_without_header_is_refused(tmp_path):
    with (
        _client(lambda r: httpx.Response(200, content=b"x")) as c,
        pytest.raises(ChecksumMismatch, match="no sha256"),
    ):
        c.download_model("j", tmp_path / "m")


def test_wait_reports_changes_until_terminal():
    states = [
        ("queued", None, 0.0),
        ("running", "pretrain", 0.1),
        ("running", "pretrain", 0.1),
        ("running", "certify", 0.8),
        ("succeeded", "done", 1.0),
    ]
    it = iter(states)

    def handler(request: httpx.Request) -> httpx.Response:
        status, stage, progress = next(it)
        return httpx.Response(200, json={"id": "j", "status": status, "stage": stage, "progress": progress})

    seen = []
    with _client(handler) as c:
        final = c.wait(
            "j", on_progress=lambda j: seen.append((j["status"], j["stage"], j["progress"])), poll=0
        )
    assert final["status"] == "succeeded"
    assert seen == [states[0], states[1], states[3], states[4]]  # the unchanged poll is not reported


def test_wait_timeout():
    handler = lambda r: httpx.Response(200, json={"id": "j", "status": "running", "progress": 0.2})  # noqa: E731
    with _client(handler) as c, pytest.raises(TimeoutError):
        c.wait("j", poll=0.01, timeout=0.05)


def _args(argv):
    return cli.build_parser().parse_args(argv)


def test_cli_flags_override_the_spec_file(tmp_path):
    f = tmp_path / "spec.json"
    f.write_text(
        json.dumps({"dataset": "fashion-mnist", "pruning": {"method": "lmp", "search_epochs": 3}, "seed": 5})
    )
    spec = build_spec_dict(
        _args(
            [
                "submit",
                str(f),
                "--method",
                "car",
                "--prune-ratio",
                "0.7",
                "--transform",
                "latent:2",
                "--samples",
                "10",
                "--prune-ratios",
                "0.3,0.5",
            ]
        )
    )
    js = JobSpec.model_validate(spec)
    assert js.dataset == "fashion-mnist" and js.seed == 5
    assert (js.pruning.method, js.pruning.prune_ratio, js.pruning.search_epochs) == ("car", 0.7, 3)
    assert (js.transform.kind, js.transform.component) == ("latent", 2)
    assert js.certification.samples == 10 and js.sweep_prune_ratios == [0.3, 0.5]
    assert build_spec_dict(_args(["submit", "--transform", "gamma"]))["transform"] == {
        "kind": "parametric",
        "name": "gamma",
    }


def test_cli_bad_spec_file_exits_2(tmp_path, capsys):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    assert cli.main(["submit", str(f), "--url", "http://127.0.0.1:9"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    f.write_text(json.dumps({"pruning": {"prune_ratio": 2}}))
    assert cli.main(["submit", str(f), "--url", "http://127.0.0.1:9"]) == 2
    assert "prune_ratio" in capsys.readouterr().err


def test_cli_unreachable_server_exits_1(capsys, monkeypatch):
    monkeypatch.setenv("CARCERT_URL", "http://127.0.0.1:9")  # discard port: connection refused
    assert cli.main(["jobs", "--timeout", "2"]) == 1
    assert "cannot reach the carcert service at http://127.0.0.1:9" in capsys.readouterr().err


def test_certificate_variant_is_picked_from_a_sweep():
    sweep = {
        "certificates": [
            {"name": "car-0.50", "certificate": {"pca": 0.9}},
            {"name": "lmp-0.50", "certificate": {"pca": 0.7}},
        ]
    }
    with _client(lambda r: httpx.Response(200, json=sweep)) as c:
        assert c.certificate("j") == sweep
        assert c.certificate("j", variant="lmp-0.50") == {"pca": 0.7}
        with pytest.raises(CarcertAPIError, match="car-0.50, lmp-0.50"):
            c.certificate("j", variant="hydra-0.50")


def test_cli_maps_server_422_to_exit_2_and_404_to_exit_1(monkeypatch, capsys):
    import carcert.cli_client as cc

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(
                422, json={"title": "Invalid input", "status": 422, "detail": "dataset outside"}
            )
        return httpx.Response(404, json={"title": "Not Found", "status": 404, "detail": "job 'x' not found"})

    real = cc.CarcertClient
    monkeypatch.setattr(
        cc, "CarcertClient", lambda *a, **k: real(*a, transport=httpx.MockTransport(handler), **k)
    )
    assert cli.main(["submit", "--dataset", "npz:/etc/x.npz", "--url", "http://t"]) == 2
    assert "422 Invalid input: dataset outside" in capsys.readouterr().err
    assert cli.main(["certificate", "x", "--url", "http://t"]) == 1
    assert "404 Not Found: job 'x' not found" in capsys.readouterr().err
