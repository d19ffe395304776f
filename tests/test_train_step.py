"""The training step and its reader without Ray (INTERFACES §3): the deterministic plan over the shared synthetic
build, and the step loop on one process (DeepSpeed ZeRO-2, one rank) learning and resuming exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onegen.config import load_config
from onegen.dataset import open_build
from onegen.train_config import MixtureItem, TrainConfig
from train_runs import TINY, in_fresh_process, single_process_stage, train_overrides
from training.reader import Cursor, DataPlan, RowInfo, count_step, index_rows, manifest_problems, rank_share


@pytest.fixture(scope="module")
def rows(synthetic_build):
    return index_rows([open_build(synthetic_build["name"], storage_root=synthetic_build["root"])], 64)


def mixture(*specs: dict) -> list[MixtureItem]:
    return [MixtureItem(**spec) for spec in specs]


MIX = mixture({"task": "text2image", "weight": 2}, {"task": "depth2image"}, {"task": "canny2image"},
              {"task": "multiview", "direction": "novel_view_synthesis"})


def test_index_reads_every_train_row_with_its_latent_keys(rows, synthetic_build):
    assert len(rows) == 24 and len({r.id for r in rows}) == 24
    assert all(r.bucket == (64, 64) and r.num_views == 2 and r.has_cameras and r.resolution == 64 for r in rows)
    assert all({(0, "image"), (1, "image"), (0, "depth"), (1, "canny")} <= r.keys for r in rows)
    assert {r.source for r in rows} == {"synth"}
    build = open_build(synthetic_build["name"], storage_root=synthetic_build["root"])
    assert index_rows([build], 128) == []


def plan_of(rows, mix=MIX, **kwargs) -> DataPlan:
    return DataPlan(rows, mix, **{"seed": 0, "stage": 0, "global_batch": 4, "resolution": 64, **kwargs})


def stream(plan: DataPlan, steps: int) -> list:
    cursor, batches = plan.start(), []
    for _ in range(steps):
        batches.append(plan.batch(cursor))
        cursor = plan.advance(cursor)
    return batches


def test_plan_is_a_pure_function_of_seed_and_stage(rows):
    plan = plan_of(rows)
    assert stream(plan, 30) == stream(plan_of(rows), 30)
    assert plan.epoch(0, 3) == plan_of(rows).epoch(0, 3) and plan.epoch(0, 0) != plan.epoch(0, 1)
    assert stream(plan_of(rows, seed=1), 30) != stream(plan, 30)
    assert stream(plan_of(rows, stage=1), 30) != stream(plan, 30)


def test_each_global_batch_is_one_bucket_view_count_and_task_and_each_row_appears_once_per_task_epoch(rows):
    plan = plan_of(rows)
    for item in range(len(MIX)):
        for epoch in range(3):
            batches = plan.epoch(item, epoch)
            assert batches
            seen = [c.row for _, choices in batches for c in choices]
            assert len(seen) == len(set(seen))  # weight 1: a row is drawn once per epoch; tails are dropped
            for (bucket, frames, key_item), choices in batches:
                assert key_item == item and len(choices) == 4 and {c.item for c in choices} == {item}
                assert frames == {"multiview": 4, "text2image": 1}.get(MIX[item].task, 2)
                assert all(c.direction in plan.tasks[item].directions for c in choices)


def test_rank_shares_are_equal_disjoint_and_cover_the_global_batch(rows):
    _, choices = plan_of(rows).batch(plan_of(rows).start())
    shares = [rank_share(choices, r, 2) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2] and shares[0] + shares[1] == list(choices)
    with pytest.raises(ValueError, match="evenly"):
        rank_share(choices, 0, 3)


def test_a_cursor_resumes_the_stream_exactly(rows):
    plan = plan_of(rows)
    expected = stream(plan, 60)  # several epochs of every task
    fresh = plan_of(rows)
    cursor = plan.start()
    for _ in range(45):
        cursor = plan.advance(cursor)
    cursor = Cursor.from_dict(json.loads(json.dumps(cursor.to_dict())))  # through state.json
    assert cursor.step == 45 and [fresh.batch(cursor), fresh.batch(fresh.advance(cursor))] == expected[45:47]


def fake_rows(n: int, *, resolution: int = 64, views: int = 2, keys=("image", "depth"), start: int = 0,
              source: str = "synth") -> list[RowInfo]:
    """Index rows without a build (the plan is pure over them): n rows with these modalities on every view."""
    return [RowInfo(0, "s", start + i, f"r{start + i}", source, resolution, (resolution, resolution), views,
                    frozenset((v, m) for v in range(views) for m in keys), True, 1, "pixel")
            for i in range(n)]


def binomial_ok(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """|count - n p| <= 4 standard deviations of Binomial(n, p): a wrong mixture of a few hundred draws fails it,
    a right one passes but for odds of ~6e-5 per task (and the draws are seeded, so a pass stays a pass)."""
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_the_realised_task_mixture_is_the_configured_one_whatever_the_tasks_row_counts():
    """Equal weights give equal shares of the steps although depth has 4x the rows of canny (a per-row draw would
    give depth 4x the steps), and a 2:1 weight gives twice the steps; an optional task without rows is never drawn
    and is noted as skipped."""
    rows = fake_rows(80, keys=("image", "depth")) + fake_rows(20, keys=("image", "depth", "canny"), start=80)
    mix = mixture({"task": "text2image", "weight": 2}, {"task": "depth2image"}, {"task": "canny2image"},
                  {"task": "hed2img", "optional": True})
    plan = plan_of(rows, mix)
    refusals, notes = plan.problems()
    assert refusals == [] and len(notes) == 1 and "hed2img" in notes[0] and "skipped" in notes[0]
    steps = 600
    counts = {}
    cursor = plan.start()
    for _ in range(steps):
        key, choices = plan.batch(cursor)
        counts = count_step(counts, plan, key, choices)
        cursor = plan.advance(cursor)
    assert counts["steps"] == steps and "hed2img" not in counts["tasks"]
    assert plan.effective() == pytest.approx({"text2image": 0.5, "depth2image": 0.25, "canny2image": 0.25})
    for label, p in plan.effective().items():
        assert binomial_ok(counts["tasks"][label], steps, p), (label, counts["tasks"])
    assert counts["sources"] == {"synth": 4 * steps} and counts["buckets"] == {"64x64": 4 * steps}
    assert sum(counts["frames"].values()) == 4 * steps and counts["frames"]["1"] == 4 * counts["tasks"]["text2image"]


def test_an_item_trains_on_its_own_resolution_and_frame_range():
    rows = fake_rows(12, resolution=128, keys=("image",)) + fake_rows(12, keys=("image", "depth"), start=12) + \
        fake_rows(8, views=3, keys=("image",), start=24)
    mix = mixture({"task": "text2image", "resolution": 128}, {"task": "depth2image"},
                  {"task": "multiview", "views": [6, 6]}, {"task": "multiview", "views": [8, 12], "name": "mv8"})
    plan = plan_of(rows, mix)
    assert plan.rows_per_item() == [12, 12, 8, 0] and plan.problems()[0] == [
        "mixture task mv8: no row of the builds at resolution 64 with 8-12 frames can feed it; mark it optional: "
        "true or build its data"]
    for (bucket, frames, item), choices in stream(plan_of(rows, mix[:3]), 60):
        assert {rows[c.row].resolution for c in choices} == {128 if item == 0 else 64} == {bucket[0]}
        assert item != 2 or (frames == 6 and {rows[c.row].num_views for c in choices} == {3})


class FakeBuild:
    """What manifest_problems reads of a build: its manifest entries' counts."""

    def __init__(self, *counts: dict):
        self._entries = {"s": {"counts": list(counts)}}

    def entries(self) -> dict:
        return self._entries


