"""One stage of training on one rank: data plan, model, engine, steps, checkpoints. Ray Train runs `train_worker` on
every worker (training/launch.py); `run_stage` itself takes plain callbacks, so it also runs without Ray.

Checkpoint folder (INTERFACES §3), what `save` receives every `checkpoint_every` steps and at the end:

    ds/            DeepSpeed's state (model, ZeRO optimizer shards, LR schedule), engine.save_checkpoint(tag="ds")
    pipeline/      the EMA weights in the release layout (training/ema.py): OneDiffusionPipeline.from_pretrained
    state.json     step, data cursor, RNG scheme, builds' manifest digests, content hash, MLflow run ids (the job's
                   and the stage's), world size, the EMA's step count, the weights the stage started from, the
                   realised mixture so far (steps by task, samples by source, bucket and frame count)

A LoRA run (model.lora) trains only the adapter of a frozen base and checkpoints only that: ds/ without the frozen
parameters (the adapter and its optimizer state), adapter/ (diffusers' pytorch_lora_weights.safetensors + peft's
adapter_config.json: model/lora.py) and base.json (the base's URI, pinned commit and sha256) instead of pipeline/;
no EMA. A resume loads the same base (refused if its sha256 changed) and the adapter from ds/.

Resuming loads both and continues at the next step: the plan's batch and every random draw of a step are functions of
(seed, stage, step, rank), so the losses after a resume equal an uninterrupted run's, step for step.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from onegen.dataset import Build, open_build
from onegen.train_config import TrainConfig
from training.reader import Cursor, DataPlan, DataPlanError, index_rows, rank_share

STATE_FILE = "state.json"
STATE_SCHEMA = "onegen.train_state/3"
PIPELINE_DIR = "pipeline"
ADAPTER_DIR = "adapter"
BASE_FILE = "base.json"
DS_TAG = "ds"
RNG_SCHEME = "per step and rank: SeedSequence([run.seed, stage index, step, rank]) (training.step.step_seed); " \
             "torch's global generators: SeedSequence([run.seed, stage index, step, rank, 1])"
GLOBAL_RNG_STREAM = 1


class ResumeError(ValueError):
    """A checkpoint that this config cannot continue (another config, other data, another worker count)."""


@dataclass
class StageData:
    builds: list[Build]
    plan: DataPlan
    digests: list[dict]
    image_tokenizer: str
    notes: list[str]

    def batch(self, choices: list, generator: torch.Generator, sample_latents: bool):
        """The ViewBatch of the plan's `choices`: each row read from its shard, made a sample (its task's views and
        prompt; latents drawn from the posterior with `generator` when `sample_latents`, else its mean), stacked."""
        from model.views import stack
        from training.samples import make_sample

        rows = self.plan.rows
        return stack([make_sample(self.builds[rows[c.row].build].row(rows[c.row].shard, rows[c.row].index), c,
                                  self.plan.mixture[c.item].task, generator, sample_latents) for c in choices])


def open_builds(cfg: TrainConfig) -> list[Build]:
    """The configured builds, final ones only (DataPlanError naming an unfinished one)."""
    builds = []
    for ref in cfg.train.data.builds:
        build = open_build(ref.uri, storage_root=cfg.storage.root)
        if not build.complete:
            raise DataPlanError(f"train.data.builds: {build.uri} is not final (no manifest/_final.json): the trainer "
                                "trains only on finished builds; rerun its `onegen build` to finish it")
        builds.append(build)
    return builds


def stage_data(cfg: TrainConfig, stage_index: int) -> StageData:
    """The builds (final ones only), their rows at the stage's resolutions and the stage's data plan. Raises
    DataPlanError naming what is missing; the driver calls it before starting workers, every worker again."""
    stage = cfg.train.stages[stage_index]
    builds = open_builds(cfg)
    rows = index_rows(builds, stage.resolutions)
    if not rows:
        wanted = ", ".join(map(str, stage.resolutions))
        raise DataPlanError(f"stage {stage.name}: the builds have no train rows at resolution {wanted} "
                            f"({', '.join(b.uri for b in builds)}); build that resolution or change the stage's")
    plan = DataPlan(rows, stage.mixture, seed=cfg.run.seed, stage=stage_index,
                    global_batch=cfg.train.global_batch_size, resolution=stage.resolution,
                    build_weights=[ref.weight for ref in cfg.train.data.builds],
                    build_names=[build.name for build in builds])
    refusals, notes = plan.problems()
    if refusals:
        raise DataPlanError("\n".join(f"stage {stage.name}: {line}" for line in refusals))
    tokenizers = sorted({row.image_tokenizer for row in rows})
    if len(tokenizers) != 1:
        raise DataPlanError(f"train.data.builds: the builds were encoded with different image tokenizers "
                            f"({', '.join(tokenizers)}); train on builds of one tokenizer")
    digests = [{"uri": b.uri, "manifest_digest": b.manifest_digest()} for b in builds]
    return StageData(builds, plan, digests, tokenizers[0], notes)


def read_state(folder: str | Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def check_resumable(state: dict, cfg: TrainConfig, digests: list[dict], world_size: int,
                    base: dict | None = None) -> None:
    """Refuse a checkpoint this run cannot continue exactly (digests: the builds' manifest digests; base: a LoRA
    run's base identity now, training.weights.base_identity)."""
    if state.get("schema") != STATE_SCHEMA:
        raise ResumeError(f"run {cfg.run.name}: its checkpoints are {state.get('schema')}, this trainer writes "
                          f"{STATE_SCHEMA} (another data cursor before it); start a new run.name")
    expected = cfg.stage_content_hash(int(state.get("stage_index", 0)))
    if state.get("content_hash") != expected or state.get("stage") not in [s.name for s in cfg.train.stages]:
        raise ResumeError(f"run {cfg.run.name}: its checkpoints were written with another config (content hash "
                          f"{state.get('content_hash')}, this config {expected}); start a new run.name or "
                          "restore the config")
    if state.get("builds") != digests:
        raise ResumeError(f"run {cfg.run.name}: its checkpoints were trained on other data ({state.get('builds')}); "
                          "train on the same builds or start a new run.name")
    if state.get("base") and base is not None and state["base"]["sha256"] != base["sha256"]:
        raise ResumeError(f"run {cfg.run.name}: its adapter was trained on base weights with sha256 "
                          f"{state['base']['sha256'][:12]}..., model.init={cfg.model.init} now has "
                          f"{base['sha256'][:12]}...; restore those weights or start a new run.name")
    if state.get("world_size") != world_size:
        raise ResumeError(f"run {cfg.run.name}: checkpoint written by {state.get('world_size')} ranks, resumed on "
                          f"{world_size}; ZeRO optimizer shards follow the rank count, so resume with "
                          f"train.num_workers={state.get('world_size')} (resharding a checkpoint is not supported yet)")


def run_stage(cfg: TrainConfig, stage_index: int, *, rank: int, world_size: int, device: torch.device,
              restore: str | None, save: Callable[[str, dict, int], None],
              log: Callable[[dict, int], None], mlflow_run_id: str | None = None,
              process_group=None, sources: dict | None = None, previous: str | None = None,
              previous_uri: str | None = None, mlflow_parent_run_id: str | None = None,
              log_image: Callable[[object, str], None] | None = None) -> dict:
    """Train stage `stage_index` on this rank from `restore` (a checkpoint folder or None) to its last step.

    save(folder, metrics, step): hand a written checkpoint folder on (every rank calls it with its own folder);
    log(metrics, step): per-step metrics (called on rank 0 only); sources: the commits the driver pinned hub ids
    to (training.weights.check_model_sources); previous: where a later stage's starting weights are, downloaded
    from previous_uri (the previous stage's final checkpoint): its pipeline/ (the EMA), or with stage.start_from
    "model" the checkpoint folder (its ds/ consolidated), or in a LoRA run its adapter/; None on a resume;
    log_image(image, artifact_path): where rank 0's sample grids go (training/sample_grid.py; None: no grids).
    Returns the last step's metrics."""
    import torch.distributed as dist

    from training.components import export_image_tokenizer, flow_config, load_text_encoder, loss_channel_mask
    from training.ema import EmaWeights
    from training.engine import make_engine
    from training.reader import count_step
    from training.step import StepRunner, TextEncoding, step_generator, step_seed
    from model.lora import save_adapter
    from onegen.storage import folder_into_place
    from training.weights import base_identity, load_transformer

    stage = cfg.train.stages[stage_index]
    data = stage_data(cfg, stage_index)
    for note in data.notes if rank == 0 else ():
        say(f"[{stage.name}] {note}")
    per_rank = cfg.train.global_batch_size // world_size
    sources = sources or {}
    model = load_transformer(cfg, sources, previous=previous, start_from=stage.start_from)
    if cfg.train.activation_checkpointing:
        model.enable_gradient_checkpointing()
    patch = int(model.config.patch_size[-1])
    text_encoder = load_text_encoder(cfg, model.config.caption_channels, device, sources)
    bf16 = cfg.train.precision == "bf16"
    masters = cfg.train.zero_stage == 3 or bf16
    lora = cfg.model.lora is not None
    ema = None if lora else EmaWeights(model, cfg.train.ema, keep=rank == 0, masters=masters).to(device)
    base = base_identity(cfg, sources) if lora and rank == 0 else None
    image_tokenizer = export_image_tokenizer(data.image_tokenizer) if rank == 0 else None
    engine = make_engine(model, cfg.train, total_steps=stage.steps, per_rank_batch=per_rank)
    runner = StepRunner(engine, TextEncoding.from_encoder(text_encoder, device), flow_config(cfg.train.flow),
                        channel_mask=loss_channel_mask(data.image_tokenizer), device=device,
                        model_dtype=torch.bfloat16 if bf16 else None)
    group = process_group if process_group is not None else (dist.group.WORLD if dist.is_initialized() else None)
    weights = (lambda: engine.module) if lora else ema.transformer  # what the sample grids sample with
    grids = _SampleGrids(cfg, stage, data, image_tokenizer, text_encoder, weights, device, log_image) \
        if rank == 0 and log_image is not None else None

    step, cursor, counts = 0, data.plan.start(), {}
    if restore is not None:
        state = read_state(restore)
        check_resumable(state, cfg, data.digests, world_size, base)
        engine.load_checkpoint(restore, tag=DS_TAG, load_module_strict=not lora)  # LoRA: no frozen base in ds/
        if ema is not None:
            ema.restore(Path(restore) / PIPELINE_DIR, state["ema"])
        step, cursor, counts = int(state["step"]), Cursor.from_dict(state["cursor"]), state["mixture"]
        if rank == 0:
            say(f"[{stage.name}] resumed from {restore} at step {step}")

    def checkpoint(metrics: dict) -> None:
        folder = tempfile.mkdtemp(prefix=f"onegen-ckpt-{rank}-")
        try:
            engine.save_checkpoint(folder, tag=DS_TAG, client_state={"step": step}, exclude_frozen_parameters=lora)
            adapter = adapter_tensors(engine.module, masters) if lora else None  # every rank: may be a collective
            if rank == 0:
                state = {"schema": STATE_SCHEMA, "run": cfg.run.name, "stage": stage.name, "stage_index": stage_index,
                         "step": step, "steps": stage.steps, "cursor": cursor.to_dict(),
                         "rng": {"seed": cfg.run.seed, "scheme": RNG_SCHEME},
                         "content_hash": cfg.stage_content_hash(stage_index),
                         "builds": data.digests, "mlflow_run_id": mlflow_run_id,
                         "mlflow_parent_run_id": mlflow_parent_run_id, "world_size": world_size,
                         "ema": ema.state() if ema is not None else None, "mixture": counts, "base": base,
                         "start": {"stage": cfg.train.stages[stage_index - 1].name, "weights": stage.start_from,
                                   "uri": previous_uri} if previous_uri else None,
                         "init": {"uri": cfg.model.init, "revision": sources.get("init")},
                         "text_encoder": {"uri": cfg.model.text_encoder_source,
                                          "revision": sources.get("text_encoder")}}
                if lora:
                    with folder_into_place(Path(folder) / ADAPTER_DIR) as scratch:
                        save_adapter(engine.module, scratch, tensors=adapter)
                    (Path(folder) / BASE_FILE).write_text(json.dumps(base, indent=1) + "\n")
                else:
                    ema.export(Path(folder) / PIPELINE_DIR, image_tokenizer, text_encoder)
                # last: a folder without it is no checkpoint (training.launch.latest_checkpoint's fallback scan)
                (Path(folder) / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            save(folder, metrics, step)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    metrics: dict = {"step": step}
    engine.train()
    started, first_step = time.perf_counter(), step
    while step < stage.steps:
        t0 = time.perf_counter()
        key, choices = data.plan.batch(cursor)
        label = data.plan.label(key)
        seed = step_seed(cfg.run.seed, stage_index, step, rank)
        # torch's global generators (peft's LoRA dropout draws there): per step, resumable, independent of the step's
        torch.manual_seed(step_seed(cfg.run.seed, stage_index, step, rank, stream=GLOBAL_RNG_STREAM))
        cpu_generator = step_generator(seed)
        batch = data.batch(rank_share(choices, rank, world_size), cpu_generator, cfg.train.data.latents == "sample")
        generator = cpu_generator if device.type == "cpu" else step_generator(seed, device)
        loaded = time.perf_counter() - t0  # reading and assembling the batch: the step's wait for data
        result = runner.step(batch, generator, group)
        if ema is not None:
            ema.step(engine.module)
        seconds = time.perf_counter() - t0
        step += 1
        counts = count_step(counts, data.plan, key, choices)
        cursor = data.plan.advance(cursor)
        views, height, width = batch.latents.shape[1], batch.latents.shape[-2], batch.latents.shape[-1]
        tokens = cfg.train.global_batch_size * views * -(-height // patch) * -(-width // patch)
        metrics = {"train/loss": result["loss"], f"train/loss/{label}": result["loss"], "train/lr": result["lr"],
                   "train/grad_norm": result["grad_norm"], "train/step_seconds": seconds,
                   "train/samples_per_s": cfg.train.global_batch_size / seconds, "train/tokens_per_s": tokens / seconds,
                   "train/data_wait_fraction": loaded / seconds}
        if ema is not None:
            metrics["train/ema_decay"] = ema.decay()
        if rank == 0:
            log(metrics, step)
            if step % 10 == 0 or step == stage.steps:
                rate = (time.perf_counter() - started) / max(1, step - first_step)
                say(f"[{stage.name}] step {step}/{stage.steps} loss {result['loss']:.4f} ({label}) "
                    f"lr {result['lr']:.2e} {rate:.2f} s/step")
        if grids is not None and (step == stage.steps or (cfg.train.samples.every and
                                                          step % cfg.train.samples.every == 0)):
            grids.log(step)
        if step % cfg.train.checkpoint_every == 0 or step == stage.steps:
            checkpoint({"step": step, "loss": result["loss"]})
    return metrics


def adapter_tensors(module: torch.nn.Module, masters: bool) -> dict[str, torch.Tensor]:
    """The trained (adapter) parameters by name: the module's own, or with `masters` (bf16) the optimizer's float32
    masters, each assembled by deepspeed.utils.safe_get_full_fp32_param (a collective: every rank calls this)."""
    from training.ema import EmaWeights

    trained = [(name, param) for name, param in module.named_parameters() if param.requires_grad]
    if not masters:
        return {name: param.detach() for name, param in trained}
    import deepspeed

    return {name: EmaWeights.full_master(param, deepspeed) for name, param in trained}


class _SampleGrids:
    """Rank 0's sample grids of a stage: one fixed example per drawn task, sampled with `weights()`: the EMA's own
    tensors, or in a LoRA run the training module itself (in eval mode while it samples: no adapter dropout)."""

    def __init__(self, cfg: TrainConfig, stage, data: StageData, image_tokenizer, text_encoder,
                 weights: Callable[[], torch.nn.Module], device, log_image: Callable[[object, str], None]):
        from training.sample_grid import pick_examples

        self.cfg, self.stage, self.log_image = cfg, stage, log_image
        self.parts = (image_tokenizer, text_encoder, weights, device)
        self.examples = pick_examples(data.plan, data.builds, image_tokenizer)

    def log(self, step: int) -> None:
        from model.pipeline import OneDiffusionPipeline
        from training.sample_grid import artifact_path, sample_grid

        image_tokenizer, text_encoder, weights, device = self.parts
        started = time.perf_counter()
        transformer = weights()
        training = transformer.training
        pipe = OneDiffusionPipeline(transformer.eval(), image_tokenizer, text_encoder).to(device)
        samples = self.cfg.train.samples
        try:
            with torch.random.fork_rng(devices=[]):  # sampling draws nothing from the training stream
                for example in self.examples:
                    image = sample_grid(pipe, example, steps=samples.steps, guidance_scale=samples.guidance_scale,
                                        seed=self.cfg.run.seed)
                    self.log_image(image, artifact_path(self.stage.name, step, example.label))
        finally:
            transformer.train(training)
        say(f"[{self.stage.name}] step {step}: {len(self.examples)} sample grids in "
            f"{time.perf_counter() - started:.1f} s (MLflow artifacts samples/{self.stage.name}/step_{step:06d}/)")


def say(message: str) -> None:
    """A progress line on the process's real stdout: Ray Train patches `print` in workers to write both there and to
    its logger's console handler, which shows every line twice in the driver's output."""
    print(message, file=sys.__stdout__ or sys.stdout, flush=True)


def train_worker(config: dict) -> None:
    """The Ray Train worker function (TorchTrainer's train_loop_per_worker)."""
    import ray.train

    from onegen.tracking import MetricsLogger
    from training.engine import init_distributed

    cfg = TrainConfig.model_validate(config["cfg"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    init_distributed()
    logger = MetricsLogger(cfg.tracking.uri, config["mlflow_run_id"], every=cfg.train.log_every) if rank == 0 \
        else None

    def save(folder: str, metrics: dict, step: int) -> None:
        if logger is not None:
            logger.flush()  # what a checkpoint covers is in MLflow before the checkpoint exists
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")

    checkpoint = ray.train.get_checkpoint()
    previous_uri = config.get("previous")
    # the previous stage's final weights, wherever storage.root is (a local folder as is, S3 downloaded): only its
    # pipeline/ (the whole checkpoint for start_from=model; a LoRA run's adapter/), and only when this stage starts (a
    # resume restores its own weights)
    stage = cfg.train.stages[config["stage"]]
    start = ADAPTER_DIR if cfg.model.lora is not None else None if stage.start_from == "model" else PIPELINE_DIR
    previous = ray.train.Checkpoint(f"{previous_uri}/{start}" if start else previous_uri) \
        if previous_uri and checkpoint is None else None
    try:
        with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as folder, \
                previous.as_directory() if previous is not None else contextlib.nullcontext() as previous_folder:
            run_stage(cfg, config["stage"], rank=rank, world_size=world_size, device=device, restore=folder,
                      save=save, log=logger.log if logger else _ignore, mlflow_run_id=config["mlflow_run_id"],
                      sources=config.get("sources"), previous=previous_folder, previous_uri=previous_uri,
                      mlflow_parent_run_id=config.get("mlflow_parent_run_id"),
                      log_image=logger.log_image if logger else None)
    except BaseException:
        if logger is not None:  # what it can of the steps before the failure, without hiding the failure
            try:
                logger.flush()
            except Exception as err:  # noqa: BLE001 - the training error is the one to raise
                say(f"MLflow: the last metrics could not be written ({type(err).__name__}: {err})")
        raise
    if logger is not None:
        logger.flush()


def _ignore(metrics: dict, step: int) -> None:
    pass


__all__ = ["ADAPTER_DIR", "BASE_FILE", "DS_TAG", "PIPELINE_DIR", "ResumeError", "STATE_FILE", "StageData",
           "adapter_tensors", "check_resumable", "open_builds", "read_state", "run_stage", "stage_data",
           "train_worker"]
