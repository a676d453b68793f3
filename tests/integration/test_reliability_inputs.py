"""Bad input through the whole service (uvicorn + the real Celery worker, Postgres, Redis):

- boundary values of every bounded parameter are 422 problem+json and create no job;
- NaN / inf weights are refused at upload (422, naming the tensor; nothing stored);
- weights of the wrong class count or architecture are accepted at upload and submit (the API
  knows neither the dataset's class count nor the model until the worker loads them) and the job
  fails with title "Invalid input" and a detail that lists the mismatched / missing / unexpected
  keys with their shapes; no result and no model artifact is written;
- training that diverges (NaN loss) fails the job with "Training diverged" and writes no model.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text

from tests.integration.api_harness import ROOT, assert_problem, create_key, poll_job, run_server

pytestmark = pytest.mark.integration

BASE = {
    "model": {"arch": "small_cnn"},
    "dataset": "digits",
    "pruning": {
        "method": "lmp",
        "prune_ratio": 0.5,
        "pretrain_epochs": 0,
        "search_epochs": 0,
        "finetune_epochs": 1,
        "batch_size": 32,
        "augment_q": 0,
    },
    "certification": {"samples": 2, "n": 10, "l": 2, "t_steps": 20},
    "train_subset": 200,
}


@pytest.fixture(scope="module")
def api(settings_env, celery_worker_proc, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARCERT_")}
    env.update(settings_env, PYTHONPATH=str(ROOT))
    with run_server(env, tmp_path_factory.mktemp("api") / "server.log") as srv:
        srv.tenant = f"reliab-{uuid.uuid4().hex[:8]}"
        srv.keys = {srv.tenant: create_key(settings_env["CARCERT_DATABASE_URL"], srv.tenant)}
        srv.db_url = settings_env["CARCERT_DATABASE_URL"]
        srv.worker = celery_worker_proc
        yield srv
    with create_engine(srv.db_url).begin() as c:  # nothing left for the shared worker
        c.execute(
            text("UPDATE jobs SET status='cancelled' WHERE tenant=:t AND status IN ('queued','running')"),
            {"t": srv.tenant},
        )


@pytest.fixture(scope="module")
def client(api):
    with api.client(api.tenant) as c:
        yield c


def scalar(db_url: str, sql: str, **params) -> int:
    engine = create_engine(db_url)
    with engine.connect() as c:
        n = c.execute(text(sql), params).scalar_one()
    engine.dispose()
    return int(n)


def upload(client, state: dict[str, torch.Tensor], tmp_path: Path, name: str = "w.safetensors"):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return client.post("/artifacts", files={"file": (name, path.read_bytes())}, data={"kind": "weights"})


def small_cnn_state(num_classes: int = 10, scale: float = 1.0) -> dict[str, torch.Tensor]:
    from core.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes, 1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if k.endswith("weight") and v.dim() > 1:
            v.mul_(scale)
    return state


def run_to_end(api, client, spec: dict, timeout: float = 180) -> dict:
    r = client.post("/jobs", json=spec)
    assert r.status_code == 202, r.text
    return poll_job(client, r.json()["id"], timeout, interval=0.3, log=lambda: api.worker.log()[-3000:])


def assert_nothing_written(api, client, job: dict) -> None:
    assert scalar(api.db_url, "SELECT count(*) FROM job_results WHERE job_id=:j", j=job["id"]) == 0
    produced = scalar(
        api.db_url,
        "SELECT count(*) FROM artifacts WHERE tenant=:t AND kind IN ('model','mask','evidence')",
        t=api.tenant,
    )
    assert produced == 0
    for path in ("/model", "/certificate"):
        assert assert_problem(client.get(f"/jobs/{job['id']}{path}"), 409)["job_status"] == "failed"


# ----------------------------------------------------------------------------- parameter bounds


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("pruning", "prune_ratio", 1.0),
        ("pruning", "prune_ratio", -0.1),
        ("pruning", "lr", 0.0),
        ("pruning", "batch_size", 0),
        ("pruning", "pretrain_epochs", -1),
        ("certification", "n", 0),
        ("certification", "l", -3),
        ("certification", "alpha", 0.0),
        ("certification", "alpha", 1.0),
        ("certification", "epsilon", 0.0),
        ("certification", "samples", 0),
        ("certification", "t_steps", 0),
        ("certification", "n", 1.5),
        ("certification", "alpha", "NaN"),
    ],
)
def test_each_bound_is_a_422_naming_the_field(api, client, section, field, value):
    before = scalar(api.db_url, "SELECT count(*) FROM jobs WHERE tenant=:t", t=api.tenant)
    body = {**BASE, section: {**BASE[section], field: value}}
    problem = assert_problem(client.post("/jobs", json=body), 422)
    assert any(e["field"] == f"{section}.{field}" for e in problem["errors"]), problem
    assert scalar(api.db_url, "SELECT count(*) FROM jobs WHERE tenant=:t", t=api.tenant) == before


def test_non_json_numbers_are_refused(api, client):
    """NaN / Infinity literals are not JSON (RFC 8259): a 4xx, never a job."""
    before = scalar(api.db_url, "SELECT count(*) FROM jobs WHERE tenant=:t", t=api.tenant)
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        raw = b'{"dataset": "digits", "certification": {"alpha": ' + literal + b"}}"
        r = client.post("/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (literal, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    assert scalar(api.db_url, "SELECT count(*) FROM jobs WHERE tenant=:t", t=api.tenant) == before


# ------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_upload(api, client, tmp_path, bad):
    state = small_cnn_state()
    state["features.3.weight"][1, 2, 0, 0] = bad
    before = scalar(api.db_url, "SELECT count(*) FROM artifacts WHERE tenant=:t", t=api.tenant)
    problem = assert_problem(upload(client, state, tmp_path), 422)
    assert "features.3.weight" in problem["detail"] and "NaN" in problem["detail"]
    assert scalar(api.db_url, "SELECT count(*) FROM artifacts WHERE tenant=:t", t=api.tenant) == before
    # the same in a torch checkpoint (weights_only)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": state}, path)
    r = client.post("/artifacts", files={"file": ("w.pt", path.read_bytes())}, data={"kind": "weights"})
    assert "features.3.weight" in assert_problem(r, 422)["detail"]
    assert scalar(api.db_url, "SELECT count(*) FROM artifacts WHERE tenant=:t", t=api.tenant) == before


def test_wrong_class_count_fails_the_job_naming_keys_and_shapes(api, client, tmp_path):
    r = upload(client, small_cnn_state(num_classes=3), tmp_path)
    assert r.status_code == 201, r.text
    job = run_to_end(api, client, {**BASE, "model": {"arch": "small_cnn", "weights": r.json()["ref"]}})
    assert job["status"] == "failed" and job["error"]["title"] == "Invalid input", job["error"]
    detail = job["error"]["detail"]
    for needle in ("classifier.weight", "(3, 256)", "(10, 256)", "classifier.bias", "(3,)", "(10,)"):
        assert needle in detail, (needle, detail)
    assert "/work" not in detail and str(api.env["CARCERT_WORK_ROOT"]) not in detail
    assert_nothing_written(api, client, job)


def test_wrong_architecture_fails_the_job_listing_missing_and_unexpected_keys(api, client, tmp_path):
    from core.models import build_model

    other = {k: v.detach().clone() for k, v in build_model("resnet18", 10, 1).state_dict().items()}
    r = upload(client, other, tmp_path)
    assert r.status_code == 201, r.text
    job = run_to_end(api, client, {**BASE, "model": {"arch": "small_cnn", "weights": r.json()["ref"]}})
    assert job["status"] == "failed" and job["error"]["title"] == "Invalid input", job["error"]
    detail = job["error"]["detail"]
    ours = build_model("small_cnn", 10, 1).state_dict()
    missing = [k for k in ours if k not in other and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in other if k not in ours]
    assert "missing keys" in detail and all(k in detail for k in missing), detail  # all shown (< 20)
    assert "unexpected keys" in detail and f"({len(unexpected)} in all)" in detail, detail
    assert sum(k in detail for k in unexpected) >= 10  # the first ones by name
    assert_nothing_written(api, client, job)


def test_diverging_training_fails_the_job_and_writes_no_model(api, client, tmp_path):
    """Weights scaled by 1e18: the loss (~1e17) and its gradients blow the fine-tuning up; the loss
    turns NaN within a few steps (checked independently in the last lines)."""
    state = small_cnn_state(scale=1e18)
    r = upload(client, state, tmp_path)
    assert r.status_code == 201, r.text
    job = run_to_end(api, client, {**BASE, "model": {"arch": "small_cnn", "weights": r.json()["ref"]}})
    assert job["status"] == "failed", job
    assert job["error"]["title"] == "Training diverged", job["error"]
    assert "nan" in job["error"]["detail"].lower() and "learning rate" in job["error"]["detail"]
    assert job["stage"] == "finetune"
    assert_nothing_written(api, client, job)

    # independent check: plain SGD (the fine-tuning learning rate, momentum 0.9) from the same
    # weights reaches a non-finite loss within a few steps
    from core.data import load_dataset
    from core.models import build_model

    data = load_dataset("digits", seed=0, train_subset=200)
    model = build_model("small_cnn", 10, 1)
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    losses = []
    for i in range(10):
        loss = torch.nn.functional.cross_entropy(
            model(data.train_x[i * 16 : i * 16 + 32]), data.train_y[i * 16 : i * 16 + 32]
        )
        losses.append(float(loss.detach()))
        if not torch.isfinite(loss):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.isfinite(torch.tensor(losses[-1])), losses


def test_a_job_error_shows_no_absolute_server_path(api, client, service_dirs):
    """A data-root folder without the IDX files: the job fails "Invalid input" and its error names
    the folder as <data>/..., not by the server's absolute path."""
    empty = service_dirs["data"] / f"no-idx-{uuid.uuid4().hex[:6]}"
    empty.mkdir()
    job = run_to_end(api, client, {**BASE, "dataset": f"fashion-mnist:{empty}"})
    assert job["status"] == "failed" and job["error"]["title"] == "Invalid input", job["error"]
    detail = job["error"]["detail"]
    assert f"<data>/{empty.name}" in detail, detail
    assert str(service_dirs["data"]) not in detail and not re.search(r"(^|[\s'\"])/\w", detail), detail
