"""Train the NextDiT on a build's latents with Ray Train + DeepSpeed ZeRO, checkpointed, resumed by itself.

    python -m training.launch --config configs/train/tiny.yaml [--set key=value ...]     (= onegen train ...)

The driver checks everything it can before a worker starts (Ray, MLflow and storage reachable; the builds final and
able to feed every required task; an existing run's checkpoints written by this config on this data), opens or
continues the MLflow run, and runs a Ray Train `TorchTrainer` whose workers each run one DeepSpeed engine
(training/loop.py). Checkpoints land in STORAGE_ROOT/runs/RUN/STAGE/checkpoint_STEP/ (Ray Train's storage path is
STORAGE_ROOT/runs/RUN, its run name the stage's): a worker that dies restarts the group from the latest checkpoint
(`train.max_failures`), and running the same command again continues the run where it stopped.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from onegen import errors
from onegen.config import ConfigError, content_hash
from onegen.train_config import TINY_T5, TrainConfig

CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


@dataclass
class TrainSummary:
    run: str
    stage: str
    steps: int
    checkpoint: str | None
    mlflow: list[str]  # where to see the MLflow run (onegen.tracking.run_location's lines)
    loss: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"run {self.run}, stage {self.stage}: {self.steps} steps",
                 f"  final loss: {self.loss:.4f}" if self.loss is not None else "  final loss: (no step run)",
                 f"  checkpoint: {self.checkpoint}",
                 *([f"  pipeline:   {self.checkpoint}/pipeline   (the EMA weights, release layout)"]
                   if self.checkpoint else []),
                 f"  mlflow:     {self.mlflow[0]}",
                 *[f"              {line}" for line in self.mlflow[1:]], f"  seconds:    {self.seconds:.0f}"]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def runs_prefix(cfg: TrainConfig) -> str:
    return f"runs/{cfg.run.name}"


def latest_checkpoint(cfg: TrainConfig, stage: str) -> tuple[str, dict] | None:
    """(URI, state) of the newest checkpoint of a stage of this run, or None: the one Ray Train registered last (its
    controller's snapshot names it once every rank's files are in storage; it is also what Ray restores from), else,
    without a snapshot, the newest folder holding a state.json."""
    import json

    from onegen.storage import Storage
    from training.loop import STATE_FILE

    storage = Storage(cfg.storage.root)
    prefix = f"{runs_prefix(cfg)}/{stage}"
    try:
        snapshot = json.loads(storage.read_bytes(f"{prefix}/{RAY_TRAIN_SNAPSHOT}"))
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        return storage.uri(f"{prefix}/{name}"), json.loads(storage.read_bytes(f"{prefix}/{name}/{STATE_FILE}"))
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # no snapshot (yet), or one this code cannot read
        pass
    found = []
    for rel in storage.list(prefix, recursive=True):
        parts = rel.split("/")
        match = CHECKPOINT_DIR.match(parts[-2]) if len(parts) >= 2 and parts[-1] == STATE_FILE else None
        if match:
            found.append((int(match.group(1)), "/".join(parts[:-1])))
    if not found:
        return None
    _, folder = max(found)
    return storage.uri(folder), json.loads(storage.read_bytes(f"{folder}/{STATE_FILE}"))


def _as_config_error(err: Exception) -> ConfigError:
    return ConfigError([line for line in str(err).splitlines() if line.strip()])


def run_train(cfg: TrainConfig) -> TrainSummary:
    from onegen.preflight import check_run_targets

    check_run_targets(cfg)
    if len(cfg.train.stages) > 1:
        raise ConfigError([f"train.stages: {len(cfg.train.stages)} stages; this trainer runs one stage per config "
                           "(stages after the first come with the paper's stage schedule); keep stages[0]"])
    from training.loop import ResumeError, check_resumable, stage_data
    from training.reader import DataPlanError

    stage = cfg.train.stages[0]
    with errors.step("plan the data", input=", ".join(ref.uri for ref in cfg.train.data.builds)):
        try:
            data = stage_data(cfg, 0)
        except (DataPlanError, FileNotFoundError) as err:
            raise _as_config_error(err) from None
    from training.weights import check_model_sources, resumed_sources

    with errors.step("check the model's weights", input=f"model.init={cfg.model.init}, "
                                                        f"model.text_encoder={cfg.model.text_encoder_source}"):
        sources = check_model_sources(cfg, data.image_tokenizer)
    check_export_tokenizer(data.image_tokenizer)
    if cfg.model.text_encoder_source == TINY_T5:
        from model.presets import PRESETS
        from training.components import tiny_t5_folder

        with errors.step("build the tiny T5", input=f"run.work_dir={cfg.run.work_dir}"):
            tiny_t5_folder(cfg, PRESETS[cfg.model.preset]["caption_channels"])
    latest = latest_checkpoint(cfg, stage.name)
    if latest is not None:
        try:
            check_resumable(latest[1], cfg, data, cfg.train.num_workers)
        except ResumeError as err:
            raise _as_config_error(err) from None
        sources = resumed_sources(latest[1], sources)
        if latest[1]["step"] >= stage.steps:
            ran = [f"run {latest[1].get('mlflow_run_id')}"]
            return TrainSummary(cfg.run.name, stage.name, stage.steps, latest[0], ran,
                                notes=["already trained: nothing to do (a new run.name trains again)"])
    return _fit(cfg, stage, data, latest, sources)


def check_export_tokenizer(identity: str) -> None:
    """Every checkpoint's pipeline/ holds the builds' image tokenizer: load it here, before any worker starts, so a
    VAE folder that only the build machine had, or a hub id out of reach, fails now in one line."""
    from training.components import export_image_tokenizer

    try:
        export_image_tokenizer(identity)
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError([f"train.data.builds: the builds' image tokenizer {identity!r} (recorded in their rows) "
                           f"cannot be loaded here ({errors.first_line(err)}); every checkpoint's pipeline/ "
                           "includes it, so make that folder or hub id reachable from this machine and the "
                           "workers"]) from None


def _fit(cfg: TrainConfig, stage, data, latest, sources: dict) -> TrainSummary:
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from onegen.raycluster import init_ray
    from onegen.tracking import dataset_input, run_location, start_run, tracking_uri
    from training.loop import train_worker

    started = time.perf_counter()
    run_id = latest[1].get("mlflow_run_id") if latest else None
    with start_run(cfg, run_name=cfg.run.name, run_id=run_id) as active:
        if run_id is None:
            mlflow.log_dict({"builds": data.digests, "content_hash": content_hash(cfg), "notes": data.notes,
                             "weights": {"init": cfg.model.init, "text_encoder": cfg.model.text_encoder_source,
                                         "revisions": sources}}, "data/builds.json")
            for build, digest in zip(data.builds, data.digests, strict=True):
                mlflow.log_input(dataset_input(build.uri, build.name, digest["manifest_digest"]), context="train")
        else:
            print(f"continuing run {cfg.run.name} from {latest[0]} (step {latest[1]['step']}), MLflow run {run_id}")
        init_ray(cfg)
        train = cfg.train
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "stage": 0, "sources": sources,
                               "mlflow_run_id": active.info.run_id},
            torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                         resources_per_worker={"CPU": train.cpus_per_worker}),
            run_config=RunConfig(name=stage.name, storage_path=_storage_uri(cfg, runs_prefix(cfg)),
                                 failure_config=FailureConfig(max_failures=train.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints)))
        with errors.step(f"train stage {stage.name}", input=f"{cfg.run.name}: {stage.steps} steps on "
                                                            f"{train.num_workers} workers"):
            result = trainer.fit()
        metrics = result.metrics or {}
        checkpoint = result.checkpoint.path if result.checkpoint else None
        where = run_location(tracking_uri(cfg), active.info.experiment_id, active.info.run_id)
    return TrainSummary(cfg.run.name, stage.name, stage.steps, checkpoint, where, metrics.get("loss"),
                        time.perf_counter() - started, list(data.notes))


def _storage_uri(cfg: TrainConfig, rel: str) -> str:
    from onegen.storage import Storage

    uri = Storage(cfg.storage.root).uri(rel)
    return uri[len("file://"):] if uri.startswith("file://") else uri


if __name__ == "__main__":  # the job's own entry point sits on top, like onegen.cli, and may call it
    import sys

    from onegen.cli.train import main

    sys.exit(main())
