"""Fine-tuning part 1: LoRA through the same trainer (configs/train/finetune_lora.yaml), on one process (no Ray; each
run in a fresh spawned process) over a folder build of 8 pictures, from a tiny release-layout folder: the adapter
lowers the pictures' loss, the base stays bit-identical, checkpoints hold only the adapter in diffusers' key
convention, and a killed run resumes with the same losses."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from build_runs import ok, run_build, write_config
from train_runs import FINETUNE_LORA, in_fresh_process, make_release_folder, single_process_stage

STEPS, EVERY = 40, 10
KEY = re.compile(r"^transformer\.layers\.\d+\.attention\.(wq|wk|wv|wo)\.lora_[AB]\.weight$")


def write_pictures(folder: Path, count: int = 8) -> Path:
    """`count` 96-px pictures of one 'style' (smooth colour fields with a bright diagonal band), each with a caption
    sidecar."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96] / 95.0
    for i in range(count):
        base = rng.uniform(40, 200, size=3)
        tilt = rng.uniform(-80, 80, size=3)
        picture = base + tilt * (xx[..., None] * np.cos(i) + yy[..., None] * np.sin(i))
        picture[np.abs(xx - yy) < 0.1] = (250, 240, 60)
        Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"a banded gradient in the onegen style, number {i}")
    return folder


@pytest.fixture(scope="module")
def eight_pictures(ray_head, tmp_path_factory):
    """A folder build (64 px, pixel tokenizer) of 8 captioned pictures, as a user builds their own images."""
    root = tmp_path_factory.mktemp("lora_build")
    pictures = write_pictures(root / "pictures")
    config = write_config(root / "build.yaml", root, [{"name": "photos", "type": "folder", "path": str(pictures)}],
                          resolutions=[64], encode={"image_tokenizer": "pixel"})
    ok(run_build(ray_head, config))
    return {"uri": str(root / "data/builds/b"), "root": root}


def lora_overrides(build: dict, release: Path, work: Path, *extra: str) -> list[str]:
    """configs/train/finetune_lora.yaml on this CPU: the tiny preset of the release folder, fp32, one process."""
    return [f"storage.root={work / 'data'}", f"run.work_dir={work}", f"train.data.builds[0].uri={build['uri']}",
            f"model.init={release}", "model.preset=nextdit-tiny", "model.lora.rank=4", "model.lora.alpha=4",
            "model.lora.dropout=0.1",  # peft's dropout draws from torch's global generator: the resume covers it
            "train.precision=fp32", "train.use_gpu=false", "train.cpus_per_worker=1",
            "train.stages[0].resolution=64", f"train.stages[0].steps={STEPS}", f"train.checkpoint_every={EVERY}",
            "train.optimizer.lr=1e-2", "train.optimizer.warmup_steps=0", "train.samples.every=0", *extra]


