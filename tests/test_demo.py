"""`onegen demo` runs the whole chain (Ray render -> shards in storage -> train -> release-layout pipeline ->
sample -> depth scored against ground truth -> MLflow), here at a tiny scale, as a user runs it: the CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from onegen.tracking import git_state

REPO = Path(__file__).resolve().parent.parent
# 3 scenes in 3 one-scene shards: more Ray tasks than CPUs, so the tasks finish (and shards are written) in any order
TINY = ["run.name=tiny-demo", "train.steps=60", "demo.scenes=3", "demo.scenes_per_shard=1", "demo.sample_steps=2",
        "demo.eval_samples=1", "ray.num_cpus=2"]


def run_demo(folder: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """The tiny demo through the CLI, from `folder`, writing under folder/work; returns (process, work dir)."""
    folder.mkdir(parents=True, exist_ok=True)
    work = folder / "work"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "onegen", "demo",
           *[arg for kv in [*TINY, f"run.work_dir={work}"] for arg in ("--set", kv)]]
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, work


def mlflow_run(work: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["onegen"], output_format="list")
    assert len(runs) == 1
    return runs[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def first_demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"))


@pytest.mark.integration
def test_demo_chain_runs_end_to_end_and_logs_to_mlflow(first_demo):
    done, work = first_demo

    # shards: one per scene, each a tar of WebDataset members of that scene's view
    shards = sorted((work / "data" / "tiny-demo" / "synthetic").glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
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

    run = mlflow_run(work)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "60"
    # lineage names the onegen checkout even though the demo ran from another folder
    assert run.data.tags["onegen.git_commit"] == git_state(REPO)[0] != "unknown"
    assert "onegen.config_hash" in run.data.tags
    metrics = run.data.metrics
    assert metrics["data/samples"] == 3
    assert metrics["train/loss_last20"] < metrics["train/loss_first20"]  # it learns, even in 60 steps
    client = mlflow.MlflowClient()
    for task in ("text2image", "depth"):  # both halves of the objective have a curve (logged every 20 steps)
        assert len(client.get_metric_history(run.info.run_id, f"train/loss_{task}")) == 3
    # the model and both baselines are scored by the one protocol (model.depth.score_depth): AbsRel and δ1 each
    for suffix in ("", "_constant", "_ramp"):
        assert metrics[f"eval/depth_abs_rel{suffix}"] > 0 and 0 <= metrics[f"eval/depth_delta1{suffix}"] <= 1
    # what the user reads is what MLflow holds
    for metric in ("abs_rel", "delta1"):
        line = " / ".join(f"{metrics[f'eval/depth_{metric}{suffix}']:.3f}" for suffix in ("", "_constant", "_ramp"))
        assert line in done.stdout
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/demo_grid.png" in artifacts


@pytest.mark.integration
def test_demo_is_deterministic_run_to_run(first_demo, tmp_path):
    """Same settings, same numbers: every metric (history included), the shards, the weights and the grid."""
    import mlflow

    _, work_a = first_demo
    _, work_b = run_demo(tmp_path)
    run_a, run_b = mlflow_run(work_a), mlflow_run(work_b)
    assert run_b.data.metrics == run_a.data.metrics
    for name in ("train/loss_text2image", "train/loss_depth"):
        histories = [[m.value for m in mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
                      .get_metric_history(run.info.run_id, name)] for work, run in ((work_a, run_a), (work_b, run_b))]
        assert histories[0] == histories[1], name
    same_files = ["tiny-demo/pipeline/transformer/diffusion_pytorch_model.safetensors", "tiny-demo/demo_grid.png",
                  *(f"data/tiny-demo/synthetic/shard-{i:05d}.tar" for i in range(3))]
    assert [digest(work_b / f) for f in same_files] == [digest(work_a / f) for f in same_files]
