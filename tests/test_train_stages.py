"""The paper's recipe on the tiny preset (issue: training part 3; INTERFACES §1, §3, §6): three stage files chained
by `onegen train --stages`, each stage starting from the previous one's EMA weights, under one MLflow parent run with
a child run per stage; the realised mixture of each stage counted by the workers and logged beside the configured
one; sample grids per task; stages the builds cannot feed refused from the manifests before anything trains; the
final pipeline registered as an MLflow pyfunc with the alias `candidate`, answering in a fresh process, and
`--init models:/NAME@ALIAS` training from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
    """`--stages s1.yaml` (a job of one stage, registered as version 1), then the job grown to `--stages s1.yaml
    s2.yaml s3.yaml`: s1 is kept, s2 starts from its EMA, s3 from s2's, and s3's pipeline becomes version 2."""
    tmp = tmp_path_factory.mktemp("stages")
    work = tmp / "work"
    files = stage_files(tmp / "configs")
    overrides = train_overrides(synthetic_build, work, "train.checkpoint_every=4", "train.samples.every=6",
                                "train.samples.steps=4")
    first = run_train(ray_head, *overrides, stages=files[:1])
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-6000:]
    result = run_train(ray_head, *overrides, stages=files)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return {"work": work, "first": first, "result": result, "runs": work / "data/runs/tiny"}


def final_state(chained, stage: str) -> dict:
    return json.loads((chained["runs"] / stage / f"checkpoint_{STAGE_STEPS[stage]:06d}/state.json").read_text())


def test_three_stage_files_chain_each_from_the_previous_stages_ema(chained):
    out = chained["result"].stdout
    assert "run tiny, stage s1: 4 steps" in chained["first"].stdout
    s1_summary = out.split("run tiny, stage s1: 4 steps", 1)[1].split("run tiny, stage s2", 1)[0]
    assert "already trained" in s1_summary  # the grown job keeps the finished stage
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
    for start_from, previous, expected in (("ema", s1 / "pipeline", ema_weights(s1)), ("model", s1, raw_weights(s1))):
        weights = load_transformer(cfg, {}, previous=str(previous), start_from=start_from).state_dict()
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
    assert s2.data.metrics["mixture/drawn/text2image"] == pytest.approx(3 / 10)  # of the fed 3+1+1+1+1+3
    assert s2.data.metrics["mixture/configured/text2image"] == pytest.approx(3 / 13)  # of all (faceid's 3 too)
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
    # a stage's checkpoints are checked against the job up to that stage: appending stages keeps them valid
    assert staged.stage_content_hash(1) == cfg.stage_content_hash(1) != staged.stage_content_hash(2)
    assert load_config(files[:1], [], TrainConfig).stage_content_hash(1) == cfg.stage_content_hash(1)


def test_each_stage_logs_a_sample_grid_per_task_it_draws(chained):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient(f"sqlite:///{chained['work'] / 'mlflow.db'}")
    s2 = mlflow_runs(chained["work"])["tiny/s2"].info.run_id
    drawn = {"text2image", "depth2image", "canny2image", "pose2image", "semanticmap2image", "multiview"}
    for step in (6, 12):  # every 6 steps; the last step is one of them
        logged = {Path(a.path).name for a in client.list_artifacts(s2, f"samples/s2/step_{step:06d}")}
        assert logged == {f"{label}.png" for label in drawn}, logged
    tiles = {"text2image": 2, "depth2image": 3}  # (conditions,) generated, ground truth: 64 px tiles, 4 px apart
    for label, count in tiles.items():
        image = Image.open(client.download_artifacts(s2, f"samples/s2/step_000012/{label}.png"))
        assert image.size == (64 * count + 4 * (count - 1), 64)
        assert np.asarray(image).std() > 0
    s1 = {Path(a.path).name for a in client.list_artifacts(mlflow_runs(chained["work"])["tiny/s1"].info.run_id,
                                                          "samples/s1/step_000004")}
    assert s1 == {"text2image.png"}  # 4 steps: only the end of the stage


def test_the_final_pipeline_is_registered_as_candidate_with_its_lineage(chained, synthetic_build):
    from mlflow.tracking import MlflowClient

    from onegen.dataset import open_build

    client = MlflowClient(f"sqlite:///{chained['work'] / 'mlflow.db'}")
    version = client.get_model_version_by_alias("onegen", "candidate")
    parent = mlflow_runs(chained["work"])["tiny"]
    assert str(version.version) == "2" and version.run_id == parent.info.run_id
    first = client.get_model_version("onegen", "1")  # the one-stage job's, before it grew
    assert first.run_id == parent.info.run_id and first.tags["onegen.checkpoint"].endswith("s1/checkpoint_000004")
    build = open_build(synthetic_build["name"], storage_root=synthetic_build["root"])
    assert json.loads(version.tags["onegen.builds"]) == [{"uri": build.uri, "manifest_digest": build.manifest_digest()}]
    assert version.tags["onegen.stages"] == "s1,s2,s3" and version.tags["onegen.run"] == "tiny"
    assert version.tags["onegen.parent_model"].startswith("none (model.preset nextdit-tiny")
    assert version.tags["onegen.checkpoint"].endswith("runs/tiny/s3/checkpoint_000004")
    assert "registered: models:/onegen/1 (alias candidate" in chained["first"].stdout
    assert "registered: models:/onegen/2 (alias candidate" in chained["result"].stdout


ANSWER = r"""
import base64, io, json, sys
import mlflow, numpy as np
from mlflow.exceptions import MlflowException
from PIL import Image
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/onegen@candidate")
out = model.predict({"task": "text2image", "prompt": "a red cube", "steps": 3, "seed": 0, "height": 64, "width": 64})
image = Image.open(io.BytesIO(base64.b64decode(out["images"][0][0])))
photo = io.BytesIO()
Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(photo, format="PNG")
depth = model.predict({"task": "depth2image", "prompt": "", "direction": "estimate", "steps": 3, "height": 64,
                       "width": 64, "images": [base64.b64encode(photo.getvalue()).decode()]})