@pytest.fixture(scope="module")
def lora_run(eight_pictures, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_run")
    release = make_release_folder(root / "release")
    overrides = lora_overrides(eight_pictures, release, root / "work")
    result = in_fresh_process(single_process_stage, overrides, None, str(root / "ckpt"), FINETUNE_LORA)
    return {"overrides": overrides, "result": result, "checkpoints": root / "ckpt", "release": release}


def flow_losses(overrides: list[str], adapter: str, seeds: int = 12) -> dict:
    """The flow-matching loss of the 8 pictures (one text2image batch of the run's data plan, `seeds` fixed draws of
    noise and σ) under the release's transformer, and under the same transformer with the saved adapter loaded by
    diffusers' own loader (PeftAdapterMixin.load_lora_adapter)."""
    from model.lora import LORA_WEIGHTS_NAME
    from model.nextdit import NextDiT
    from onegen.config import load_config
    from onegen.train_config import TrainConfig
    from training.components import flow_config, load_text_encoder, loss_channel_mask
    from training.loop import stage_data
    from training.step import StepRunner, TextEncoding, step_generator

    cfg = load_config(FINETUNE_LORA, ["train.num_workers=1", *overrides], TrainConfig)
    data = stage_data(cfg, 0)
    _, choices = data.plan.batch(data.plan.start())
    batch = data.batch(choices, step_generator(0), sample_latents=False)
    transformer = NextDiT.from_pretrained(Path(cfg.model.init) / "transformer").eval()
    text = TextEncoding.from_encoder(load_text_encoder(cfg, transformer.config.caption_channels, torch.device("cpu")),
                                     torch.device("cpu"))

    def loss() -> float:
        runner = StepRunner(transformer, text, flow_config(cfg.train.flow), channel_mask=loss_channel_mask("pixel"))
        with torch.no_grad():
            return float(np.mean([float(runner.loss(batch, step_generator(1000 + s))[0]) for s in range(seeds)]))

    before = loss()
    transformer.load_lora_adapter(adapter, prefix="transformer", weight_name=LORA_WEIGHTS_NAME, adapter_name="trained")
    return {"before": before, "after": loss(), "pictures": len(batch.prompts)}


def base_after_lora_steps(overrides: list[str], steps: int = 3) -> dict:
    """A LoRA model as run_stage makes it (training.weights.load_transformer, training.engine.make_engine), `steps`
    optimizer steps: are the frozen base weights bit-identical, did the adapter move, what does the optimizer hold."""
    from onegen.config import load_config
    from onegen.train_config import TrainConfig
    from training.components import flow_config, load_text_encoder, loss_channel_mask
    from training.engine import init_distributed, make_engine
    from training.loop import stage_data
    from training.step import StepRunner, TextEncoding, step_generator
    from training.weights import load_transformer

    cfg = load_config(FINETUNE_LORA, ["train.num_workers=1", *overrides], TrainConfig)
    init_distributed()
    data = stage_data(cfg, 0)
    model = load_transformer(cfg, {})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trained = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    engine = make_engine(model, cfg.train, total_steps=steps, per_rank_batch=cfg.train.global_batch_size)
    cpu = torch.device("cpu")
    text = TextEncoding.from_encoder(load_text_encoder(cfg, model.config.caption_channels, cpu), cpu)
    runner = StepRunner(engine, text, flow_config(cfg.train.flow), channel_mask=loss_channel_mask("pixel"))
    cursor = data.plan.start()
    for step in range(steps):
        _, choices = data.plan.batch(cursor)
        runner.step(data.batch(choices, step_generator(step), True), step_generator(step))
        cursor = data.plan.advance(cursor)
    after = dict(engine.module.named_parameters())
    optimizer_elements = sum(p.numel() for group in engine.optimizer.optimizer.param_groups for p in group["params"])
    return {"trained": trained,
            "base_identical": all(torch.equal(after[n].detach(), v) for n, v in before.items() if n not in trained),
            "adapter_moved": [n for n in trained if not torch.equal(after[n].detach(), before[n])],
            "trained_elements": sum(before[n].numel() for n in trained),
            "all_elements": sum(v.numel() for v in before.values()), "optimizer_elements": optimizer_elements}


def test_a_lora_fine_tune_lowers_the_pictures_loss_through_diffusers_loader(lora_run):
    losses = flow_losses(lora_run["overrides"], str(lora_run["checkpoints"] / f"checkpoint_{STEPS:06d}/adapter"))
    assert losses["pictures"] == 8
    assert losses["after"] < 0.95 * losses["before"], losses  # 2.17 -> 2.00 here
    steps = [step for step, _, _ in lora_run["result"]["losses"]]
    assert steps == list(range(1, STEPS + 1)) and lora_run["result"]["checkpoints"] == [10, 20, 30, 40]
    assert {label for _, label, _ in lora_run["result"]["losses"]} == {"text2image"}  # faceid/depth: no rows


def test_only_the_adapter_trains_and_the_base_stays_bit_identical(lora_run, tmp_path):
    found = in_fresh_process(base_after_lora_steps, [*lora_run["overrides"], f"run.work_dir={tmp_path}"])
    assert found["trained"] and all(".lora_A." in n or ".lora_B." in n for n in found["trained"])
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in found["trained"]} == {"wq", "wk", "wv", "wo"}
    assert found["base_identical"]
    assert found["adapter_moved"]  # lora_B starts at zero and moves at the first step
    assert found["optimizer_elements"] == found["trained_elements"] < 0.05 * found["all_elements"]


