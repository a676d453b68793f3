"""The thin client against a real server: every client command of `carcert` runs in a subprocess
where torch, numpy, Celery, SQLAlchemy, FastAPI ... cannot be imported (tests/thin_client.py),
against a real uvicorn on Postgres with a real job run by the worker code; and the signed, expiring
report link that `carcert report` prints opens without an API key, while expired, altered and
foreign links are refused with 403 problem+json."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.integration.client_harness import TINY_SPEC, run_job_to_end, serve
from tests.thin_client import run_thin_cli

pytestmark = pytest.mark.integration
SECRET = "thin-client-test-link-secret"
PREPROCESS = {"resize": 8, "crop": 8, "mean": [0.5], "std": [0.25]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("thin-client")
    with serve(tmp, CARCERT_REPORT_LINK_SECRET=SECRET) as server:
        conn = {"CARCERT_URL": server.url, "CARCERT_API_KEY": server.keys["alice"]}

        def cli(*args: str) -> tuple[str, str]:
            done = run_thin_cli(list(args), tmp, env=conn)
            assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
            return done.stdout, done.stderr

        spec_file = tmp / "spec.json"
        spec_file.write_text(json.dumps(TINY_SPEC))
        out, _ = cli(
            "submit", str(spec_file), "--name", "thin", "--label", "team=thin",
            "--resize", "8", "--crop", "8", "--mean", "0.5", "--std", "0.25",
        )  # fmt: skip
        job = json.loads(out)
        run_job_to_end(server, job["id"], tmp / "runner.log")
        yield {"server": server, "cli": cli, "job": job["id"], "tmp": tmp}


def test_submitted_spec_carries_the_preprocess_flags(env):
    with env["server"].client("alice") as c:
        job = c.get(f"/jobs/{env['job']}").json()
    assert job["status"] == "succeeded", job
    assert job["spec"]["preprocess"] == PREPROCESS
    assert job["name"] == "thin" and job["labels"] == {"team": "thin"}


def test_client_commands_run_without_torch(env, tmp_path):
    cli, job = env["cli"], env["job"]
    shown = json.loads(cli("job", job)[0])
    assert shown["id"] == job and shown["status"] == "succeeded"
    assert job in cli("jobs", "--label", "team=thin")[0]
    assert job not in cli("jobs", "--label", "team=other")[0]
    cli("certificate", job, "--out", str(tmp_path / "cert.json"))
    cert = json.loads((tmp_path / "cert.json").read_text())
    with env["server"].client("alice") as c:
        assert cert == c.get(f"/jobs/{job}/certificate").json()
        model = c.get(f"/jobs/{job}/model").content
    _, err = cli("download", job, "model", "--out", str(tmp_path / "model.safetensors"))
    assert "sha256 verified" in err and (tmp_path / "model.safetensors").read_bytes() == model
    assert cli("logs", job)[0].strip()
    # a queued job (no worker serves this private broker): cancelled at once, then deleted
    queued = json.loads(cli("submit", "--dataset", "digits", "--arch", "small_cnn", "--seed", "3")[0])
    assert "cancel requested" in cli("cancel", queued["id"])[0]
    assert "deleted" in cli("delete", queued["id"])[0]


def _link(env) -> str:
    out, err = env["cli"]("report", env["job"], "--ttl", "600")
    assert "valid until" in err
    return out.strip()


def _expected_sig(tenant: str, job_id: str, expires: int) -> str:
    message = f"carcert-report-link-v1\n{tenant}\n{job_id}\n{expires}".encode()
    return hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()


def test_report_link_opens_without_a_bearer_header(env):
    url = _link(env)
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert parts.path == f"/shared/jobs/{env['job']}/report"
    expires = int(query["expires"])
    assert 0 < expires - time.time() <= 600
    assert query["sig"] == _expected_sig("alice", env["job"], expires)  # the documented HMAC
    r = httpx.get(url, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["referrer-policy"] == "no-referrer"
    assert env["job"] in r.text and '<section id="pca_epsilon">' in r.text
    with env["server"].client("alice") as c:  # the same report the key holder sees
        assert r.text == c.get(f"/jobs/{env['job']}/report").text


def _refused(url: str, kind: str) -> None:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 403, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"].endswith(f"report-link-{kind}"), r.json()


def test_expired_altered_and_foreign_links_are_refused(env):
    url, job, base = _link(env), env["job"], env["server"].url
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    sig, expires = query["sig"], int(query["expires"])
    shared = f"{base}/shared/jobs/{job}/report"
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    _refused(f"{shared}?expires={expires}&sig={flipped}", "invalid")
    _refused(f"{shared}?expires={expires + 3600}&sig={sig}", "invalid")  # a longer life, same sig
    past = int(time.time()) - 5
    _refused(f"{shared}?expires={past}&sig={_expected_sig('alice', job, past)}", "expired")
    _refused(f"{shared}?expires={expires}&sig={_expected_sig('bob', job, expires)}", "invalid")
    with env["server"].client("alice") as c:  # another job of the same tenant
        other = c.post("/jobs", json=dict(TINY_SPEC, seed=11)).json()["id"]
    _refused(f"{base}/shared/jobs/{other}/report?expires={expires}&sig={sig}", "invalid")
    _refused(f"{base}/shared/jobs/nope/report?expires={expires}&sig={sig}", "invalid")
    r = httpx.get(f"{shared}?expires=soon&sig={sig}", timeout=30)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")


def test_report_link_needs_the_key_of_the_jobs_tenant(env):
    with env["server"].client("bob") as c:
        assert c.post(f"/jobs/{env['job']}/report/link").status_code == 404
    with env["server"].client() as c:
        assert c.post(f"/jobs/{env['job']}/report/link").status_code == 401
    with env["server"].client("alice") as c:
        r = c.post(f"/jobs/{env['job']}/report/link", params={"ttl": 10**9})
        assert r.status_code == 422



def _readme_loading_lines() -> list[str]:
    """The three lines of README.md's "Deployable model" section that load the output model."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("### Deployable model") :]
    block = section[section.index("```python\n") + len("```python\n") :]
    lines = block[: block.index("```")].strip().splitlines()
    return [line.split("  #")[0].rstrip() for line in lines]


