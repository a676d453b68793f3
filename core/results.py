"""The result of one variant, as the pipeline hands it on: one typed record instead of field
names repeated in the pipeline's summary, the worker, the store and the report.

run_job's summary lists one VariantResult per variant (as a dict, `model_dump()`); the worker
reads it back with `model_validate` and stores it (store.jobs.add_result: the JobResult columns);
the API builds the report's input from the stored rows with `from_row`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class VariantResult(BaseModel):
    """A variant's headline numbers (all from its metrics.json): accuracy over the whole test
    split; accuracy_cert_subset (accuracy on the test samples certification ran on; metrics written
    before the rename call it certified_accuracy, still read), pca and failure_probability of its
    certificate; sparsity of the prunable weights; the sha256 of model.safetensors /
    mask.safetensors. A kind=certify job has one variant "certify" with method and prune_ratio None."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    method: str | None = None
    prune_ratio: float | None = None
    accuracy: float | None = None
    pca: float | None = None
    accuracy_cert_subset: float | None = Field(
        default=None, validation_alias=AliasChoices("accuracy_cert_subset", "certified_accuracy")
    )
    sparsity: float | None = None
    model_sha256: str | None = None
    mask_sha256: str | None = None
    failure_probability: float | None = None

    @classmethod
    def read(cls, folder: Path) -> VariantResult:
        """The result of the variant folder `folder` (its metrics.json)."""
        return cls.model_validate(json.loads((Path(folder) / "metrics.json").read_text()))

    @classmethod
    def from_row(cls, row: Any) -> VariantResult:
        """From any object with these attributes (a store JobResult row); missing ones are None."""
        return cls.model_validate({k: getattr(row, k, None) for k in cls.model_fields})

    @property
    def method_label(self) -> str:
        """The method, or for a certify job the variant name ("certify")."""
        return self.method if self.method is not None else self.name.rsplit("-", 1)[0]

    @property
    def ratio(self) -> float:
        """The prune ratio, 0.0 where none applies (certify jobs)."""
        return float(self.prune_ratio) if self.prune_ratio is not None else 0.0