array = np.load(io.BytesIO(base64.b64decode(depth["arrays"][0][0])))
errors = []
for bad in ({"task": "nope", "prompt": "x"}, {"task": "text2image", "prompt": "x", "steps": 0},
            {"task": "depth2image", "prompt": "", "images": ["not base64!"]}):
    try:
        model.predict(bad)
        errors.append(None)
    except MlflowException as err:
        errors.append(err.error_code)
print(json.dumps({"size": image.size, "std": float(np.asarray(image).std()), "depth": list(array.shape),
                  "signature": [c.name for c in model.metadata.signature.inputs.inputs], "errors": errors}))
"""


def test_the_candidate_loads_by_uri_in_a_fresh_process_and_answers_a_prompt_with_an_image(chained):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", ANSWER, f"sqlite:///{chained['work'] / 'mlflow.db'}"],
                            capture_output=True, text=True, timeout=300, cwd=chained["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["size"] == [64, 64] and answer["std"] > 0 and answer["depth"] == [64, 64]
    assert answer["signature"] == ["task", "prompt", "images", "direction", "steps", "cfg", "seed", "height", "width"]
    assert answer["errors"] == ["INVALID_PARAMETER_VALUE"] * 3


def test_init_from_a_registered_model_pins_its_version_and_trains_from_its_weights(chained, ray_head,
                                                                                    synthetic_build):
    import torch

    from onegen.config import ConfigError, load_config
    from onegen.train_config import TrainConfig
    from train_runs import ema_weights
    from training.weights import check_model_sources, load_transformer

    work = chained["work"]
    overrides = train_overrides(synthetic_build, work, "run.name=from-candidate", "train.stages[0].steps=2",
                                "train.checkpoint_every=2", "train.samples.every=0")
    cfg = load_config(TINY, [*overrides, "model.init=models:/onegen@candidate"], TrainConfig)
    sources = check_model_sources(cfg, "pixel")
    assert sources == {"init": "2", "text_encoder": "2"}
    registered = ema_weights(chained["runs"] / "s3" / f"checkpoint_{STAGE_STEPS['s3']:06d}")
    loaded = load_transformer(cfg, sources).state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in registered.items())
    with pytest.raises(ConfigError, match="models:/onegen@champion: model 'onegen' has no alias champion"):
        check_model_sources(load_config(TINY, [*overrides, "model.init=models:/onegen@champion"], TrainConfig))
    result = run_train(ray_head, *overrides, extra_args=["--init", "models:/onegen@candidate"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((work / "data/runs/from-candidate/stage1/checkpoint_000002/state.json").read_text())
    assert state["init"] == {"uri": "models:/onegen@candidate", "revision": "2"}
    from mlflow.tracking import MlflowClient

    newer = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_model_version_by_alias("onegen", "candidate")
    assert str(newer.version) == "3" and newer.tags["onegen.parent_model"] == "models:/onegen/2"


def test_a_later_stage_file_may_leave_a_section_empty(tmp_path):
    from onegen.config import load_config
    from onegen.train_config import TrainConfig

    extra = tmp_path / "more.yaml"
    extra.write_text("tracking:\ntrain:\n  optimizer:\n  stages:\n    - {name: more, steps: 1, resolution: 64, "
                     "mixture: [{task: text2image}]}\n")
    cfg = load_config([TINY, extra], [], TrainConfig)
    assert [stage.name for stage in cfg.train.stages] == ["stage1", "more"] and cfg.train.optimizer.lr == 1e-3
