"""The JobSpec documents itself: every field of every model in its JSON schema has a description,
the schema's example is a valid spec, and epsilon / strength say which is a probability and which a
perturbation size."""

from __future__ import annotations

from core.spec import JobSpec


def _undocumented(schema: dict) -> list[str]:
    models = {"JobSpec": schema, **schema.get("$defs", {})}
    return [
        f"{m}.{f}"
        for m, s in models.items()
        for f, p in s.get("properties", {}).items()
        if not p.get("description")
    ]


def test_every_field_has_a_description_and_the_example_validates():
    schema = JobSpec.model_json_schema()
    assert _undocumented(schema) == []
    (example,) = schema["examples"]
    spec = JobSpec.model_validate(example)
    assert spec.labels == {"team": "vision"} and spec.pruning.method == "car"


def test_epsilon_and_strength_are_told_apart():
    defs = JobSpec.model_json_schema()["$defs"]
    epsilon = defs["CertifySpec"]["properties"]["epsilon"]["description"]
    strength = defs["TransformSpec"]["properties"]["strength"]["description"]
    assert "probability" in epsilon and "strength" in epsilon
    assert "size of the perturbation" in strength and "epsilon" in strength
