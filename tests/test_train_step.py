"""The training step and its reader without Ray (INTERFACES §3): the deterministic plan over the shared synthetic
build, and the step loop on one process (DeepSpeed ZeRO-2, one rank) learning and resuming exactly."""

from __future__ import annotations

import numpy as np
import pytest

from onegen.config import load_config
from onegen.dataset import open_build
from onegen.train_config import MixtureItem, TrainConfig
from train_runs import TINY, in_fresh_process, single_process_stage, train_overrides
from training.reader import Cursor, DataPlan, index_rows, rank_share


@pytest.fixture(scope="module")
def rows(synthetic_build):
    return index_rows([open_build(synthetic_build["name"], storage_root=synthetic_build["root"])], resolution=64)


def mixture(*specs: dict) -> list[MixtureItem]:
    return [MixtureItem(**spec) for spec in specs]


MIX = mixture({"task": "text2image", "weight": 2}, {"task": "depth2image"}, {"task": "canny2image"},
              {"task": "multiview", "direction": "novel_view_synthesis"})


def test_index_reads_every_train_row_with_its_latent_keys(rows, synthetic_build):
    assert len(rows) == 24 and len({r.id for r in rows}) == 24
    assert all(r.bucket == (64, 64) and r.num_views == 2 and r.has_cameras for r in rows)
    assert all({(0, "image"), (1, "image"), (0, "depth"), (1, "canny")} <= r.keys for r in rows)
    build = open_build(synthetic_build["name"], storage_root=synthetic_build["root"])
    assert index_rows([build], resolution=128) == []


def test_plan_is_a_pure_function_of_seed_stage_and_epoch(rows):
    plan = DataPlan(rows, MIX, seed=0, stage=0, global_batch=4)
    again = DataPlan(rows, MIX, seed=0, stage=0, global_batch=4)
    assert plan.epoch(0) == again.epoch(0) and plan.epoch(3) == again.epoch(3)
    assert plan.epoch(0) != plan.epoch(1)
    assert DataPlan(rows, MIX, seed=1, stage=0, global_batch=4).epoch(0) != plan.epoch(0)
    assert DataPlan(rows, MIX, seed=0, stage=1, global_batch=4).epoch(0) != plan.epoch(0)


def test_each_global_batch_is_one_bucket_view_count_and_task_and_each_row_appears_once_per_epoch(rows):
    plan = DataPlan(rows, MIX, seed=0, stage=0, global_batch=4)
    for epoch in range(5):
        batches = plan.epoch(epoch)
        assert batches
        seen = [c.row for _, choices in batches for c in choices]
        assert len(seen) == len(set(seen))  # weight 1: a row is drawn once per epoch; tails are dropped
        for (bucket, frames, item), choices in batches:
            assert len(choices) == 4 and {c.item for c in choices} == {item}
            assert frames == (4 if MIX[item].task == "multiview" else MIX[item].task != "text2image" and 2 or 1)
            assert all(c.direction in plan.tasks[item].directions for c in choices)


def test_rank_shares_are_equal_disjoint_and_cover_the_global_batch(rows):
    _, choices = DataPlan(rows, MIX, seed=0, stage=0, global_batch=4).batch(Cursor(0, 0))
    shares = [rank_share(choices, r, 2) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2] and shares[0] + shares[1] == list(choices)
    with pytest.raises(ValueError, match="evenly"):
        rank_share(choices, 0, 3)


def test_a_cursor_resumes_the_stream_exactly(rows):
    plan = DataPlan(rows, MIX, seed=0, stage=0, global_batch=4)
    cursor, stream = plan.start(), []
    for _ in range(40):  # several epochs
        stream.append(plan.batch(cursor))
        cursor = plan.advance(cursor)
    fresh = DataPlan(rows, MIX, seed=0, stage=0, global_batch=4)
    cursor = plan.start()
    for _ in range(25):
        cursor = plan.advance(cursor)
    cursor = Cursor.from_dict(cursor.to_dict())
    assert [fresh.batch(cursor), fresh.batch(fresh.advance(cursor))] == stream[25:27]


def test_the_realised_mixture_follows_the_weights(rows):
    plan = DataPlan(rows * 20, mixture({"task": "text2image", "weight": 3}, {"task": "depth2image"}), seed=0,
                    stage=0, global_batch=4)
    counts = np.bincount([c.item for _, choices in plan.epoch(0) for c in choices], minlength=2)
    assert 0.68 < counts[0] / counts.sum() < 0.82  # 3 : 1 over 480 draws, tails dropped


def test_a_required_task_without_rows_is_refused_and_an_optional_one_noted(rows):
    plan = DataPlan(rows, mixture({"task": "text2image"}, {"task": "hed2img", "optional": True}), seed=0, stage=0,
                    global_batch=4)
    assert plan.problems()[0] == [] and "hed2img" in plan.problems()[1][0]
    refused, _ = DataPlan(rows, mixture({"task": "text2image"}, {"task": "faceid"}), seed=0, stage=0,
                          global_batch=4).problems()
    assert "faceid" in refused[0] and "optional" in refused[0]
    too_big, _ = DataPlan(rows, mixture({"task": "text2image"}), seed=0, stage=0, global_batch=32).problems()
    assert "global_batch_size" in too_big[0]


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
