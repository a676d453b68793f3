"""imagefolder:s3://BUCKET/PREFIX against a real S3 server (moto on loopback, boto3 over HTTP).

The same class folders of PNG and JPEG files, once on local disk and once as objects under the
artifact bucket's dataset folder: the same split, labels and dataset sha256; a certify job through
core.pipeline with the service's confined object store (store.objects.service_objects) writes the
same certificate as the local job but for the dataset reference; and certification GETs exactly the
certified objects (counted in the S3 server's own request log, not by the reader)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import DatasetError
from tests.integration.s3_server import BUCKET, CREDENTIALS, moto_s3

pytestmark = pytest.mark.integration

DATASETS = "carcert/datasets/"  # the default CARCERT_S3_PREFIX + CARCERT_S3_DATASETS_PREFIX
FOLDER = DATASETS + "shapes/"


def _write_folder(root: Path) -> list[str]:
    """3 classes x 8 images (12 x 16, PNG and JPEG mixed) and a stray non-image file; the relative
    paths of all files."""
    rng = np.random.default_rng(3)
    rels = []
    for i in range(24):
        rel = f"class{i % 3}/img{i:02d}.{'png' if i % 2 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).save(root / rel)
        rels.append(rel)
    (root / "class0" / "notes.txt").write_text("not an image")
    return [*rels, "class0/notes.txt"]


@pytest.fixture(scope="module")
def s3_folder(tmp_path_factory):
    """(endpoint url, request log, local folder) with the folder uploaded under FOLDER."""
    tmp = tmp_path_factory.mktemp("s3-imagefolder")
    local = tmp / "shapes"
    rels = _write_folder(local)
    log = tmp / "moto.log"
    with moto_s3(log) as (url, client):
        for rel in rels:
            client.upload_file(str(local / rel), BUCKET, FOLDER + rel)
        yield url, log, local


@pytest.fixture
def s3_env(s3_folder, monkeypatch):
    from store.settings import get_settings

    url, _, _ = s3_folder
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CARCERT_ARTIFACT_BACKEND", "s3")
    monkeypatch.setenv("CARCERT_S3_BUCKET", BUCKET)
    monkeypatch.setenv("CARCERT_S3_ENDPOINT_URL", url)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def _gets(log: Path) -> list[tuple[str, int]]:
    """(object key, HTTP status) of the object GETs in the server's log, in order: 206 for a ranged
    read, 200 for a whole object. The server writes a request's line after it sent the response, so
    this first waits until the log has not grown for 0.3 s (else a previous step's last GETs can land
    after a count taken right after that step)."""
    size, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 0.3:
        time.sleep(0.05)
        if (now := log.stat().st_size) != size:
            size, quiet_since = now, time.monotonic()
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())  # the dev server colours some lines
    pattern = re.compile(rf'"GET /{BUCKET}/([^ ?"]+) HTTP/[0-9.]+" (\d+)')
    return [(m.group(1), int(m.group(2))) for m in pattern.finditer(text)]


def test_s3_folder_is_the_same_dataset_as_the_local_folder(s3_folder, s3_env) -> None:
    from core.data import load_dataset
    from store.objects import service_objects

    _, log, local = s3_folder
    before = len(_gets(log))
    remote = load_dataset(f"imagefolder:s3://{BUCKET}/{FOLDER}", objects=service_objects(s3_env))
    probed = _gets(log)[before:]
    disk = load_dataset(f"imagefolder:{local}")
    assert remote.sha256 == disk.sha256 and remote.classes == disk.classes == ["class0", "class1", "class2"]
    assert remote.split_seed == disk.split_seed == 0
    assert remote.test_x.files == disk.test_x.files and remote.train_x.files == disk.train_x.files
    assert torch.equal(remote.test_y, disk.test_y) and torch.equal(remote.train_y, disk.train_y)
    # loading reads image headers only (ranged GETs, one per probed image), never the stray file
    assert sorted(probed) == sorted((FOLDER + f, 206) for f in [*disk.train_x.files, *disk.test_x.files])
    # every pixel equals the local decode (a batch fetched concurrently, in order)
    idx = torch.tensor([4, 0, 3])
    assert torch.equal(remote.test_x[idx], disk.test_x[idx])
    assert torch.equal(remote.train_x[:], disk.train_x[:])


def test_certify_job_from_s3_equals_the_local_job_and_gets_only_certified_objects(
    s3_folder, s3_env, tmp_path
) -> None:
    from core.certify import certify_model
    from core.context import LocalContext
    from core.data import load_dataset
    from core.models import build_model, save_weights
    from core.pipeline import run_job
    from core.spec import JobSpec
    from core.transforms import build_transform
    from store.objects import service_objects

    _, log, local = s3_folder
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_weights(build_model("small_cnn", 3, 3), weights)
    certs = {}
    s3_ref = f"imagefolder:s3://{BUCKET}/{FOLDER}"
    for name, ref in (("disk", f"imagefolder:{local}"), ("s3", s3_ref)):
        spec = JobSpec.model_validate({
            "kind": "certify", "model": {"arch": "small_cnn", "weights": str(weights)}, "dataset": ref,
            "transform": {"kind": "parametric", "name": "brightness"},
            "certification": {"n": 20, "l": 2, "samples": 3, "t_steps": 50}, "seed": 7,
        })
        out = tmp_path / name
        run_job(spec, out, LocalContext(out), device="cpu", objects=service_objects(s3_env))
        certs[name] = json.loads(next(out.rglob("certificate.json")).read_text())
    assert certs["s3"]["dataset"].pop("ref") == s3_ref
    certs["disk"]["dataset"].pop("ref")
    for cert in certs.values():
        cert.pop("created_at"), cert.pop("job_id", None)
    assert certs["s3"] == certs["disk"] and len(certs["s3"]["samples"]) == 3

    # certification alone: one GET per certified object, nothing else
    data = load_dataset(s3_ref, objects=service_objects(s3_env))
    model = build_model("small_cnn", 3, 3)
    t = build_transform(JobSpec.model_validate({"transform": {"name": "brightness"}}).transform)
    before = len(_gets(log))
    certify_model(model, data.test_x, data.test_y, t,
                  JobSpec.model_validate({"certification": {"n": 4, "l": 1, "samples": 2}}).certification,
                  seed=0)
    # the two GETs run in parallel (core.datasets.FETCH_THREADS), so the log's order is theirs
    assert sorted(_gets(log)[before:]) == sorted((FOLDER + f, 200) for f in data.test_x.files[:2])


def test_the_service_reads_only_its_dataset_folder(s3_folder, s3_env) -> None:
    from core.data import load_dataset
    from store.objects import check_dataset_url, service_objects

    url, log, _ = s3_folder
    before = len(_gets(log))
    for ref in (f"s3://{BUCKET}/carcert/", f"s3://{BUCKET}/other/", f"s3://elsewhere/{FOLDER}",
                f"s3://{BUCKET}/{DATASETS}../x/"):
        with pytest.raises(DatasetError):
            check_dataset_url(ref, s3_env)
        with pytest.raises(DatasetError):  # the job's object store refuses it too, before any request
            load_dataset(f"imagefolder:{ref}", objects=service_objects(s3_env))
    assert _gets(log)[before:] == []
    assert check_dataset_url(f"s3://{BUCKET}/{FOLDER}", s3_env).prefix == FOLDER
    with pytest.raises(DatasetError, match="no object store"):
        load_dataset(f"imagefolder:s3://{BUCKET}/{FOLDER}")
    with pytest.raises(DatasetError, match="no objects"):
        load_dataset(f"imagefolder:s3://{BUCKET}/{DATASETS}absent/", objects=service_objects(s3_env))


def test_job_submission_and_input_resolution_apply_the_same_rule(s3_folder, s3_env, tmp_path) -> None:
    from api.checks import check_job_spec
    from api.errors import ApiProblem
    from core.spec import JobSpec
    from worker.inputs import InputResolver

    good = JobSpec(dataset=f"imagefolder:s3://{BUCKET}/{FOLDER}")
    bad = JobSpec(dataset=f"imagefolder:s3://{BUCKET}/carcert/ab/")
    check_job_spec(None, "alice", good, [], s3_env)  # no artifact is looked up: no session needed
    with pytest.raises(ApiProblem) as err:
        check_job_spec(None, "alice", bad, [], s3_env)
    assert err.value.status == 422 and "outside the dataset folder" in str(err.value.detail)
    with pytest.raises(ApiProblem) as err:  # without an S3 artifact store: 422, never a 500
        check_job_spec(None, "alice", good, [])
    assert err.value.status == 422 and "CARCERT_ARTIFACT_BACKEND=s3" in err.value.detail
    resolver = InputResolver(None, "alice", None, tmp_path / "inputs", s3_env)
    assert resolver.dataset(good.dataset) == good.dataset  # read object by object, nothing copied
    with pytest.raises(DatasetError):
        resolver.dataset(bad.dataset)
