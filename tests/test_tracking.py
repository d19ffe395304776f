"""MLflow runs carry the resolved config (params + YAML artifact), git commit and config hash; they log to a sqlite
store under the work dir by default, or to a real `mlflow server` started by the test."""

from __future__ import annotations

import os
import re
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from onegen.config import DemoConfig, OnegenConfig, config_hash, content_hash, load_config, resolved_dict
from onegen.tracking import (CONFIG_ARTIFACT, TAG_CONFIG_HASH, TAG_CONTENT_HASH, TAG_GIT_COMMIT, TAG_GIT_DIRTY,
                             TAG_MACHINE_PREFIX, config_params, git_state, is_local_store, start_run, tracking_uri)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_mlflow(monkeypatch, tmp_path):
    """No run, URI or git override leaks between tests; the CWD is a scratch folder outside any git checkout."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
                 "ONEGEN_GIT_COMMIT", "ONEGEN_GIT_DIRTY"):
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def make_config(tmp_path: Path, *overrides: str) -> OnegenConfig:
    return load_config(None, ["run.name=track-test", f"run.work_dir={tmp_path / 'work'}", *overrides], DemoConfig)


def test_default_store_is_sqlite_in_the_work_dir(tmp_path: Path):
    cfg = make_config(tmp_path)
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/work/mlflow.db"
    assert is_local_store(tracking_uri(cfg)) and not is_local_store("http://127.0.0.1:5000")


def test_run_logs_config_tags_metrics_and_artifacts_under_the_work_dir(tmp_path: Path):
    cfg = make_config(tmp_path, "train.lr=1e-4")
    with start_run(cfg, tags={"stage": "test"}) as run:
        mlflow.log_metric("loss", 0.5, step=1)
        mlflow.log_text("hello", "notes/hello.txt")
    client = MlflowClient(tracking_uri(cfg))
    logged = client.get_run(run.info.run_id)

    assert logged.info.status == "FINISHED" and logged.info.run_name == "track-test"
    assert logged.data.params["train.lr"] == "0.0001"
    assert logged.data.params["run.name"] == "track-test"
    assert logged.data.params == config_params(cfg)
    assert logged.data.metrics["loss"] == 0.5
    assert logged.data.tags[TAG_CONFIG_HASH] == config_hash(cfg)
    assert logged.data.tags[TAG_CONTENT_HASH] == content_hash(cfg)
    # machine paths are tags, not params (so params compare across machines and folders)
    assert logged.data.tags[TAG_MACHINE_PREFIX + "run.work_dir"] == str(tmp_path / "work")
    assert logged.data.tags[TAG_MACHINE_PREFIX + "storage.root"] == str(tmp_path / "work" / "data")
    assert not any(key.startswith(("run.work_dir", "storage.", "tracking.uri")) for key in logged.data.params)
    # lineage is the onegen checkout's commit, whatever the CWD (a tmp folder outside any checkout here)
    assert logged.data.tags[TAG_GIT_COMMIT] == git_state(REPO)[0] != "unknown"
    assert logged.data.tags["stage"] == "test"

    resolved = yaml.safe_load(mlflow.artifacts.load_text(f"{logged.info.artifact_uri}/{CONFIG_ARTIFACT}"))
    assert resolved == resolved_dict(cfg)
    # Artifacts land under <work_dir>/mlartifacts, not in ./mlruns of the CWD.
    artifact_dir = tmp_path / "work" / "mlartifacts"
    assert logged.info.artifact_uri.startswith(artifact_dir.as_uri())
    assert (artifact_dir / run.info.run_id / "artifacts" / "notes" / "hello.txt").read_text() == "hello"
    assert not (Path.cwd() / "mlruns").exists()
    assert (tmp_path / "work" / "mlflow.db").is_file()


def test_a_failing_block_marks_the_run_failed(tmp_path: Path):
    cfg = make_config(tmp_path)
    with pytest.raises(RuntimeError):
        with start_run(cfg) as run:
            raise RuntimeError("boom")
    assert MlflowClient(tracking_uri(cfg)).get_run(run.info.run_id).info.status == "FAILED"


def test_many_and_long_params_fit_mlflow_limits(tmp_path: Path):
    # >100 params needs several batches; a value over 6000 chars is cut, not rejected.
    many = [f"ray.runtime_env.env_vars.V{i:03d}={i}" for i in range(150)]
    cfg = make_config(tmp_path, *many, "ray.runtime_env.env_vars.LONG=" + "x" * 7000)
    with start_run(cfg) as run:
        pass
    params = MlflowClient(tracking_uri(cfg)).get_run(run.info.run_id).data.params
    assert params["ray.runtime_env.env_vars.V149"] == "149"
    assert len(params) == len(config_params(cfg)) > 150
    assert len(params["ray.runtime_env.env_vars.LONG"]) == 6000


def test_secrets_that_reach_a_run_are_redacted(tmp_path: Path, caplog):
    """Configs refuse secrets (tests/test_config.py); tags passed by code and log lines are redacted as well."""
    cfg = make_config(tmp_path)
    token = "hf_" + "a" * 34
    with start_run(cfg, tags={"HF_TOKEN": token, "source": "https://user:hunter2@example.com/data.csv"}) as run:
        import logging

        logging.getLogger("onegen.test").warning("downloading with %s from %s", token,
                                                 "s3://bucket/x?X-Amz-Signature=1 https://u:pw@host/")
    tags = MlflowClient(tracking_uri(cfg)).get_run(run.info.run_id).data.tags
    assert tags["HF_TOKEN"] == "***"
    assert tags["source"] == "https://user:***@example.com/data.csv"
    assert token not in caplog.text and "pw@" not in caplog.text and "***" in caplog.text


def test_second_run_reuses_the_experiment(tmp_path: Path):
    cfg = make_config(tmp_path, "tracking.experiment=shared")
    with start_run(cfg, run_name="a") as first:
        pass
    with start_run(cfg, run_name="b") as second:
        pass
    assert first.info.experiment_id == second.info.experiment_id
    assert first.info.run_id != second.info.run_id


def test_a_run_is_continued_by_id_in_the_configured_store_from_a_fresh_process_state(tmp_path: Path):
    """A resumed training run continues its MLflow run: start_run(run_id=) must point MLflow at the config's store
    first (a fresh driver has no tracking URI set), keep the params of the first start and log on."""
    cfg = make_config(tmp_path)
    with start_run(cfg) as first:
        mlflow.log_metric("loss", 1.0, step=1)
    mlflow.set_tracking_uri(None)  # what a new process starts with
    with start_run(cfg, run_id=first.info.run_id) as again:
        mlflow.log_metric("loss", 0.5, step=2)
    assert again.info.run_id == first.info.run_id
    client = MlflowClient(tracking_uri(cfg))
    run = client.get_run(first.info.run_id)
    assert run.info.status == "FINISHED" and run.data.params["run.name"] == "track-test"
    assert [(m.step, m.value) for m in client.get_metric_history(first.info.run_id, "loss")] == [(1, 1.0), (2, 0.5)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_git_state_of_the_repo_and_the_job_override(tmp_path: Path, monkeypatch):
    commit, dirty = git_state(REPO)
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and dirty in ("true", "false")
    assert git_state(tmp_path) == ("unknown", "unknown")
    monkeypatch.setenv("ONEGEN_GIT_COMMIT", "abc123")
    monkeypatch.setenv("ONEGEN_GIT_DIRTY", "false")
    assert git_state(tmp_path) == ("abc123", "false")
    cfg = make_config(tmp_path)
    with start_run(cfg) as run:
        pass
    tags = MlflowClient(tracking_uri(cfg)).get_run(run.info.run_id).data.tags
    assert tags[TAG_GIT_COMMIT] == "abc123" and tags[TAG_GIT_DIRTY] == "false"


@pytest.mark.integration
def test_run_logged_to_a_real_mlflow_server(tmp_path: Path, mlflow_server):
    cfg = make_config(tmp_path, f"tracking.uri={mlflow_server['uri']}", "tracking.experiment=server-test")
    with start_run(cfg) as run:
        mlflow.log_metric("loss", 0.25, step=3)
        mlflow.log_text("served", "notes/served.txt")
    client = MlflowClient(mlflow_server["uri"])
    logged = client.get_run(run.info.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["train.lr"] == "0.0005"
    assert logged.data.metrics["loss"] == 0.25
    assert logged.data.tags[TAG_CONFIG_HASH] == config_hash(cfg)
    assert yaml.safe_load(mlflow.artifacts.load_text(f"{logged.info.artifact_uri}/{CONFIG_ARTIFACT}")) \
        == resolved_dict(cfg)
    # The server stored the artifacts (proxied upload), nothing went to the client's work dir.
    served = list(mlflow_server["artifacts"].rglob("served.txt"))
    assert len(served) == 1 and served[0].read_text() == "served"
    assert not (tmp_path / "work" / "mlartifacts").exists()
    assert not (tmp_path / "work" / "mlflow.db").exists()
    assert os.path.exists(tmp_path) and not (Path.cwd() / "mlruns").exists()


def test_metrics_logger_writes_every_step_in_order_in_the_background_and_raises_a_failed_write(tmp_path: Path):
    """The trainer's per-step metrics go out asynchronously (a write never holds a training step up), yet all of
    them are in the store, in step order, once flush() returns; a write that fails is raised, not swallowed."""
    from onegen.tracking import MetricsLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("metrics")).info.run_id
    logger = MetricsLogger(uri, run_id, every=1)
    steps = 3 * MetricsLogger.MAX_IN_FLIGHT
    for step in range(1, steps + 1):
        logger.log({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
        assert len(logger.operations) <= MetricsLogger.MAX_IN_FLIGHT
    logger.flush()
    assert not logger.operations and not logger.pending
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, steps + 1))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1.0 / s for s in range(1, steps + 1)]

    gone = MetricsLogger(uri, "0" * 32, every=1)  # no such run: the store refuses the write
    gone.log({"train/loss": 1.0}, 1)
    with pytest.raises(mlflow.exceptions.MlflowException):
        gone.flush()
