"""`onegen train` as a user runs it (`python -m training.launch` joined to the session's Ray head): 2 Ray Train
workers, DeepSpeed ZeRO-2, on the shared synthetic build; checkpoints, MLflow, refusals, and exact resume after a
worker is SIGKILLed."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from train_runs import REPO, run_train, train_command, train_overrides

STEPS = 30
RUN_SETTINGS = (f"train.stages[0].steps={STEPS}", "train.checkpoint_every=10", "train.global_batch_size=4",
                "train.keep_checkpoints=10")


def loss_history(work: Path, run_id: str | None = None) -> tuple[str, dict[int, list[float]], dict]:
    """(run id, {step: [train/loss values]}, {metric key: count}) of stage1's MLflow run (`tiny/stage1`, the child of
    the job's run `tiny`) in the work dir's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    if run_id is None:
        experiment = client.get_experiment_by_name("onegen")
        runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'tiny/stage1'")
        assert len(runs) == 1, [r.info.run_id for r in runs]
        run_id = runs[0].info.run_id
    history: dict[int, list[float]] = {}
    for metric in client.get_metric_history(run_id, "train/loss"):
        history.setdefault(metric.step, []).append(metric.value)
    keys = {key: len(client.get_metric_history(run_id, key)) for key in client.get_run(run_id).data.metrics}
    return run_id, history, keys


@pytest.fixture(scope="module")
def trained(ray_head, synthetic_build, tmp_path_factory):
    """One uninterrupted 2-worker run of configs/train/tiny.yaml (30 steps), the reference of the resume test."""
    work = tmp_path_factory.mktemp("train") / "work"
    overrides = train_overrides(synthetic_build, work, *RUN_SETTINGS)
    result = run_train(ray_head, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {"work": work, "overrides": overrides, "result": result, "stage": work / "data/runs/tiny/stage1"}


def test_two_workers_train_with_zero2_and_write_checkpoints(trained, synthetic_build):
    stage = trained["stage"]
    assert f"run tiny, stage stage1: {STEPS} steps" in trained["result"].stdout
    checkpoints = sorted(p.name for p in stage.glob("checkpoint_*") if p.is_dir())
    assert checkpoints == [f"checkpoint_{s:06d}" for s in range(10, STEPS + 1, 10)]
    last = stage / f"checkpoint_{STEPS:06d}"
    ds = {p.name for p in (last / "ds").iterdir()}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= ds  # ZeRO-2: one optimizer shard per rank
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and state["stage"] == "stage1"
    assert set(state["cursor"]) == {"step", "positions"} and state["cursor"]["step"] == STEPS
    assert state["rng"]["seed"] == 0 and state["mixture"]["steps"] == STEPS
    from onegen.dataset import open_build

    build = open_build(synthetic_build["name"], storage_root=synthetic_build["root"])
    assert state["builds"] == [{"uri": build.uri, "manifest_digest": build.manifest_digest()}]


def test_the_mlflow_run_has_the_config_and_the_loss_by_step_overall_and_per_task(trained):
    from mlflow.tracking import MlflowClient

    run_id, history, keys = loss_history(trained["work"])
    assert sorted(history) == list(range(1, STEPS + 1))
    losses = [history[s][0] for s in range(1, STEPS + 1)]
    assert np.mean(losses[-8:]) < np.mean(losses[:8])  # it learns (several tasks mixed: a loose check)
    client = MlflowClient(f"sqlite:///{trained['work'] / 'mlflow.db'}")
    text2image = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss/text2image"),
                                          key=lambda m: m.step)]
    assert len(text2image) >= 6 and np.mean(text2image[-3:]) < 0.9 * np.mean(text2image[:3]), text2image
    per_task = {key for key in keys if key.startswith("train/loss/")}
    assert {"train/loss/text2image", "train/loss/depth2image"} <= per_task
    assert sum(keys[key] for key in per_task) == STEPS  # every step is one task's batch
    run = client.get_run(run_id)
    assert run.data.params["train.global_batch_size"] == "4" and run.data.params["model.preset"] == "nextdit-tiny"
    assert run.info.status == "FINISHED" and state_run_id(trained) == run_id


def state_run_id(trained) -> str:
    return json.loads((trained["stage"] / f"checkpoint_{STEPS:06d}/state.json").read_text())["mlflow_run_id"]


