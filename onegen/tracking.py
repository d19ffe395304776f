"""MLflow runs that carry the resolved config, the git commit and the config hash.

Default store: `sqlite:///<work_dir>/mlflow.db` with artifacts in `<work_dir>/mlartifacts` (a sqlite store would
otherwise put artifacts in ./mlruns of whatever the CWD is). Set `tracking.uri: http://host:5000` to log to an
`mlflow server`; that server then decides where artifacts go (`--artifacts-destination`).

    with start_run(cfg) as run:          # params = the config's content + runtime keys, artifact config/resolved.yaml
        mlflow.log_metric("loss", 0.1, step=1)

What a run records: params = every key that is not a machine path or address (`onegen.config.fields_by_role`);
tags = git commit/dirty, the content hash and the full config hash, and the machine keys as `onegen.machine.KEY`
(where the run wrote, not what it computed); the artifact = the whole resolved config. Everything passes through
`onegen.secrets.redact` first (configs refuse secrets already; this is the second line of defence).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from onegen.config import (CONTENT, RUNTIME, OnegenConfig, config_hash, content_hash, fields_by_role, machine_fields,
                           resolved_yaml)
from onegen.secrets import install_log_redaction, redact, redact_value

if TYPE_CHECKING:
    import mlflow

# MLflow limits (mlflow/utils/validation.py): 100 params per batch, 6000 chars per value, 250 per key.
_PARAMS_PER_BATCH = 100
_MAX_PARAM_VALUE = 6000
_MAX_KEY = 250

TAG_GIT_COMMIT = "onegen.git_commit"
TAG_GIT_DIRTY = "onegen.git_dirty"
TAG_CONFIG_HASH = "onegen.config_hash"  # the full hash: content + runtime keys
TAG_CONTENT_HASH = "onegen.content_hash"
TAG_MACHINE_PREFIX = "onegen.machine."
CONFIG_ARTIFACT = "config/resolved.yaml"

# Stores the client writes to directly (so the client picks the artifact root), as opposed to a tracking server.
_LOCAL_STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "file", "")


def tracking_uri(cfg: OnegenConfig) -> str:
    """The resolved MLflow tracking URI (config `tracking.uri`, default sqlite under the work dir)."""
    assert cfg.tracking.uri is not None  # filled by OnegenConfig's validator
    return cfg.tracking.uri


def run_location(uri: str, experiment_id: str, run_id: str) -> list[str]:
    """Where a user finds a run, as lines for a closing table: its page on a tracking server, or the store and the
    `mlflow ui` command that shows a local one."""
    if uri.startswith(("http://", "https://")):
        return [f"{redact(uri.rstrip('/'))}/#/experiments/{experiment_id}/runs/{run_id}"]
    where = f"run {run_id} (experiment {experiment_id}) in {redact(uri)}"
    if not is_local_store(uri):  # databricks and other hosted stores: their own UI
        return [where]
    return [where, f"see it with: mlflow ui --backend-store-uri {redact(uri)}   (then http://127.0.0.1:5000)"]


def dataset_input(uri: str, name: str, manifest_digest: str):
    """A build as an MLflow dataset for `mlflow.log_input`: its URI as the source, its final manifest's sha256 (the
    first 16 hex digits, MLflow's digest width) as the digest. The build logs it, and so does every run trained on
    it, so MLflow links a model to the very data it read."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a local path matches two equivalent local sources; either is right
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    return MetaDataset(source=source, name=name, digest=manifest_digest[:16])


def is_local_store(uri: str) -> bool:
    """True when the client writes artifacts itself (database or file store), False for a tracking server."""
    if uri.startswith("databricks"):
        return False
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if "://" in uri else ""
    return scheme in _LOCAL_STORE_SCHEMES


def local_store_path(uri: str) -> str | None:
    """The local file or folder an MLflow tracking URI writes to (sqlite database, file store); None for tracking
    servers (http/https, databricks) and network databases (postgresql://, mysql://, ...)."""
    scheme_folded = uri[:10].lower() + uri[10:]  # schemes are case-insensitive (RFC 3986); the path is not
    if scheme_folded.startswith("sqlite:///"):
        return uri[len("sqlite:///"):] or None  # sqlite:////abs/mlflow.db -> /abs/mlflow.db; sqlite:/// -> memory
    if uri.startswith("file:"):
        return uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):]
    if "://" in uri or uri.startswith("databricks"):
        return None
    return uri  # a plain path: MLflow's file store


