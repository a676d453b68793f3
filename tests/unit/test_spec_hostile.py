"""Hostile JobSpec input refused by validation itself (so the API answers 422 naming the field):
NUL and other control characters in every path reference, and non-finite numbers (NaN / Infinity
literals, 1e999 which JSON parsers turn into inf) in every float field of the spec."""

from __future__ import annotations

import json
import types
import typing

import pytest
from pydantic import BaseModel, ValidationError

from core.spec import JobSpec

PATH_FIELDS = ["dataset", "model.weights", "mask", "transform.encoder", "transform.decoder"]
NON_FINITE = ["Infinity", "-Infinity", "NaN", "1e999", "-1e999"]


def _is_float(annotation) -> bool:
    if annotation is float:
        return True
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and float in args


def float_fields(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[str]:
    """Dotted names of every float field, found by walking the models (not a hand-kept list)."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += float_fields(ann, f"{prefix}{name}.")
        elif _is_float(ann):
            out.append(prefix + name)
    return out


def body_with(field: str, literal: str) -> str:
    """A JobSpec JSON body with `field` (dotted) set to the raw JSON text `literal`."""
    parts = field.split(".")
    doc: dict = {}
    node = doc
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = "__X__"
    return json.dumps(doc).replace('"__X__"', literal)


def locs(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


def test_the_walk_finds_the_float_fields():
    found = float_fields()
    assert {"certification.t_max", "pruning.car.eta", "pruning.car.lambda_ratio", "pruning.lr"} <= set(found)
    assert len(found) >= 17


@pytest.mark.parametrize("literal", NON_FINITE)
def test_every_float_field_refuses_non_finite_numbers(literal):
    for field in float_fields():
        body = body_with(field, literal)
        # both parsers the API uses: json.loads (FastAPI's body, which reads 1e999 as inf) and
        # pydantic's own strict JSON mode
        for parse in (
            lambda b: JobSpec.model_validate(json.loads(b)),
            lambda b: JobSpec.model_validate_json(b),
        ):
            with pytest.raises(ValidationError) as err:
                parse(body)
            assert field in locs(err.value), (field, literal, err.value.errors())


@pytest.mark.parametrize("literal", NON_FINITE)
def test_sweep_ratios_refuse_non_finite_numbers(literal):
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(json.loads(f'{{"sweep_prune_ratios": [0.5, {literal}]}}'))
    assert "sweep_prune_ratios.1" in locs(err.value)


def test_large_finite_numbers_still_validate_where_in_range():
    spec = JobSpec.model_validate(json.loads(body_with("pruning.car.eta", "1e300")))
    assert spec.pruning.car.eta == 1e300


@pytest.mark.parametrize("field", PATH_FIELDS)
@pytest.mark.parametrize("bad", ["npz:\u0000", "a\u0000b", "artifact:\u0000", "x\nartifact:1", "\u001f"])
def test_path_references_refuse_nul_and_control_characters(field, bad):
    body = body_with(field, json.dumps(bad))
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(json.loads(body))
    assert field in locs(err.value)
    assert "control characters" in str(err.value)


@pytest.mark.parametrize("field", PATH_FIELDS)
def test_ordinary_path_references_still_validate(field):
    spec = JobSpec.model_validate(json.loads(body_with(field, json.dumps("npz:/data/ünïcode x.npz"))))
    node = spec
    for p in field.split("."):
        node = getattr(node, p)
    assert node == "npz:/data/ünïcode x.npz"
