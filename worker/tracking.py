"""MLflow tracking of finished jobs (worker side; core knows nothing of it).

With CARCERT_MLFLOW_TRACKING_URI set (any MLflow tracking URI: http(s)://server, sqlite:///file.db,
databricks, or file:/dir with MLFLOW_ALLOW_FILE_STORE=true), `track_job` logs one MLflow run per
variant of a succeeded job into the experiment CARCERT_MLFLOW_EXPERIMENT (default "carcert"):
- run name "<job id>-<variant>";
- params: the job spec as submitted, flattened to dotted keys ("pruning.method", lists and dicts as
  JSON), with the variant's own pruning.method / pruning.prune_ratio;
- metrics: accuracy (whole test split), pca, sparsity, accuracy_cert_subset (accuracy on the test
  samples certification ran on, the certificate's "accuracy"), failure_probability, nonzero,
  seconds, whichever the variant has;
- tags: carcert.job_id, carcert.variant, carcert.tenant, carcert.method, carcert.prune_ratio,
  carcert.arch, carcert.dataset, carcert.model_sha256, carcert.certificate_sha256
  (core.deploy.certificate_sha256 of the certificate the API serves);
- artifacts: certificate.json (as the API serves it), model.safetensors, mask.safetensors and, for
  a model.program job, model.pt2.
A variant that already has a FINISHED run with the same job id and variant (a retried job) is not
logged again. It returns what goes into the job's summary under "mlflow": {"experiment_id",
"runs": {variant: run_id}} or, when logging failed, {"error": reason}: a tracking failure never
fails the job; it is logged (warning) and recorded there. MLflow's HTTP retries are bounded
(MLFLOW_HTTP_REQUEST_MAX_RETRIES 2, MLFLOW_HTTP_REQUEST_TIMEOUT 20 s, unless set) so an unreachable
server delays the job by seconds, not minutes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.deploy import certificate_sha256
from core.results import VariantResult
from core.spec import JobSpec

log = logging.getLogger("carcert.worker")
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch
FILES = ("model.safetensors", "mask.safetensors", "model.pt2")


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1, "c": [1, 2]}} -> {"a.b": "1", "a.c": "[1, 2]"}; values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:MAX_PARAM_LEN]
    return out


def variant_params(spec: JobSpec, result: VariantResult) -> dict[str, str]:
    """The flattened spec with the variant's own method and prune ratio."""
    params = flatten(spec.model_dump(mode="json"))
    if result.method is not None:
        params["pruning.method"] = result.method
        params["pruning.prune_ratio"] = json.dumps(result.prune_ratio)
    return params


def variant_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a variant's metrics.json logged as MLflow metrics (module docstring)."""
    names = {
        "accuracy": "accuracy",
        "pca": "pca",
        "sparsity": "sparsity",
        "accuracy_cert_subset": "accuracy_cert_subset",
        "certified_accuracy": "accuracy_cert_subset",  # metrics.json written before the rename
        "failure_probability": "failure_probability",
        "nonzero": "nonzero",
        "seconds": "seconds",
    }
    return {
        mlflow_name: float(metrics[key])
        for key, mlflow_name in names.items()
        if isinstance(metrics.get(key), int | float) and not isinstance(metrics.get(key), bool)
    }


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created by another worker meanwhile
        return client.get_experiment_by_name(name).experiment_id


def _finished_run(client: Any, experiment_id: str, job_id: str, variant: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`carcert.job_id` = '{job_id}' and tags.`carcert.variant` = '{variant}' "
        "and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _log_variant(client: Any, experiment_id: str, job: dict[str, Any], folder: Path, cert: Any) -> str:
    """One run for the variant in `folder` (module docstring); its run id."""
    from mlflow.entities import Metric, Param
    from mlflow.utils.time import get_current_time_millis

    result = VariantResult.read(folder)
    done = _finished_run(client, experiment_id, job["id"], result.name)
    if done is not None:
        return done
    metrics = json.loads((folder / "metrics.json").read_text())
    tags = {
        "carcert.job_id": job["id"],
        "carcert.variant": result.name,
        "carcert.tenant": job["tenant"],
        "carcert.method": str(result.method_label),
        "carcert.prune_ratio": json.dumps(result.prune_ratio),
        "carcert.arch": str(metrics.get("arch", "")),
        "carcert.dataset": job["spec"].dataset,
        "carcert.model_sha256": str(result.model_sha256 or ""),
    }
    if cert is not None:
        tags["carcert.certificate_sha256"] = certificate_sha256(cert)
    run = client.create_run(experiment_id, run_name=f"{job['id']}-{result.name}", tags=tags)
    run_id = run.info.run_id
    try:
        now = get_current_time_millis()
        params = [Param(k, v) for k, v in variant_params(job["spec"], result).items()]
        for i in range(0, len(params), BATCH):
            client.log_batch(run_id, params=params[i : i + BATCH])
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in variant_metrics(metrics).items()])
        with tempfile.TemporaryDirectory() as tmp:
            if cert is not None:
                (Path(tmp) / "certificate.json").write_text(json.dumps(cert, indent=1, sort_keys=True))
                client.log_artifact(run_id, str(Path(tmp) / "certificate.json"))
        for name in FILES:
            if (folder / name).is_file():
                client.log_artifact(run_id, str(folder / name))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def track_job(
    job_id: str,
    tenant: str,
    spec: JobSpec,
    out_dir: Path,
    summary: dict[str, Any],
    certificate_of: Callable[[str], dict[str, Any] | None],
    tracking_uri: str,
    experiment: str = "carcert",
) -> dict[str, Any]:
    """Log every variant of the finished job in `out_dir` (module docstring); `certificate_of(variant)`
    is the variant's certificate as the API serves it. Never raises (but for BaseException such as
    KeyboardInterrupt): returns {"experiment_id", "runs"} or {"error", "runs"}."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    runs: dict[str, str] = {}
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = _experiment_id(client, experiment)
        job = {"id": job_id, "tenant": tenant, "spec": spec}
        for entry in summary.get("variants") or []:
            name = VariantResult.model_validate(entry).name
            runs[name] = _log_variant(client, experiment_id, job, out_dir / name, certificate_of(name))
    except Exception as exc:  # noqa: BLE001 - tracking must not fail the job: recorded instead
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
        log.warning("job %s: MLflow logging failed: %s", job_id, reason)
        return {"error": f"{type(exc).__name__}: {reason}", "runs": runs}
    log.info("job %s: logged %d MLflow run(s) in experiment %s", job_id, len(runs), experiment_id)
    return {"experiment_id": experiment_id, "runs": runs}