def test_running_a_finished_run_again_does_nothing(trained, ray_head):
    result = run_train(ray_head, *trained["overrides"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already trained" in result.stdout


def test_a_changed_config_is_refused_before_any_worker_starts(trained, ray_head):
    result = run_train(ray_head, *trained["overrides"], "train.optimizer.lr=0.5")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "checkpoints were written with another config" in result.stderr and "new run.name" in result.stderr


def test_a_required_task_the_build_cannot_feed_is_refused(ray_head, synthetic_build, tmp_path):
    result = run_train(ray_head, *train_overrides(synthetic_build, tmp_path / "work"),
                       "train.stages[0].mixture[0].task=faceid")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "stage stage1: mixture task faceid: the builds' manifests list no train rows at resolution 64" \
        in result.stderr and "optional" in result.stderr


def logged_steps(work: Path) -> int:
    """The last step whose loss is in the run's MLflow store (0 before the store or the run exist)."""
    import sqlite3

    if not (work / "mlflow.db").exists():
        return 0
    with sqlite3.connect(work / "mlflow.db") as db:
        try:
            row = db.execute("SELECT MAX(step) FROM metrics WHERE key = 'train/loss'").fetchone()
        except sqlite3.OperationalError:  # tables not created yet
            return 0
    return int(row[0] or 0)


def registered_checkpoint(stage: Path) -> str | None:
    """The newest checkpoint Ray Train's controller has registered for the stage (its snapshot file), or None."""
    try:
        snapshot = json.loads((stage / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return None
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


def train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes now alive (their titles say RayTrainWorker)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_last_checkpoint_with_the_same_losses(trained, ray_head, synthetic_build,
                                                                                tmp_path):
    """SIGKILL one Ray Train worker after the first checkpoint: Ray restarts the group from it by itself, and every
    loss logged (before and after the restart, re-logged steps included) equals the uninterrupted run's."""
    work = tmp_path / "work"
    overrides = train_overrides(synthetic_build, work, *RUN_SETTINGS)
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["gcs"])
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(train_command(*overrides), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        stage = work / "data/runs/tiny/stage1"
        deadline = time.monotonic() + 300
        # A checkpoint counts once Ray Train's controller registered every rank's report (it polls the workers every
        # 2 s): kill as soon as its snapshot names one (checkpoint 10, or 20: either is a valid resume point)
        while registered_checkpoint(stage) is None:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(0.2)
        victims = train_workers()
        assert victims, "no Ray Train worker process found"
        victims[-1].send_signal(signal.SIGKILL)
        assert proc.wait(timeout=400) == 0, (tmp_path / "train.log").read_text()[-5000:]
    output = (tmp_path / "train.log").read_text()
    assert "resumed from" in output
    _, reference, _ = loss_history(trained["work"])
    _, history, _ = loss_history(work)
    assert sorted(history) == list(range(1, STEPS + 1))
    assert any(len(values) > 1 for values in history.values()) or "resumed from" in output
    for step, values in history.items():
        np.testing.assert_allclose(values, [reference[step][0]] * len(values), rtol=1e-5, err_msg=f"step {step}")


@pytest.mark.slow
def test_running_the_command_again_after_the_driver_died_continues_the_run(trained, ray_head, synthetic_build,
                                                                            tmp_path):
    """SIGKILL the whole `onegen train` process group after checkpoint 20: the same command again continues from
    the latest checkpoint in the same MLflow run (ending FINISHED), with the uninterrupted run's losses."""
    import os

    work = tmp_path / "work"
    cmd = train_command(*train_overrides(synthetic_build, work, *RUN_SETTINGS))
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["gcs"])
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while logged_steps(work) < 22:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "continuing stage stage1 from" in again.stdout
    run_id, history, _ = loss_history(work)
    _, reference, _ = loss_history(trained["work"])
    assert sorted(history) == list(range(1, STEPS + 1))
    for step, values in history.items():
        np.testing.assert_allclose(values, [reference[step][0]] * len(values), rtol=1e-5, err_msg=f"step {step}")
    from mlflow.tracking import MlflowClient

    assert MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_run(run_id).info.status == "FINISHED"
    import torch

    from train_runs import ema_weights  # the average went on from the checkpoint's pipeline/ as if never stopped

    last = f"checkpoint_{STEPS:06d}"
    reference = ema_weights(trained["stage"] / last)
    for name, value in ema_weights(work / "data/runs/tiny/stage1" / last).items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-7, msg=name)