def test_checkpoints_hold_the_adapter_in_diffusers_convention_and_name_the_base(lora_run):
    from safetensors import safe_open

    release_file = lora_run["release"] / "transformer/diffusion_pytorch_model.safetensors"
    checkpoint = lora_run["checkpoints"] / f"checkpoint_{STEPS:06d}"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter", "base.json", "ds", "state.json"} <= names and "pipeline" not in names
    adapter = checkpoint / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "pytorch_lora_weights.safetensors"]
    weights = adapter / "pytorch_lora_weights.safetensors"
    assert weights.stat().st_size < 0.05 * release_file.stat().st_size
    with safe_open(weights, "pt") as file:
        keys, metadata = list(file.keys()), file.metadata()
        assert all(file.get_tensor(key).dtype == torch.float32 for key in keys)
    assert keys and all(KEY.match(key) for key in keys), [k for k in keys if not KEY.match(k)]
    assert len(keys) == 2 * 4 * 2  # lora_A and lora_B of 4 projections in each of the tiny preset's 2 blocks
    described = json.loads(metadata["lora_adapter_metadata"])
    assert described["transformer.r"] == 4 and sorted(described["transformer.target_modules"]) == ["wk", "wo", "wq",
                                                                                                      "wv"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["peft_type"] == "LORA"

    base = json.loads((checkpoint / "base.json").read_text())
    assert base["uri"] == str(lora_run["release"]) and base["revision"] is None
    assert base["sha256"] == hashlib.sha256(release_file.read_bytes()).hexdigest()
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["base"] == base and state["ema"] is None
    module = torch.load(checkpoint / "ds/mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert module and all(".lora_" in name for name in module)  # DeepSpeed's copy: the adapter, not the frozen base
    with safe_open(weights, "pt") as file:
        assert sum(v.numel() for v in module.values()) == sum(file.get_tensor(k).numel() for k in keys)


def test_a_killed_lora_run_resumes_with_the_same_losses(lora_run, tmp_path):
    resumed = in_fresh_process(single_process_stage, [*lora_run["overrides"], f"run.work_dir={tmp_path / 'work'}"],
                               str(lora_run["checkpoints"] / f"checkpoint_{EVERY:06d}"), str(tmp_path / "ckpt"),
                               FINETUNE_LORA)
    assert resumed["losses"] == lora_run["result"]["losses"][EVERY:]
    from safetensors import safe_open

    name = f"checkpoint_{STEPS:06d}/adapter/pytorch_lora_weights.safetensors"
    # the tensors and the metadata, not the bytes: safetensors writes its metadata map in a per-process hash order
    with safe_open(tmp_path / "ckpt" / name, "pt") as again, safe_open(lora_run["checkpoints"] / name, "pt") as first:
        assert again.metadata() == first.metadata() and sorted(again.keys()) == sorted(first.keys())
        for key in first.keys():
            assert torch.equal(again.get_tensor(key), first.get_tensor(key)), key


def test_a_resume_on_other_base_weights_is_refused_by_the_command_and_the_worker(ray_head, lora_run, tmp_path):
    """The same model.init folder (so the same config) holding other weights: `onegen train` refuses the run's
    checkpoint in one line before any worker starts, and a worker handed it refuses too."""
    import shutil

    from train_runs import run_train

    work = tmp_path / "work"
    runs = work / "data/runs/finetune_lora/lora"
    runs.mkdir(parents=True)
    shutil.copytree(lora_run["checkpoints"] / f"checkpoint_{EVERY:06d}", runs / f"checkpoint_{EVERY:06d}")
    overrides = [*lora_run["overrides"], f"run.work_dir={work}", f"storage.root={work / 'data'}"]
    weights = lora_run["release"] / "transformer/diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    other = make_release_folder(tmp_path / "other", seed=7)
    weights.write_bytes((other / "transformer/diffusion_pytorch_model.safetensors").read_bytes())
    try:
        result = run_train(ray_head, *overrides, config=FINETUNE_LORA)
        assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
        assert "base weights with sha256" in result.stderr and "Traceback" not in result.stderr
        assert "train stage" not in result.stdout + result.stderr  # refused before the worker group
        with pytest.raises(ValueError, match="base weights with sha256"):
            in_fresh_process(single_process_stage, overrides, str(runs / f"checkpoint_{EVERY:06d}"), None,
                             FINETUNE_LORA)
    finally:
        weights.write_bytes(original)


def test_a_later_stages_model_loads_the_previous_stages_adapter_on_the_same_frozen_base(lora_run):
    """training.weights.load_transformer with `previous` (what a LoRA run's later stage gets: the previous stage's
    adapter/ folder)."""
    from safetensors.torch import load_file

    from model.lora import LORA_WEIGHTS_NAME, adapter_state_dict
    from onegen.config import load_config
    from onegen.train_config import TrainConfig
    from train_runs import safetensors_weights
    from training.weights import load_transformer

    cfg = load_config(FINETUNE_LORA, ["train.num_workers=1", *lora_run["overrides"]], TrainConfig)
    adapter = lora_run["checkpoints"] / f"checkpoint_{STEPS:06d}/adapter"
    model = load_transformer(cfg, {}, previous=str(adapter))
    saved = load_file(adapter / LORA_WEIGHTS_NAME)
    loaded = adapter_state_dict(model)
    assert sorted(f"transformer.{name}" for name in loaded) == sorted(saved)
    assert all(torch.equal(loaded[name], saved[f"transformer.{name}"]) for name in loaded)
    assert not all(torch.equal(value, torch.zeros_like(value)) for name, value in loaded.items() if "lora_B" in name)
    base = {name.replace(".base_layer", ""): p for name, p in model.named_parameters() if not p.requires_grad}
    release = safetensors_weights(lora_run["release"] / "transformer")
    assert set(base) == set(release) and all(torch.equal(base[name], release[name]) for name in release)


LORA_ANSWER = r"""
import base64, io, json, sys
import mlflow, numpy as np
from PIL import Image
from model.pipeline import OneDiffusionPipeline
from onegen.pyfunc_model import OneDiffusionModel
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/lora-test@candidate")
request = {"task": "text2image", "prompt": "a banded gradient", "steps": 3, "seed": 0, "height": 64, "width": 64}
tuned = np.asarray(Image.open(io.BytesIO(base64.b64decode(model.predict(request)["images"][0][0]))))
base = OneDiffusionModel()
base.pipe = OneDiffusionPipeline.from_pretrained(sys.argv[2])
plain = np.asarray(Image.open(io.BytesIO(base64.b64decode(base.answer(request)["images"][0]))))
print(json.dumps({"shape": list(tuned.shape), "differs": float(np.abs(tuned.astype(int) - plain).mean())}))
"""


def test_the_command_fine_tunes_through_ray_and_registers_the_adapter_with_its_base(ray_head, eight_pictures,
                                                                                     tmp_path):
    """`onegen train --config configs/train/finetune_lora.yaml --init FOLDER` on 2 Ray Train workers: the final
    adapter becomes a registered version whose tags name its base, and the served model is the base + adapter."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from train_runs import REPO, run_train

    release = make_release_folder(tmp_path / "release")
    work = tmp_path / "work"
    overrides = [o for o in lora_overrides(eight_pictures, release, work, "train.num_workers=2",
                                           "train.stages[0].steps=6", "train.checkpoint_every=3",
                                           "tracking.registered_model=lora-test") if not o.startswith("model.init=")]
    result = run_train(ray_head, *overrides, config=FINETUNE_LORA, extra_args=["--init", str(release)])
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "/adapter   (LoRA" in result.stdout and "registered: models:/lora-test/1" in result.stdout
    final = work / "data/runs/finetune_lora/lora/checkpoint_000006"
    assert (final / "adapter/pytorch_lora_weights.safetensors").is_file() and not (final / "pipeline").exists()

    tracking = f"sqlite:///{work / 'mlflow.db'}"
    version = MlflowClient(tracking).get_model_version_by_alias("lora-test", "candidate")
    base = json.loads((final / "base.json").read_text())
    assert version.tags["onegen.kind"] == "lora" and version.tags["onegen.parent_model"] == str(release)
    assert version.tags["onegen.base_sha256"] == base["sha256"]
    answer = subprocess.run([sys.executable, "-c", LORA_ANSWER, tracking, str(release)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr[-3000:]
    found = json.loads(answer.stdout.strip().splitlines()[-1])
    assert found["shape"] == [64, 64, 3] and found["differs"] > 0  # the adapter changes what the model draws


def test_under_bf16_the_adapter_file_holds_the_float32_masters(lora_run, tmp_path):
    """DeepSpeed's bf16 module holds rounded copies of the adapter; the exported file holds the optimizer's float32
    masters (what the consolidated DeepSpeed checkpoint holds), the frozen base in bf16 never enters it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    overrides = [*lora_run["overrides"], "train.precision=bf16", "train.stages[0].steps=2", "train.checkpoint_every=2",
                 f"run.work_dir={tmp_path / 'work'}"]
    in_fresh_process(single_process_stage, overrides, None, str(tmp_path / "ckpt"), FINETUNE_LORA)
    checkpoint = tmp_path / "ckpt/checkpoint_000002"
    masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
    saved = load_file(checkpoint / "adapter/pytorch_lora_weights.safetensors")
    assert len(saved) == len(masters) == 16
    for name, value in saved.items():
        master = masters[name.removeprefix("transformer.").replace(".lora_A.", ".lora_A.default.")
                         .replace(".lora_B.", ".lora_B.default.")]
        assert value.dtype == torch.float32 and torch.equal(value, master.float()), name
    assert any(not torch.equal(v, v.bfloat16().float()) for v in saved.values())  # not bf16 roundings
