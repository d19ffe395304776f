"""The paper's recipe on the tiny preset (issue: training part 3; INTERFACES §1, §3, §6): three stage files chained
by `onegen train --stages`, each stage starting from the previous one's EMA weights, under one MLflow parent run with
a child run per stage; the realised mixture of each stage counted by the workers and logged beside the configured
one; stages the builds cannot feed refused from the manifests before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from train_runs import TINY, run_train, train_overrides

STAGE_STEPS = {"s1": 4, "s2": 12, "s3": 4}
# the shipped configs/train/stage*.yaml scaled to the 64 px fixture build (one resolution: every item trains at 64);
# the build has pose and semantic maps (the synthetic world's ground truth) but no identity sets: faceid is skipped
STAGES = {
    "s1": [{"name": "s1", "steps": STAGE_STEPS["s1"], "resolution": 64, "mixture": [{"task": "text2image"}]}],
    "s2": [{"name": "s2", "steps": STAGE_STEPS["s2"], "resolution": 64, "mixture": [
        {"task": "text2image", "weight": 3, "resolution": 64}, {"task": "depth2image"}, {"task": "canny2image"},
        {"task": "pose2image", "optional": True}, {"task": "semanticmap2image", "optional": True},
        {"task": "multiview", "weight": 3, "optional": True}, {"task": "faceid", "weight": 3, "optional": True}]}],
    "s3": [{"name": "s3", "steps": STAGE_STEPS["s3"], "resolution": 64, "mixture": [
        {"task": "text2image", "weight": 2},
        {"task": "faceid", "name": "faceid:2-3", "views": [2, 3], "optional": True},
        {"task": "faceid", "name": "faceid:4-5", "views": [4, 5], "optional": True}]}],
}


def stage_files(folder: Path, stages: dict = STAGES) -> list[Path]:
    """s1.yaml: configs/train/tiny.yaml with its stages replaced; s2.yaml, s3.yaml: only their train.stages (the
    concatenation takes every other key from the first file)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(TINY.read_text())
    files = []
    for name, stage in stages.items():
        config = {**base, "train": {**base["train"], "stages": stage}} if not files else {"train": {"stages": stage}}
        files.append(folder / f"{name}.yaml")
        files[-1].write_text(yaml.safe_dump(config, sort_keys=False))
    return files


