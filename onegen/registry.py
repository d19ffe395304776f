"""Trained pipelines in MLflow's model registry (INTERFACES §3, §4): a pipeline folder (or a LoRA run's adapter folder
with its base.json: the pyfunc loads the base and applies the adapter) logged as a pyfunc (onegen/pyfunc_model.py,
with the signature and input example fixed here), registered under `tracking.registered_model` with an alias and
lineage tags; and `models:/NAME@ALIAS` / `models:/NAME/VERSION` resolved to one version and its pipeline folder, for
`--init`.

    version = log_pipeline_model(folder, name="onegen", tracking_uri=uri, tags={...})   # in an active run
    version = resolve_version(tracking_uri, "models:/onegen@candidate")                  # "3": aliases move
    folder = version_pipeline(tracking_uri, "onegen", "3")                               # downloaded once
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

REGISTRY_SCHEME = "models:/"
MODEL_ARTIFACT = "model"
PIPELINE_ARTIFACT = "pipeline"
ADAPTER_ARTIFACT = "adapter"  # a LoRA version: pytorch_lora_weights.safetensors, adapter_config.json, base.json
CANDIDATE_ALIAS = "candidate"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_\-]+))/?$")
CODE = Path(__file__).resolve().parent / "pyfunc_model.py"
MODEL_PACKAGE = Path(__file__).resolve().parents[1] / "model"
# what the pyfunc needs where it is served (pinned by the environment it is served from: constraints.txt)
PIP_REQUIREMENTS = ["mlflow", "torch", "transformers", "diffusers", "safetensors", "sentencepiece", "numpy",
                    "pandas", "pillow", "huggingface_hub", "peft"]  # peft: a LoRA version's adapter
INPUT_EXAMPLE = {"task": "text2image", "prompt": "a red cube on a wooden table", "steps": 2, "cfg": 1.0, "seed": 0,
                 "height": 64, "width": 64}


def is_model_uri(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(REGISTRY_SCHEME)


def parse_model_uri(spec: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of models:/NAME/VERSION or models:/NAME@ALIAS (ValueError for anything else)."""
    match = MODEL_URI.match(spec)
    if match is None:
        raise ValueError(f"{spec!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["version"], match["alias"]


def signature():
    """The pyfunc's request and response schema (INTERFACES §4): fixed when first registered."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("string", "task"), ColSpec("string", "prompt"),
                     ColSpec(Array("string"), "images", required=False),
                     ColSpec("string", "direction", required=False), ColSpec("long", "steps", required=False),
                     ColSpec("double", "cfg", required=False), ColSpec("long", "seed", required=False),
                     ColSpec("long", "height", required=False), ColSpec("long", "width", required=False)])
    outputs = Schema([ColSpec(Array("string"), "images"), ColSpec(Array("string"), "arrays", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_pipeline_model(pipeline: str | Path, *, name: str, tracking_uri: str, alias: str = CANDIDATE_ALIAS,
                       tags: dict[str, str] | None = None, artifact: str = PIPELINE_ARTIFACT) -> str:
    """Log the pipeline folder (artifact=ADAPTER_ARTIFACT: an adapter folder with its base.json) as the active run's
    `model` artifact (a pyfunc) and register it as a new version of `name` with `alias` and `tags`; returns the
    version. Saved, then logged as artifacts: `mlflow.pyfunc.log_model` would load the whole pipeline on this process
    to check the input example (tens of GB at 2.8B), where the registered model needs only the files."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_pipeline_model needs an active MLflow run")
    with tempfile.TemporaryDirectory(prefix="onegen-model-") as scratch, warnings.catch_warnings():
        # the request is a dict of columns checked by the signature below, not by predict's type hints
        warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")
        folder = Path(scratch) / MODEL_ARTIFACT
        mlflow.pyfunc.save_model(str(folder), python_model=str(CODE), artifacts={artifact: str(pipeline)},
                                 code_paths=[str(MODEL_PACKAGE)], signature=signature(), input_example=INPUT_EXAMPLE,
                                 pip_requirements=PIP_REQUIREMENTS)
        mlflow.log_artifacts(str(folder), MODEL_ARTIFACT)
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as err:  # registered by an earlier run (or a concurrent job)
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    version = client.create_model_version(name, source, run.info.run_id, tags=tags or {})
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def resolve_version(tracking_uri: str, spec: str) -> str:
    """The version number models:/NAME@ALIAS names now (or VERSION itself, checked to exist). ValueError naming the
    registered versions and aliases when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(spec)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        return str(found.version)
    except MlflowException:
        pass
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"{spec}: no registered model {name!r} in {tracking_uri}") from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    raise ValueError(f"{spec}: model {name!r} has no {'alias ' + alias if alias else 'version ' + str(version)} "
                     f"(versions {versions}, aliases {sorted(model.aliases)})")


def version_pipeline(tracking_uri: str, name: str, version: str, cache: str | Path | None = None) -> Path:
    """The pipeline folder of a registered version, downloaded once into `cache` (default ~/.cache/onegen/registry)
    and renamed into place whole, so concurrent workers on one node and a killed download leave no half folder."""
    import mlflow

    root = Path(cache or os.environ.get("ONEGEN_REGISTRY_CACHE", Path.home() / ".cache/onegen/registry"))
    # the version's own artifact location (a models:/ URI would be read from the process's global registry, not
    # this store's), which also keys the cache: version 1 of another store, or of a reset one, is another folder
    source = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(name, version)
    key = hashlib.sha256(f"{tracking_uri}\n{source}".encode()).hexdigest()[:16]
    target = root / name / f"{version}-{key}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=target.parent))
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(scratch),
                                                        tracking_uri=tracking_uri)
            try:
                os.rename(local, target)
            except OSError:  # another worker put it there first
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    folder = target / "artifacts" / PIPELINE_ARTIFACT
    if not folder.is_dir():
        adapter = (target / "artifacts" / ADAPTER_ARTIFACT).is_dir()
        raise FileNotFoundError(f"models:/{name}/{version}: " + (
            "a LoRA adapter, not a pipeline: start from its base (named in its tag onegen.parent_model)" if adapter
            else f"no artifacts/{PIPELINE_ARTIFACT}/ in the model (not a pipeline logged by onegen train)"))
    return folder


__all__ = ["ADAPTER_ARTIFACT", "CANDIDATE_ALIAS", "INPUT_EXAMPLE", "is_model_uri", "log_pipeline_model",
           "parse_model_uri", "resolve_version", "signature", "version_pipeline"]
