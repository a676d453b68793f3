"""worker.runner.public_detail: job errors shown to a tenant carry no absolute server paths."""

from __future__ import annotations

from pathlib import Path

from store.settings import Settings
from worker.runner import public_detail


def settings(tmp_path: Path) -> Settings:
    return Settings(
        work_root=tmp_path / "var" / "work",
        artifact_root=tmp_path / "var" / "artifacts",
        data_roots=[tmp_path / "data", Path("/usr/share/datasets")],
    )


def test_server_folders_become_placeholders(tmp_path):
    s = settings(tmp_path)
    job = s.work_root.resolve() / "0123abcd" / "inputs" / "enc.pt"
    text = f"FileNotFoundError: [Errno 2] No such file or directory: '{job}'"
    out = public_detail(text, s)
    assert out == "FileNotFoundError: [Errno 2] No such file or directory: '<work>/0123abcd/inputs/enc.pt'"
    blob = s.artifact_root.resolve() / "ab" / "cdef"
    assert public_detail(f"cannot read {blob}", s) == "cannot read <artifacts>/ab/cdef"
    assert public_detail("bad header in /usr/share/datasets/fm/x.npz", s) == "bad header in <data>/fm/x.npz"


def test_other_absolute_paths_keep_only_the_file_name(tmp_path):
    out = public_detail(
        "torch error at /opt/venv/lib/python3.11/site-packages/torch/serialization.py:12", settings(tmp_path)
    )
    assert out == "torch error at .../serialization.py:12"
    assert "/opt" not in out


def test_user_references_urls_and_relative_names_stay(tmp_path):
    text = "dataset 'npz:/data/x.npz' has no x_train; see https://example.org/a/b; key conv1/weight"
    assert public_detail(text, settings(tmp_path)) == text
