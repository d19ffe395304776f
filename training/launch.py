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
from pathlib import Path

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
    lora: bool = False

    def table(self) -> str:
        weights = f"  adapter:    {self.checkpoint}/adapter   (LoRA, diffusers' pytorch_lora_weights.safetensors; " \
                  "its base in base.json)" if self.lora else \
                  f"  pipeline:   {self.checkpoint}/pipeline   (the EMA weights, release layout)"
        lines = [f"run {self.run}, stage {self.stage}: {self.steps} steps",
                 f"  final loss: {self.loss:.4f}" if self.loss is not None else "  final loss: (no step run)",
                 f"  checkpoint: {self.checkpoint}", *([weights] if self.checkpoint else []),
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


def run_train(cfg: TrainConfig) -> list[TrainSummary]:
    """Train every stage of `cfg` in order, each from the previous one's final checkpoint (stage.start_from),
    under one MLflow parent run with a child run per stage. A stage already trained to its last step is skipped, a
    stage with checkpoints continues from its latest. Everything checkable is checked before the first worker
    starts: every stage's mixture against the builds' manifests, the first stage's data plan, the weights."""
    from onegen.preflight import check_run_targets

    check_run_targets(cfg)
    from training.loop import ResumeError, check_resumable, open_builds
    from training.reader import DataPlanError, manifest_problems

    with errors.step("check the stages against the builds' manifests", input=_builds_input(cfg)):
        try:
            builds = open_builds(cfg)
            refusals = [line for stage in cfg.train.stages
                        for line in manifest_problems(builds, stage, cfg.train.global_batch_size)[0]]
        except (DataPlanError, FileNotFoundError) as err:
            raise _as_config_error(err) from None
    if refusals:
        raise ConfigError(refusals)
    data = _plan_stage(cfg, 0)
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
    latest = [latest_checkpoint(cfg, stage.name) for stage in cfg.train.stages]
    base = None
    if cfg.model.lora is not None and any(latest) and Path(cfg.model.init).is_dir():
        # a local base can change under the run (a hub commit or a registered version cannot): its adapters (a
        # stage to resume, or a finished one a later stage starts from) were trained on the weights base.json names
        from training.weights import base_identity

        with errors.step("check the LoRA base against the run's checkpoints", input=f"model.init={cfg.model.init}"):
            base = base_identity(cfg, sources)
    for found in latest:
        if found is not None:
            try:
                check_resumable(found[1], cfg, data.digests, cfg.train.num_workers, base)
            except ResumeError as err:
                raise _as_config_error(err) from None
    first = next((found[1] for found in latest if found is not None), None)
    if first is not None:
        sources = resumed_sources(first, sources)
    return _fit_stages(cfg, data, latest, sources, first.get("mlflow_parent_run_id") if first else None)


def _builds_input(cfg: TrainConfig) -> str:
    return ", ".join(ref.uri for ref in cfg.train.data.builds)


def _plan_stage(cfg: TrainConfig, index: int):
    """training.loop.stage_data on the driver, its refusals as one-line ConfigErrors."""
    from training.loop import stage_data
    from training.reader import DataPlanError

    with errors.step(f"plan the data of stage {cfg.train.stages[index].name}", input=_builds_input(cfg)):
        try:
            return stage_data(cfg, index)
        except (DataPlanError, FileNotFoundError) as err:
            raise _as_config_error(err) from None


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


def _fit_stages(cfg: TrainConfig, data, latest: list, sources: dict, parent_id: str | None) -> list[TrainSummary]:
    import mlflow

    from onegen.tracking import dataset_input, start_run

    summaries: list[TrainSummary] = []
    with start_run(cfg, run_name=cfg.run.name, run_id=parent_id, tags={"onegen.kind": "train"}) as parent:
        if parent_id is None:
            mlflow.log_dict({"builds": data.digests, "content_hash": content_hash(cfg),
                             "stages": [stage.name for stage in cfg.train.stages],
                             "weights": {"init": cfg.model.init, "text_encoder": cfg.model.text_encoder_source,
                                         "revisions": sources}}, "data/builds.json")
            for build, digest in zip(data.builds, data.digests, strict=True):
                mlflow.log_input(dataset_input(build.uri, build.name, digest["manifest_digest"]), context="train")
        else:
            print(f"continuing run {cfg.run.name} (MLflow run {parent_id})")
        previous: str | None = None
        for index, stage in enumerate(cfg.train.stages):
            final = latest[index]
            if final is not None and final[1]["step"] >= stage.steps:
                summaries.append(TrainSummary(cfg.run.name, stage.name, stage.steps, final[0],
                                              [f"run {final[1].get('mlflow_run_id')}"],
                                              notes=["already trained: nothing to do (a new run.name trains again)"],
                                              lora=cfg.model.lora is not None))
            else:
                stage_data = data if index == 0 else _plan_stage(cfg, index)
                if stage_data.image_tokenizer != data.image_tokenizer:
                    raise ConfigError([f"stage {stage.name}: its rows were encoded with {stage_data.image_tokenizer},"
                                       f" stage {cfg.train.stages[0].name}'s with {data.image_tokenizer}; every "
                                       "stage must train on latents of one image tokenizer"])
                if index and previous is None and final is None:
                    raise RuntimeError(f"stage {stage.name}: stage {cfg.train.stages[index - 1].name} left no final "
                                       "checkpoint to start from")
                summary, final = _fit(cfg, index, stage_data, final, sources, parent, previous)
                summaries.append(summary)
            previous = final[0] if final is not None else None
        if final is not None and final[1]["step"] >= cfg.train.stages[-1].steps:
            summaries[-1].notes.append(register_candidate(cfg, parent.info.run_id, final, data.digests, sources))
    return summaries


def register_candidate(cfg: TrainConfig, run_id: str, final: tuple[str, dict], digests: list[dict],
                       sources: dict) -> str:
    """Log the last stage's final pipeline/ (the EMA weights; a LoRA run: its adapter/ with base.json) as the job
    run's pyfunc model and register it under tracking.registered_model with the alias `candidate` and lineage tags;
    once per final checkpoint (a rerun of a finished job finds its version and sets the alias again, in case the job
    died between the two; a job grown by a stage registers its new final pipeline). Returns the summary line."""
    import json
    import shutil
    import tempfile

    from mlflow import MlflowClient
    from ray.train import Checkpoint

    from onegen.registry import (ADAPTER_ARTIFACT, CANDIDATE_ALIAS, PIPELINE_ARTIFACT, is_model_uri,
                                 log_pipeline_model, parse_model_uri)
    from onegen.tracking import tracking_uri
    from training.loop import ADAPTER_DIR, BASE_FILE, PIPELINE_DIR

    name = cfg.tracking.registered_model
    client = MlflowClient(tracking_uri(cfg), registry_uri=tracking_uri(cfg))
    found = [int(v.version) for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
             if v.tags.get("onegen.checkpoint") == final[0]]
    if found:
        client.set_registered_model_alias(name, CANDIDATE_ALIAS, str(max(found)))
        return f"registered before: models:/{name}/{max(found)} (alias {CANDIDATE_ALIAS})"
    init = cfg.model.init
    if init and sources.get("init"):  # the commit or registered version the run pinned it to
        init = f"models:/{parse_model_uri(init)[0]}/{sources['init']}" if is_model_uri(init) else \
            f"{init}@{sources['init']}"
    tags = {"onegen.run": cfg.run.name, "onegen.builds": json.dumps(digests), "onegen.content_hash": content_hash(cfg),
            "onegen.parent_model": init or f"none (model.preset {cfg.model.preset}, seed {cfg.run.seed})",
            "onegen.stages": ",".join(stage.name for stage in cfg.train.stages), "onegen.checkpoint": final[0]}
    if cfg.model.lora is not None:
        base = final[1]["base"]
        tags.update({"onegen.kind": "lora", "onegen.base_sha256": base["sha256"],
                     "onegen.lora": json.dumps(cfg.model.lora.model_dump(mode="json"))})
        with errors.step("register the trained adapter", input=f"{final[0]}/{ADAPTER_DIR} as {name}"), \
                tempfile.TemporaryDirectory(prefix="onegen-adapter-") as scratch:
            folder = Path(scratch) / ADAPTER_ARTIFACT  # adapter/ and its base.json: what the pyfunc loads
            with Checkpoint(_storage_path(f"{final[0]}/{ADAPTER_DIR}")).as_directory() as adapter:
                shutil.copytree(adapter, folder)
            (folder / BASE_FILE).write_text(json.dumps(base, indent=1) + "\n")  # = the checkpoint's base.json
            version = log_pipeline_model(folder, name=name, tracking_uri=tracking_uri(cfg), alias=CANDIDATE_ALIAS,
                                         tags=tags, artifact=ADAPTER_ARTIFACT)
        return f"registered: models:/{name}/{version} (alias {CANDIDATE_ALIAS}; a LoRA adapter on " \
            f"{tags['onegen.parent_model']})"
    with errors.step("register the trained pipeline", input=f"{final[0]}/{PIPELINE_DIR} as {name}"):
        with Checkpoint(_storage_path(f"{final[0]}/{PIPELINE_DIR}")).as_directory() as folder:  # pipeline/ only
            version = log_pipeline_model(folder, name=name, tracking_uri=tracking_uri(cfg), alias=CANDIDATE_ALIAS,
                                         tags=tags, artifact=PIPELINE_ARTIFACT)
    return f"registered: models:/{name}/{version} (alias {CANDIDATE_ALIAS}; load it with " \
           f"mlflow.pyfunc.load_model('models:/{name}@{CANDIDATE_ALIAS}'))"


def _fit(cfg: TrainConfig, index: int, data, latest, sources: dict, parent,
         previous: str | None) -> tuple[TrainSummary, tuple[str, dict] | None]:
    """Train stage `index` on a Ray Train worker group from `latest` (its newest checkpoint) or from the start, in its
    MLflow child run; (its summary, its final checkpoint's (URI, state))."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from onegen.raycluster import init_ray
    from onegen.tracking import run_location, start_run, tracking_uri
    from training.loop import train_worker

    stage = cfg.train.stages[index]
    started = time.perf_counter()
    run_id = latest[1].get("mlflow_run_id") if latest else None
    with start_run(cfg, run_name=f"{cfg.run.name}/{stage.name}", run_id=run_id, nested=True,
                   tags={"onegen.kind": "train-stage", "onegen.stage": stage.name}) as active:
        if run_id is None:
            mlflow.log_dict({"configured": data.plan.configured(), "drawn": data.plan.effective(),
                             "rows_per_task": dict(zip([item.label for item in stage.mixture],
                                                       data.plan.rows_per_item())),
                             "skipped": data.notes, "start": previous or cfg.model.init},
                            f"mixture/{stage.name}.planned.json")
        else:
            print(f"continuing stage {stage.name} from {latest[0]} (step {latest[1]['step']}), MLflow run {run_id}")
        for note in data.notes:
            print(f"stage {stage.name}: {note}")
        init_ray(cfg)
        train = cfg.train
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "stage": index, "sources": sources,
                               "mlflow_run_id": active.info.run_id, "mlflow_parent_run_id": parent.info.run_id,
                               "previous": previous and _storage_path(previous)},
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
        notes = list(data.notes)
        final = latest_checkpoint(cfg, stage.name)
        if final is not None:
            notes.append(log_realised_mixture(stage, data.plan, final[1]["mixture"]))
        where = run_location(tracking_uri(cfg), active.info.experiment_id, active.info.run_id)
    return TrainSummary(cfg.run.name, stage.name, stage.steps, checkpoint, where, metrics.get("loss"),
                        time.perf_counter() - started, notes, lora=cfg.model.lora is not None), final


def log_realised_mixture(stage, plan, counts: dict) -> str:
    """Log the stage's realised mixture (what its steps drew, counted by the workers into the checkpoints) next to
    the configured one and the one drawn from (the configured weights renormalised over the tasks the builds feed):
    metrics mixture/{realised,drawn,configured}/LABEL, and mixture/STAGE.json. Returns a one-line summary."""
    import mlflow

    steps = max(1, counts.get("steps", 0))
    configured, drawn = plan.configured(), plan.effective()
    realised = {label: counts.get("tasks", {}).get(label, 0) / steps for label in configured}
    mlflow.log_metrics({**{f"mixture/configured/{label}": p for label, p in configured.items()},
                        **{f"mixture/drawn/{label}": p for label, p in drawn.items()},
                        **{f"mixture/realised/{label}": p for label, p in realised.items()}})
    mlflow.log_dict({"configured": configured, "drawn": drawn, "realised": realised, "counts": counts},
                    f"mixture/{stage.name}.json")
    parts = [f"{label} {realised[label]:.2f}/{drawn.get(label, 0.0):.2f}" for label in configured]
    return f"mixture (realised/drawn over {counts.get('steps', 0)} steps; drawn = configured over the fed tasks): " \
        + ", ".join(parts)


def _storage_uri(cfg: TrainConfig, rel: str) -> str:
    from onegen.storage import Storage

    return _storage_path(Storage(cfg.storage.root).uri(rel))


def _storage_path(uri: str) -> str:
    """A storage URI as Ray Train takes it: local folders as plain paths."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


if __name__ == "__main__":  # the job's own entry point sits on top, like onegen.cli, and may call it
    import sys

    from onegen.cli.train import main

    sys.exit(main())