@pytest.fixture(scope="module")
def chained(ray_head, synthetic_build, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    work = tmp / "work"
    result = run_train(ray_head, *train_overrides(synthetic_build, work, "train.checkpoint_every=4"),
                       stages=stage_files(tmp / "configs"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return {"work": work, "result": result, "runs": work / "data/runs/tiny"}


def final_state(chained, stage: str) -> dict:
    return json.loads((chained["runs"] / stage / f"checkpoint_{STAGE_STEPS[stage]:06d}/state.json").read_text())


def test_three_stage_files_chain_each_from_the_previous_stages_ema(chained):
    out = chained["result"].stdout
    for stage, steps in STAGE_STEPS.items():
        assert f"run tiny, stage {stage}: {steps} steps" in out
        assert final_state(chained, stage)["step"] == steps
    assert final_state(chained, "s1")["start"] is None
    for stage, previous in (("s2", "s1"), ("s3", "s2")):
        start = final_state(chained, stage)["start"]
        assert start["stage"] == previous and start["weights"] == "ema"
        assert start["uri"].endswith(f"runs/tiny/{previous}/checkpoint_{STAGE_STEPS[previous]:06d}")
    assert "stage s2: mixture task faceid: no row of the builds at resolution 64 can feed it (optional: skipped" \
        in out


def test_a_stage_starts_from_the_previous_stages_ema_or_trained_weights(chained, synthetic_build):
    import torch

    from onegen.config import load_config
    from onegen.train_config import TrainConfig
    from train_runs import ema_weights, raw_weights
    from training.weights import load_transformer

    cfg = load_config(TINY, train_overrides(synthetic_build, chained["work"]), TrainConfig)
    s1 = chained["runs"] / "s1" / f"checkpoint_{STAGE_STEPS['s1']:06d}"
    for start_from, expected in (("ema", ema_weights(s1)), ("model", raw_weights(s1))):
        weights = load_transformer(cfg, {}, previous=str(s1), start_from=start_from).state_dict()
        assert weights.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=f"{start_from}: {name}")
    assert any(not torch.equal(a, b) for a, b in zip(ema_weights(s1).values(), raw_weights(s1).values()))


def test_each_stage_counts_its_realised_mixture_and_skips_tasks_without_data(chained):
    counts = final_state(chained, "s2")["mixture"]
    assert counts["steps"] == STAGE_STEPS["s2"] and sum(counts["tasks"].values()) == STAGE_STEPS["s2"]
    assert set(counts["tasks"]) <= {"text2image", "depth2image", "canny2image", "pose2image", "semanticmap2image",
                                    "multiview"}  # never faceid: the build has no identity sets
    assert counts["sources"] == {"synthetic_small/synth": 4 * STAGE_STEPS["s2"]}
    assert sum(counts["frames"].values()) == 4 * STAGE_STEPS["s2"] and set(counts["frames"]) <= {"1", "2", "4"}
    assert final_state(chained, "s3")["mixture"]["tasks"] == {"text2image": STAGE_STEPS["s3"]}


def mlflow_runs(work: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("onegen").experiment_id])
    return {run.info.run_name: run for run in runs}


def test_mlflow_has_a_parent_run_and_a_child_per_stage_with_per_task_losses_and_the_mixture(chained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{chained['work'] / 'mlflow.db'}")
    runs = mlflow_runs(chained["work"])
    assert set(runs) == {"tiny", "tiny/s1", "tiny/s2", "tiny/s3"}
    parent = runs["tiny"]
    for stage in STAGE_STEPS:
        child = runs[f"tiny/{stage}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
        assert final_state(chained, stage)["mlflow_run_id"] == child.info.run_id
        assert final_state(chained, stage)["mlflow_parent_run_id"] == parent.info.run_id
    s2 = runs["tiny/s2"]
    realised = final_state(chained, "s2")["mixture"]["tasks"]
    for label, steps in realised.items():
        assert len(client.get_metric_history(s2.info.run_id, f"train/loss/{label}")) == steps
        assert s2.data.metrics[f"mixture/realised/{label}"] == pytest.approx(steps / STAGE_STEPS["s2"])
    assert s2.data.metrics["mixture/configured/text2image"] == pytest.approx(3 / 10)  # of the fed 3+1+1+1+1+3
    waits = client.get_metric_history(s2.info.run_id, "train/data_wait_fraction")
    assert len(waits) == STAGE_STEPS["s2"] and all(0 < m.value < 1 for m in waits)
    logged = json.loads(Path(client.download_artifacts(s2.info.run_id, "mixture/s2.json")).read_text())
    assert logged["counts"]["tasks"] == realised and logged["configured"]["faceid"] == pytest.approx(3 / 13)
    assert parent.info.status == "FINISHED"


def test_a_stage_the_builds_cannot_feed_is_refused_before_the_first_stage_trains(ray_head, synthetic_build,
                                                                                  tmp_path):
    stages = {**STAGES, "s3": [{"name": "s3", "steps": 2, "resolution": 64,
                               "mixture": [{"task": "text2image"}, {"task": "deblurring"}]}]}
    work = tmp_path / "work"
    result = run_train(ray_head, *train_overrides(synthetic_build, work), stages=stage_files(tmp_path / "c", stages))
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stage s3: mixture task deblurring: the builds' manifests list no train rows at resolution 64" \
        in result.stderr
    assert not (work / "data/runs").exists()  # refused from the manifests: nothing trained, no run opened


def test_the_shipped_stage_configs_chain_and_follow_the_spec():
    from onegen.config import ConfigError, load_config
    from onegen.train_config import TrainConfig

    files = [TINY.parent / f"stage{i}.yaml" for i in (1, 2, 3)]
    cfg = load_config(files, [], TrainConfig)
    stages = {stage.name: stage for stage in cfg.train.stages}
    assert list(stages) == ["stage1_256", "stage1_512", "stage2", "stage3"]
    assert [stages["stage1_256"].resolutions, stages["stage1_512"].resolutions] == [[256], [512]]
    assert all(s.steps == 500_000 for s in cfg.train.stages[:2]) and stages["stage2"].steps == 1_000_000
    shares = {item.label: item.weight for item in stages["stage2"].mixture}
    conditions = ["depth2image", "pose2image", "semanticmap2image", "boundingbox2image", "canny2image",
                  "deblurring", "image_inpainting"]
    # equal probability for text-to-image, image<->condition (shared by its tasks), multiview and ID customization
    assert shares["text2image"] == shares["multiview"] == shares["faceid"] == sum(shares[c] for c in conditions)
    assert {item.label: item.resolution_in(stages["stage2"]) for item in stages["stage2"].mixture} == {
        label: 512 if label == "text2image" else 256 for label in shares}
    stage3 = {item.label: (item.resolution_in(stages["stage3"]), item.views) for item in stages["stage3"].mixture}
    assert stage3 == {"text2image": (1024, None), "faceid:2-3": (512, (2, 3)), "faceid:4-5": (256, (4, 5))}
    assert all(s.start_from == "ema" for s in cfg.train.stages)
    assert cfg.train.global_batch_size == 256 and cfg.train.optimizer.lr == 5e-4 and cfg.train.flow.shift == 3.0
    with pytest.raises(ConfigError, match="train.global_batch_size: 4 differs from 256 in .*stage1.yaml"):
        load_config([files[0], TINY], [], TrainConfig)
    staged = load_config(files, ["train.stages[2].steps=500"], TrainConfig)
    assert staged.train.stages[2].steps == 500  # --set reaches a stage of the concatenation