def git_state(repo_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(commit, dirty) of the checkout at `repo_dir` (default: the checkout onegen itself runs from, whatever the
    CWD): dirty is "true"/"false"; ("unknown", "unknown") outside git. ONEGEN_GIT_COMMIT / ONEGEN_GIT_DIRTY win: Ray
    jobs get them from `job_runtime_env`, because the uploaded working dir has no .git."""
    if os.environ.get("ONEGEN_GIT_COMMIT"):
        return os.environ["ONEGEN_GIT_COMMIT"], os.environ.get("ONEGEN_GIT_DIRTY", "unknown")
    cwd = os.fspath(repo_dir) if repo_dir is not None else os.fspath(Path(__file__).resolve().parent.parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, "true" if status.strip() else "false"


def run_tags(cfg: OnegenConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    commit, dirty = git_state()
    tags = {TAG_GIT_COMMIT: commit, TAG_GIT_DIRTY: dirty, TAG_CONFIG_HASH: config_hash(cfg),
            TAG_CONTENT_HASH: content_hash(cfg)}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    for key, value in machine_fields(cfg).items():
        if value is not None:
            tags[(TAG_MACHINE_PREFIX + key)[:_MAX_KEY]] = _text(value)
    tags.update({key: _text(redact_value(key, value)) for key, value in (extra or {}).items()})
    return tags


def config_params(cfg: OnegenConfig) -> dict[str, str]:
    """The config's content and runtime keys as MLflow params ('train.lr' -> '0.0005'), cut to MLflow's limits."""
    return {key[:_MAX_KEY]: _text(value) for key, value in fields_by_role(cfg, {CONTENT, RUNTIME}).items()}


def _text(value: object) -> str:
    text = redact(value if isinstance(value, str) else json.dumps(value))
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def ensure_experiment(cfg: OnegenConfig) -> str:
    """Point MLflow at the configured store and return the experiment id, creating the experiment if needed
    (with its artifact root under the work dir when the store is local)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    store = local_store_path(uri)
    if uri.startswith("sqlite:///") and store:
        Path(store).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if is_local_store(uri):
        artifact_root = cfg.tracking.artifact_location
        assert artifact_root is not None
        location = artifact_root if "://" in artifact_root else Path(artifact_root).absolute().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException:
        experiment = mlflow.get_experiment_by_name(name)  # another process created it first
        if experiment is None:
            raise
        return experiment.experiment_id


def log_config(cfg: OnegenConfig) -> None:
    """Log the resolved config to the active run: params (in batches MLflow accepts) and the YAML artifact."""
    import mlflow

    items = list(config_params(cfg).items())
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        mlflow.log_params(dict(items[start:start + _PARAMS_PER_BATCH]))
    mlflow.log_text(resolved_yaml(cfg), CONFIG_ARTIFACT)


def end_status(error: BaseException | None) -> str:
    """The MLflow status a run ends with: FINISHED, KILLED when the user stopped it (Ctrl-C, or SIGTERM from `ray job
    stop`, which the CLI turns into KeyboardInterrupt), FAILED for anything else. MLflow's own context manager
    would mark a Ctrl-C FAILED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


@contextlib.contextmanager
def start_run(cfg: OnegenConfig, run_name: str | None = None, tags: dict[str, str] | None = None, *,
              nested: bool = False, run_id: str | None = None) -> Iterator["mlflow.ActiveRun"]:
    """Open an MLflow run named `run_name` (default `run.name`) tagged with git commit/dirty and config hash, with
    the resolved config logged; or, with `run_id`, continue that run (a resumed training run keeps its run: its
    config was logged when it started). The run ends as `end_status` says: FINISHED, KILLED (Ctrl-C) or FAILED."""
    import mlflow

    install_log_redaction()
    experiment_id = ensure_experiment(cfg)  # also points MLflow at the configured store
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, nested=nested)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name or cfg.run.name,
                               tags=run_tags(cfg, tags), nested=nested)
    try:
        if run_id is None:
            log_config(cfg)
        yield run
    except BaseException as err:
        mlflow.end_run(end_status(err))
        raise
    mlflow.end_run(end_status(None))


def _done(operation) -> bool:
    """Whether an MLflow RunOperations has finished (its futures are done)."""
    return all(future.done() for future in getattr(operation, "_operation_futures", ()))


class MetricsLogger:
    """Buffered per-step metrics of a run that another process opened (a training worker logging into the driver's
    run): `log(metrics, step)` buffers, a `log_batch` goes out every `every` steps, asynchronously (MLflow's own
    async logging: a write to the store never holds up a training step, and with it every rank, which waits for
    rank 0 at the next all-reduce); a write that failed raises at the next `log` that sends, at most MAX_IN_FLIGHT
    batches are outstanding, and `flush()` returns once everything logged so far is in the store. A process killed
    in between loses only the batches still in flight (a checkpoint flushes first: what it covers is logged)."""

    MAX_IN_FLIGHT = 8

    def __init__(self, tracking_uri: str, run_id: str, every: int = 1):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.every = max(1, int(every))
        self.pending: list = []
        self.operations: list = []  # MLflow's RunOperations of the batches sent and not yet waited for
        self.steps = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        self.steps += 1
        if self.steps % self.every == 0:
            self._send()

    def log_image(self, image, artifact_file: str) -> None:
        """An image (PIL or array) as an artifact of the run, e.g. samples/STAGE/step_000100/text2image.png."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def _send(self) -> None:
        # MLflow takes at most 1000 metrics per batch
        while self.pending:
            chunk, self.pending = self.pending[:1000], self.pending[1000:]
            operation = self.client.log_batch(self.run_id, metrics=chunk, synchronous=False)
            if operation is not None:
                self.operations.append(operation)
        # the oldest batches: waited for (raising a failed write now) once done, or once too many are outstanding
        while self.operations and (len(self.operations) > self.MAX_IN_FLIGHT or _done(self.operations[0])):
            self.operations.pop(0).wait()

    def flush(self) -> None:
        """Send what is buffered and wait until every batch is in the store (raises what a write raised)."""
        self._send()
        operations, self.operations = self.operations, []
        for operation in operations:
            operation.wait()