def test_a_stage_whose_every_task_is_optional_and_unfed_is_refused(rows):
    nothing = mixture({"task": "hed2img", "optional": True}, {"task": "faceid", "optional": True})
    refusals, notes = plan_of(rows, nothing).problems()
    assert len(notes) == 2 and refusals == ["no mixture task can be fed by the builds (every one is optional and "
                                            "skipped); build the data of one of them or change the mixture"]
    from onegen.train_config import StageSection

    build = FakeBuild({"bucket": [64, 64], "modalities": ["image"], "resolution": 64, "rows": 8, "split": "train",
                       "views": 1})
    refusals, _ = manifest_problems([build], StageSection(name="s", steps=1, resolution=64, mixture=nothing), 4)
    assert refusals and "no mixture task can be fed" in refusals[0]
    too_big, _ = plan_of(rows, mixture({"task": "text2image"}), global_batch=32).problems()
    assert too_big == ["mixture task text2image: its 24 rows at resolution 64 fill no global batch of 32; lower "
                       "train.global_batch_size or build more data"]


def test_a_stage_is_refused_from_the_manifests_alone():
    from onegen.train_config import StageSection

    build = FakeBuild({"bucket": [64, 64], "modalities": ["canny", "depth", "image"], "resolution": 64, "rows": 8,
                       "split": "train", "views": 2},
                      {"bucket": [64, 64], "modalities": ["image", "pose"], "resolution": 64, "rows": 8,
                       "split": "heldout", "views": 1})
    stage = StageSection(name="s2", steps=1, resolution=64, mixture=mixture(
        {"task": "text2image", "resolution": 128}, {"task": "depth2image"}, {"task": "multiview"},
        {"task": "pose2image"}, {"task": "faceid", "optional": True}))
    refusals, notes = manifest_problems([build], stage, global_batch=4)
    assert [line.split(":")[1].strip() for line in refusals] == ["mixture task text2image", "mixture task pose2image"]
    assert "resolution 128" in refusals[0] and "optional: true" in refusals[0]
    assert len(notes) == 1 and "faceid" in notes[0] and "skipped" in notes[0]
    assert manifest_problems([build], stage, global_batch=16)[0][1].startswith(
        "stage s2: mixture task depth2image")  # 8 rows never fill a batch of 16