def test_readme_lines_load_the_downloaded_model(env, tmp_path, monkeypatch):
    """The README's three loading lines, run as written (cwd = the download folder) on the model of a
    real job downloaded by the thin CLI as pt2, onnx and safetensors, give the same logits."""
    import numpy as np
    import onnxruntime
    import torch

    lines = _readme_loading_lines()
    assert len(lines) == 3 and all("logits" in line for line in lines)
    for fmt in ("pt2", "onnx", "safetensors"):
        env["cli"]("download", env["job"], "model", "--format", fmt, "--out", str(tmp_path / f"model.{fmt}"))
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = []
    monkeypatch.chdir(tmp_path)
    for line in lines:
        scope = {"torch": torch, "onnxruntime": onnxruntime, "x": x}
        exec(line, scope)  # the README's own text
        outputs.append(np.asarray(torch.as_tensor(scope["logits"]).detach(), dtype=np.float64))
    assert outputs[0].shape == (5, 10)
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-4)
    np.testing.assert_allclose(outputs[2], outputs[0], atol=1e-5)


def test_uploaded_dataset_report_shows_the_workers_example_images(env, tmp_path):
    """A job on a dataset uploaded by the thin CLI, which only the worker can read: the report's
    examples are the thumbnails the worker stored, named by the certificate's labels, predictions
    and marks (certified samples first)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.round(digits.images / 16 * 255).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    y = digits.target.astype(np.int64)
    npz = tmp_path / "digits.npz"
    np.savez(npz, x_train=x[:400], y_train=y[:400], x_test=x[400:500], y_test=y[400:500])
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({k: v for k, v in TINY_SPEC.items() if k != "dataset"}))
    job = json.loads(env["cli"]("submit", str(spec_file), "--dataset-file", str(npz))[0])
    assert job["spec"]["dataset"].startswith("artifact:")
    run_job_to_end(env["server"], job["id"], tmp_path / "runner.log")
    with env["server"].client("alice") as c:
        page = c.get(f"/jobs/{job['id']}/report").text
        samples = c.get(f"/jobs/{job['id']}/certificate").json()["samples"]
        png = c.get(f"/jobs/{job['id']}/report.png", params={"figure": "examples"})
    assert "No example images" not in page and png.status_code == 200
    ordered = [s for s in samples if s["certified"]] + [s for s in samples if not s["certified"]]
    cell = r"<td>(\d+)</td>"
    rows = re.findall(rf'<tr class="example" data-certified="(\w+)">{cell}{cell}{cell}', page)
    assert rows == [
        (str(s["certified"]).lower(), str(s["index"]), str(s["label"]), str(s["pred"])) for s in ordered[:4]
    ]
    assert [int(r[2]) for r in rows] == [int(y[400 + int(r[1])]) for r in rows]  # the uploaded labels
