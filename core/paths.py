"""The path-confinement guard, the one check that a user-given path stays inside allowed folders
(dataset / weights / mask paths of a job, server paths in an API request, archive members).
Torch-free, so the API process can use it without loading PyTorch."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def within_roots(path: str | Path, roots: Iterable[str | Path]) -> bool:
    """The path-confinement guard: True when `path`, with `~`, symlinks and '..' resolved, is one of
    `roots` or lies below one of them (each root resolved the same way)."""
    resolved = Path(path).expanduser().resolve()
    return any(resolved.is_relative_to(Path(r).expanduser().resolve()) for r in roots)
