"""`onegen demo` runs the whole chain (Ray render -> shards in storage -> train -> release-layout pipeline ->
sample -> depth scored against ground truth -> MLflow), here at a tiny scale, as a user runs it: the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from onegen.tracking import git_state

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_demo_chain_runs_end_to_end_and_logs_to_mlflow(tmp_path):
    work = tmp_path / "work"
    overrides = ["run.name=tiny-demo", f"run.work_dir={work}", "train.steps=60", "demo.scenes=2",
                 "demo.scenes_per_shard=1", "demo.sample_steps=2", "demo.eval_samples=1", "ray.num_cpus=2"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "onegen", "demo", *[arg for kv in overrides for arg in ("--set", kv)]]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # shards: one per scene, each a tar of WebDataset members of that scene's view
    shards = sorted((work / "data" / "tiny-demo" / "synthetic").glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-00000.tar", "shard-00001.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert "synthetic-0-000000-v00.png" in names and "synthetic-0-000000-v00.depth.npy" in names

    # the trained model is a loadable release-layout folder
    pipeline_dir = work / "tiny-demo" / "pipeline"
    assert (pipeline_dir / "model_index.json").is_file()
    assert (pipeline_dir / "transformer" / "config.json").is_file()
    assert (work / "tiny-demo" / "demo_grid.png").is_file()

    # MLflow (sqlite under the work dir): the run has the config, lineage tags, the loss curve, the eval metrics
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["onegen"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "60"
    # lineage names the onegen checkout even though the demo ran from another folder
    assert run.data.tags["onegen.git_commit"] == git_state(REPO)[0] != "unknown"
    assert "onegen.config_hash" in run.data.tags
    metrics = run.data.metrics
    assert metrics["data/samples"] == 2
    assert metrics["train/loss_last20"] < metrics["train/loss_first20"]  # it learns, even in 60 steps
    client = mlflow.MlflowClient()
    for task in ("text2image", "depth"):  # both halves of the objective have a curve (logged every 20 steps)
        assert len(client.get_metric_history(run.info.run_id, f"train/loss_{task}")) == 3
    # what the user reads is what MLflow holds
    assert f"{metrics['eval/depth_abs_rel']:.3f} / {metrics['eval/depth_abs_rel_constant']:.3f}" in done.stdout
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/demo_grid.png" in artifacts