def test_the_config_refuses_a_batch_that_does_not_split_over_the_workers():
    from onegen.config import ConfigError

    with pytest.raises(ConfigError, match="train.global_batch_size: 6 does not split evenly"):
        load_config(TINY, ["train.global_batch_size=6", "train.num_workers=4"], TrainConfig)
    with pytest.raises(ConfigError, match="unknown task 'depth'"):
        load_config(TINY, ["train.stages[0].mixture[1].task=depth"], TrainConfig)


def test_one_process_learns_and_resumes_from_its_checkpoint_exactly(synthetic_build, tmp_path):
    """The step loop without Ray: one rank of DeepSpeed ZeRO-2 overfits a text->image set (the loss falls), and a run
    restored from its step-20 checkpoint logs the uninterrupted run's losses for steps 21..40."""
    overrides = train_overrides(synthetic_build, tmp_path / "work", "train.global_batch_size=4",
                                "train.stages[0].steps=40", "train.checkpoint_every=20",
                                "train.stages[0].mixture=[{task: text2image}]", "train.optimizer.warmup_steps=2")
    full = in_fresh_process(single_process_stage, overrides, None, str(tmp_path / "ckpt"))
    assert full["checkpoints"] == [20, 40]
    losses = [loss for _, _, loss in full["losses"]]
    assert [step for step, _, _ in full["losses"]] == list(range(1, 41))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
    resumed = in_fresh_process(single_process_stage, overrides, str(tmp_path / "ckpt/checkpoint_000020"))
    assert [step for step, _, _ in resumed["losses"]] == list(range(21, 41))
    np.testing.assert_allclose([loss for _, _, loss in resumed["losses"]], losses[20:], rtol=1e-5)
