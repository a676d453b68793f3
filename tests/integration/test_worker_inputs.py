"""worker.inputs: artifact references become local files; dataset archives are extracted safely
(no traversal, no links, size and count limits counted on the real bytes)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import DatasetError, InvalidInput
from core.spec import JobSpec
from store.artifacts import get_artifact_store, store_artifact
from store.settings import Settings
from worker.inputs import InputResolver, image_root, safe_extract

LIMITS = {"max_bytes": 1 << 20, "max_files": 100}


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(add) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        add(tf)
    return buf.getvalue()


def tar_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_zip_of_class_folders_extracts_to_identical_files(tmp_path):
    entries = {f"mydata/{c}/{i}.png": png_bytes(10 * i + c) for c in range(3) for i in range(4)}
    arc = tmp_path / "d.zip"
    arc.write_bytes(make_zip(entries))
    dest = safe_extract(arc, tmp_path / "out", **LIMITS)
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == entries
    assert image_root(dest) == dest / "mydata"  # the wrapping folder is skipped


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt", "C:/evil.txt"])
def test_zip_traversal_is_refused(tmp_path, name):
    arc = tmp_path / "d.zip"
    arc.write_bytes(make_zip({"ok/a.png": b"1", name: b"pwned"}))
    with pytest.raises(DatasetError, match="unsafe|escapes"):
        safe_extract(arc, tmp_path / "out", **LIMITS)
    assert not (tmp_path / "evil.txt").exists() and not Path("/abs/evil.txt").exists()


def test_tar_links_and_traversal_are_refused(tmp_path):
    def symlink(tf):
        info = tarfile.TarInfo("cls/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)

    def hardlink(tf):
        tar_file(tf, "cls/a.png", b"x")
        info = tarfile.TarInfo("cls/b.png")
        info.type, info.linkname = tarfile.LNKTYPE, "cls/a.png"
        tf.addfile(info)

    def traversal(tf):
        tar_file(tf, "../../escape.png", b"x")

    for i, add in enumerate((symlink, hardlink, traversal)):
        arc = tmp_path / f"d{i}.tar.gz"
        arc.write_bytes(make_tar(add))
        with pytest.raises(DatasetError):
            safe_extract(arc, tmp_path / f"out{i}", **LIMITS)
    assert not (tmp_path.parent / "escape.png").exists()


def test_decompressed_size_and_file_count_limits(tmp_path):
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(make_zip({"c/zeros.bin": b"\0" * (3 << 20)}))  # 3 MiB of zeros, a few KiB zipped
    assert bomb.stat().st_size < 100_000
    with pytest.raises(DatasetError, match="more than"):
        safe_extract(bomb, tmp_path / "o1", max_bytes=1 << 20, max_files=100)
    many = tmp_path / "many.tar.gz"
    many.write_bytes(make_tar(lambda tf: [tar_file(tf, f"c/{i}.png", b"x") for i in range(20)]))
    with pytest.raises(DatasetError, match="more than 10 files"):
        safe_extract(many, tmp_path / "o2", max_bytes=1 << 20, max_files=10)


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not an archive at all")
    with pytest.raises(DatasetError, match="neither a zip nor a tar"):
        safe_extract(junk, tmp_path / "o", **LIMITS)


def test_resolver_maps_artifacts_to_local_files(db, tenant, service_dirs, tmp_path):
    settings = Settings(artifact_root=service_dirs["artifacts"], data_roots=[service_dirs["data"]])
    store = get_artifact_store()
    weights = b"safetensors-bytes"
    w = store_artifact(db, tenant, "weights", "net.safetensors", io.BytesIO(weights), store=store)
    npz_buf = io.BytesIO()
    np.savez(
        npz_buf,
        x_train=np.zeros((2, 1, 4, 4)),
        y_train=np.zeros(2),
        x_test=np.zeros((1, 1, 4, 4)),
        y_test=np.zeros(1),
    )
    d = store_artifact(db, tenant, "dataset", "data.npz", io.BytesIO(npz_buf.getvalue()), store=store)
    z = store_artifact(
        db,
        tenant,
        "dataset",
        "imgs.zip",
        io.BytesIO(make_zip({"root/a/0.png": png_bytes(1), "root/b/0.png": png_bytes(2)})),
        store=store,
    )
    db.commit()
    r = InputResolver(db, tenant, store, tmp_path / "inputs", settings)
    spec = r.resolve(JobSpec(model={"weights": f"artifact:{w.id}"}, dataset=f"artifact:{d.id}"))
    wpath = Path(spec.model.weights)
    assert wpath.suffix == ".safetensors" and wpath.read_bytes() == weights
    assert spec.dataset.startswith("npz:")
    npz_path = Path(spec.dataset[4:])
    assert hashlib.sha256(npz_path.read_bytes()).hexdigest() == d.sha256
    folder = r.dataset(f"artifact:{z.id}")
    assert folder.startswith("imagefolder:")
    assert sorted(p.name for p in Path(folder.split(":", 1)[1]).iterdir()) == ["a", "b"]

    # another tenant's artifact, unknown ids and paths outside the data roots are refused
    other = InputResolver(db, tenant + "-x", store, tmp_path / "inputs2", settings)
    with pytest.raises(InvalidInput, match="not found"):
        other.resolve(JobSpec(dataset=f"artifact:{d.id}"))
    with pytest.raises(InvalidInput, match="outside the allowed"):
        r.resolve(JobSpec(dataset="npz:/etc/data.npz"))
    with pytest.raises(InvalidInput, match="outside the allowed"):
        r.resolve(JobSpec(model={"weights": "/etc/passwd"}))
    inside = service_dirs["data"] / "x.npz"
    assert r.resolve(JobSpec(dataset=f"npz:{inside}")).dataset == f"npz:{inside}"
