"""Training part 2 as a cluster runs it: `ray job submit --working-dir . -- python -m training.launch ...` to the
session's `ray start --head` on 127.0.0.1, 2 Ray Train workers under DeepSpeed ZeRO-3 (every parameter partitioned)
with activation checkpointing; the EMA of the two ranks' run, the `pipeline/` of its last checkpoint generating an
image and a depth map, and the MLflow record (lr, grad norm, throughput by step, the build as the run's input)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from train_runs import REPO, check_ema_follows_the_decay, train_overrides

STEPS = 4
SETTINGS = ("train.zero_stage=3", "train.zero3_persistence_threshold=0", "train.activation_checkpointing=true",
            f"train.stages[0].steps={STEPS}", "train.checkpoint_every=1", "train.keep_checkpoints=10",
            "train.global_batch_size=4")


@pytest.fixture(scope="module")
def submitted(ray_head, synthetic_build, tmp_path_factory):
    from conftest import VENV_BIN

    work = tmp_path_factory.mktemp("submit") / "work"  # absolute, outside the job's temporary working dir
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".", "--",
           "python", "-m", "training.launch", "--config", "configs/train/tiny.yaml"]
    for item in train_overrides(synthetic_build, work, *SETTINGS):
        cmd += ["--set", item]
    result = subprocess.run(cmd, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=420)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-5000:]
    return {"work": work, "output": output, "stage": work / "data/runs/tiny/stage1"}


def checkpoints(submitted) -> list:
    return sorted(p for p in submitted["stage"].glob("checkpoint_*") if p.is_dir())


def test_the_submitted_job_trains_under_zero3_on_two_ranks(submitted):
    assert f"run tiny, stage stage1: {STEPS} steps" in submitted["output"]
    assert [p.name for p in checkpoints(submitted)] == [f"checkpoint_{s:06d}" for s in range(1, STEPS + 1)]
    last = checkpoints(submitted)[-1]
    ds = {p.name for p in (last / "ds").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= ds
    state = json.loads((last / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == STEPS


def test_the_ema_of_the_partitioned_run_follows_its_decay(submitted):
    check_ema_follows_the_decay(checkpoints(submitted))


def test_the_last_pipeline_folder_generates_an_image_and_a_depth_map(submitted):
    from model.pipeline import OneDiffusionPipeline

    pipe = OneDiffusionPipeline.from_pretrained(checkpoints(submitted)[-1] / "pipeline")
    image = pipe("text2image", "a red cube on a table", height=64, width=64, num_inference_steps=3, seed=0,
                 output_type="np", progress=False).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0
    photo = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    depth = pipe("depth2image", images=[photo], direction="estimate", height=64, width=64, num_inference_steps=3,
                 seed=0, output_type="np", progress=False).depth[0]
    assert depth.shape == (64, 64) and np.isfinite(depth).all()


def test_mlflow_has_lr_grad_norm_and_throughput_by_step_and_the_build_as_input(submitted, synthetic_build):
    from mlflow.tracking import MlflowClient

    from onegen.dataset import open_build

    client = MlflowClient(f"sqlite:///{submitted['work'] / 'mlflow.db'}")
    runs = {run.info.run_name: run for run in
            client.search_runs([client.get_experiment_by_name("onegen").experiment_id])}
    assert set(runs) == {"tiny", "tiny/stage1"}  # the job's run and its stage's child run
    run, parent = runs["tiny/stage1"], runs["tiny"]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s",
                "train/ema_decay"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), key
        assert all(np.isfinite(m.value) for m in history), key
    tokens = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/tokens_per_s")}
    samples = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/samples_per_s")}
    assert all(tokens[s] >= 16 * samples[s] for s in tokens)  # 64 px, 2 views: >= 16 tokens a sample
    build = open_build(synthetic_build["name"], storage_root=synthetic_build["root"])
    (dataset,) = [i.dataset for i in parent.inputs.dataset_inputs]
    assert dataset.name == build.name and dataset.digest == build.manifest_digest()[:16]
    assert run.info.status == parent.info.status == "FINISHED"
