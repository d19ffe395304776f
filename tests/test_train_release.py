"""Training part 2 on one process (no Ray; each run in a fresh spawned process): ZeRO-3 with EMA, activation
checkpointing, the EMA's exact resume, `--init` from a release folder, and the refusals of the model's weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train_runs import (check_ema_follows_the_decay, ema_weights, in_fresh_process, make_release_folder,
                        raw_weights, safetensors_weights, single_process_stage,
                        single_process_stage_counting_recomputes, train_overrides)

ZERO3 = ("train.zero_stage=3", "train.zero3_persistence_threshold=0", "train.stages[0].steps=3",
         "train.checkpoint_every=1", "train.keep_checkpoints=10", "train.global_batch_size=2")


@pytest.fixture(scope="module")
def zero3(synthetic_build, tmp_path_factory):
    """3 steps of configs/train/tiny.yaml on one process under ZeRO-3 (every parameter partitioned), a checkpoint
    after each step."""
    root = tmp_path_factory.mktemp("zero3")
    overrides = train_overrides(synthetic_build, root / "work", *ZERO3)
    result = in_fresh_process(single_process_stage, overrides, None, str(root / "ckpt"))
    return {"overrides": overrides, "result": result, "checkpoints": root / "ckpt"}


def test_zero3_trains_with_an_ema_that_follows_its_decay(zero3):
    checkpoints = sorted(zero3["checkpoints"].iterdir())
    assert [c.name for c in checkpoints] == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]
    ds = {p.name for p in (checkpoints[-1] / "ds").iterdir()}
    assert "zero_pp_rank_0_mp_rank_00_model_states.pt" in ds  # ZeRO-3's layout (ZeRO-2 writes mp_rank_00_...)
    check_ema_follows_the_decay(checkpoints)


def test_activation_checkpointing_gives_the_same_losses(zero3, tmp_path):
    again = in_fresh_process(single_process_stage_counting_recomputes,
                             [*zero3["overrides"], "train.activation_checkpointing=true", f"run.work_dir={tmp_path}"])
    assert again["recomputed_blocks"] == 3 * 2  # every step runs the preset's 2 blocks under checkpointing
    assert [s for s, _, _ in again["losses"]] == [1, 2, 3]
    np.testing.assert_allclose([x for _, _, x in again["losses"]], [x for _, _, x in zero3["result"]["losses"]],
                               rtol=1e-5)


def test_under_bf16_the_ema_averages_the_float32_master_weights(synthetic_build, tmp_path):
    """DeepSpeed's bf16 module holds rounded copies; the average follows the optimizer's float32 masters (what the
    consolidated checkpoint holds), under ZeRO-2 as under ZeRO-3."""
    overrides = train_overrides(synthetic_build, tmp_path / "work", "train.precision=bf16", "train.stages[0].steps=2",
                                "train.checkpoint_every=1", "train.global_batch_size=2", "train.optimizer.lr=1e-5")
    in_fresh_process(single_process_stage, overrides, None, str(tmp_path / "ckpt"))
    check_ema_follows_the_decay(sorted((tmp_path / "ckpt").iterdir()), moved_at_least=1e-7)


def test_a_resumed_run_continues_the_average_exactly(zero3, tmp_path):
    resumed = in_fresh_process(single_process_stage, zero3["overrides"],
                               str(zero3["checkpoints"] / "checkpoint_000002"), str(tmp_path))
    assert resumed["losses"] == zero3["result"]["losses"][2:]
    for name, value in ema_weights(tmp_path / "checkpoint_000003").items():
        torch.testing.assert_close(value, ema_weights(zero3["checkpoints"] / "checkpoint_000003")[name], rtol=0, atol=0)


def test_init_starts_from_the_release_folders_weights_and_its_text_encoder(synthetic_build, tmp_path):
    release = make_release_folder(tmp_path / "release")
    lr = 1e-6
    overrides = train_overrides(synthetic_build, tmp_path / "work", "train.stages[0].steps=1",
                                "train.checkpoint_every=1", "train.global_batch_size=2", f"train.optimizer.lr={lr}",
                                "train.optimizer.warmup_steps=0", "train.optimizer.schedule=constant",
                                f"model.init={release}")
    in_fresh_process(single_process_stage, overrides, None, str(tmp_path / "ckpt"))
    checkpoint = tmp_path / "ckpt/checkpoint_000001"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["init"] == {"uri": str(release), "revision": None}
    assert state["text_encoder"]["uri"] == str(release)  # model.text_encoder unset: the release's own T5
    start = safetensors_weights(release / "transformer")
    after_one_step = raw_weights(checkpoint)
    # AdamW's first step moves each weight by at most lr (plus float32 rounding of weights near 1): the step
    # started from the folder's weights
    for name, value in start.items():
        assert float((after_one_step[name] - value).abs().max()) <= lr * 1.5, name
    assert any(float((after_one_step[n] - v).abs().max()) > lr / 2 for n, v in start.items())  # and it trained
    from training.weights import load_transformer  # sanity: the seeded preset is far from the folder's weights

    seeded = {n: p.detach() for n, p in load_transformer(_cfg(synthetic_build, tmp_path), {}).named_parameters()}
    assert max(float((seeded[n] - v).abs().max()) for n, v in start.items()) > 0.01


def _cfg(synthetic_build, tmp_path, *extra: str):
    from onegen.config import load_config
    from onegen.train_config import TrainConfig
    from train_runs import TINY

    return load_config(TINY, train_overrides(synthetic_build, tmp_path / "work", *extra), TrainConfig)


def test_a_checkpoints_pipeline_folder_fits_as_an_init(zero3, synthetic_build, tmp_path):
    from training.weights import check_model_sources

    pipeline = zero3["checkpoints"] / "checkpoint_000003" / "pipeline"
    cfg = _cfg(synthetic_build, tmp_path, f"model.init={pipeline}")
    assert check_model_sources(cfg) == {"init": None, "text_encoder": None}
    assert cfg.model.text_encoder_source == str(pipeline)


def test_weights_that_do_not_fit_are_refused_in_one_line(synthetic_build, tmp_path, monkeypatch):
    from onegen.config import ConfigError
    from training.weights import check_model_sources

    wide = make_release_folder(tmp_path / "wide", hidden_size=144, num_heads=4)
    with pytest.raises(ConfigError) as err:
        check_model_sources(_cfg(synthetic_build, tmp_path, f"model.init={wide}"))
    assert str(err.value).count("\n") == 0
    assert "its transformer does not fit model.preset=nextdit-tiny (hidden_size 144 (preset 96))" in str(err.value)

    other_t5 = make_release_folder(tmp_path / "t5-48", caption_channels=48)
    with pytest.raises(ConfigError, match=r"model.text_encoder=.*T5 width \(d_model\) 48, but model.preset="
                                          r"nextdit-tiny reads captions of width 32"):
        check_model_sources(_cfg(synthetic_build, tmp_path, f"model.text_encoder={other_t5}"))
    made_for_a_vae = make_release_folder(tmp_path / "vae-release", vae=True)
    with pytest.raises(ConfigError, match="its weights were made for AutoencoderKL latents, but the builds hold "
                                          "'pixel' latents; build the data with the same image tokenizer"):
        check_model_sources(_cfg(synthetic_build, tmp_path, f"model.init={made_for_a_vae}"), "pixel")
    assert check_model_sources(_cfg(synthetic_build, tmp_path, f"model.init={made_for_a_vae}"),
                               "vae-folder") == {"init": None, "text_encoder": None}

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here either way; offline mode answers at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"model.init='nobody/nothing-here': cannot read its transformer config"):
        check_model_sources(_cfg(synthetic_build, tmp_path, "model.init=nobody/nothing-here"))


def test_the_command_refuses_a_misfit_init_before_any_worker_starts(ray_head, synthetic_build, tmp_path):
    from train_runs import run_train

    wide = make_release_folder(tmp_path / "wide", hidden_size=144, num_heads=4)
    started = time.monotonic()
    result = run_train(ray_head, *train_overrides(synthetic_build, tmp_path / "work"), extra_args=["--init", str(wide)])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "does not fit model.preset=nextdit-tiny" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "work/data/runs").exists()


@pytest.mark.parametrize("case", ["missing build", "unfinished build", "text width"])
def test_the_command_refuses_its_data_and_text_encoder_in_one_line_in_seconds(case, ray_head, synthetic_build,
                                                                               tmp_path):
    import shutil

    from train_runs import run_train

    work = tmp_path / "work"
    overrides = train_overrides(synthetic_build, work)
    if case == "missing build":
        overrides.append("train.data.builds[0].uri=no_such_build")
        expected = "no build there"
    elif case == "unfinished build":
        copy = work / "data/builds" / synthetic_build["name"]
        shutil.copytree(Path(synthetic_build["root"]) / "builds" / synthetic_build["name"], copy)
        (copy / "manifest/_final.json").unlink()
        overrides.append(f"train.data.builds[0].uri={synthetic_build['name']}")
        expected = "is not final (no manifest/_final.json)"
    else:
        overrides.append(f"model.text_encoder={make_release_folder(tmp_path / 'wide-t5', caption_channels=48)}")
        expected = "T5 width (d_model) 48, but model.preset=nextdit-tiny reads captions of width 32"
    started = time.monotonic()
    result = run_train(ray_head, *overrides)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert not (work / "data/runs").exists()


def test_a_hub_id_init_is_pinned_to_one_commit_for_the_run_and_its_resume(synthetic_build, tmp_path, monkeypatch):
    """--init owner/name (here from a local Hugging Face cache, offline, with two commits): the driver pins the
    commit `main` names, the init's own T5 is read at that same commit, the workers load that commit, and a resumed
    run keeps the commit its checkpoint recorded after `main` moved."""
    import shutil

    import huggingface_hub.constants

    from training.weights import check_model_sources, load_transformer, resumed_sources, text_encoder_folder

    repo = tmp_path / "hub" / "models--onegen-test--tiny-release"
    old, new = "a" * 40, "b" * 40
    for commit, seed in ((old, 1), (new, 2)):
        make_release_folder(tmp_path / f"release-{seed}", seed=seed)
        shutil.copytree(tmp_path / f"release-{seed}", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    cfg = _cfg(synthetic_build, tmp_path, "model.init=onegen-test/tiny-release")
    sources = check_model_sources(cfg, "pixel")
    assert sources == {"init": new, "text_encoder": new}
    state = {"init": {"uri": cfg.model.init, "revision": old}, "text_encoder": {"uri": cfg.model.init, "revision": old}}
    assert resumed_sources(state, sources) == {"init": old, "text_encoder": old}
    for commit, seed in ((old, 1), (new, 2)):
        loaded = dict(load_transformer(cfg, {"init": commit}).named_parameters())
        for name, value in safetensors_weights(tmp_path / f"release-{seed}" / "transformer").items():
            assert torch.equal(loaded[name].detach(), value), (commit, name)
        assert text_encoder_folder(cfg, {"text_encoder": commit}) == repo / "snapshots" / commit
