"""`onegen train`'s config schema: the shared sections plus `model:` and `train:` (data, stages, optimizer, engine).

    model: {preset: nextdit-tiny, text_encoder: tiny-t5}
    train:
      data: {builds: [{uri: synthetic_small}]}          # a build name (under storage.root) or a full build URI
      stages:
        - name: stage1
          steps: 200
          resolution: 64
          mixture:
            - {task: text2image, weight: 2}
            - {task: depth2image}                        # both directions, drawn evenly
            - {task: semanticmap2image, direction: generate, optional: true}
      global_batch_size: 8                               # content: split evenly over train.num_workers ranks

Roles (onegen.config): the maths (stages, mixture, seeds, global batch, optimizer, precision, ZeRO stage) is content
and gates the "changed config" refusal of a resumed run; worker count, GPUs, checkpoint cadence, logging and failure
retries are runtime, so a run resumes on a bigger cluster. The stages run in order, each from the previous one's
EMA weights; `onegen train --stages a.yaml b.yaml` concatenates files' stages (onegen.config.concatenated_stages).
configs/train/stage{1,2,3}.yaml are the paper's schedule (ONEDIFFUSION_SPEC §7)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from model.limits import resolution_problem
from model.presets import LORA_ATTENTION_TARGETS, LORA_TARGETS
from onegen.config import (RUNTIME, SCHEMAS, ModelSection, OnegenConfig, TrackingSection, _hashed_if_set, _role,
                           _Section, check_safe_name)

TINY_T5 = "tiny-t5"  # a seeded random T5 built locally (model.tokenizers.build_tiny_t5): no download, tests and CPU


class LoraSection(_Section):
    """LoRA fine-tuning of model.init (peft's LoraConfig on every block): the base weights frozen, only the adapter
    trained and checkpointed (INTERFACES §3: adapter/ + base.json, no pipeline/), no EMA."""

    rank: int = Field(16, gt=0, le=1024, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[Literal[LORA_TARGETS]] = Field(
        list(LORA_ATTENTION_TARGETS), min_length=1, description="the Linear layers adapted in every block: the "
        "attention projections wq wk wv wo, the text keys/values wk_y wv_y, the feed-forward w1 w2 w3")

    @field_validator("target_modules")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return sorted(set(value), key=LORA_TARGETS.index)


class TrainModelSection(ModelSection):
    init: str | None = Field(None, min_length=1, description="start from these weights (full fine-tuning): a "
                             "release-layout folder, hub id or registered model (transformer/ read, e.g. "
                             "lehduong/OneDiffusion, a checkpoint's pipeline/, models:/onegen@candidate or "
                             "models:/onegen/3), whose transformer config must match model.preset; null: the "
                             "preset's seeded initialisation")
    text_encoder: str | None = Field(None, min_length=1, description=f"T5 encoder: hub id, a release-layout folder "
                                     f"(text_encoder/ + tokenizer/), or {TINY_T5!r} (a seeded tiny T5 built under "
                                     "run.work_dir/models, d_model = the preset's caption_channels); null: "
                                     f"model.init's own text encoder when model.init is set, else {TINY_T5!r}")
    text_max_length: int = Field(300, gt=0, le=512, description="prompt tokens (the release truncates at 300)")
    lora: LoraSection | None = Field(None, description="LoRA fine-tuning of model.init (configs/train/"
                                     "finetune_lora.yaml); null: every weight trains", **_hashed_if_set())

    @field_validator("init", "text_encoder")
    @classmethod
    def _absolute_folder(cls, value: str | None) -> str | None:
        """A local folder as an absolute path: Ray workers do not run in the driver's working directory."""
        import os

        return os.path.abspath(value) if value and os.path.isdir(value) else value

    @property
    def text_encoder_source(self) -> str:
        """What model.text_encoder resolves to (null: the init's T5, or the tiny T5)."""
        return self.text_encoder or self.init or TINY_T5


class BuildRef(_Section):
    uri: str = Field(min_length=1, description="a build name under storage.root, or the build's full URI")
    weight: float = Field(1.0, gt=0, description="rows of this build per epoch: floor(weight) copies, plus one "
                                                 "more with probability frac(weight)")


class TrainData(_Section):
    builds: list[BuildRef] = Field(min_length=1)
    latents: Literal["mean", "sample"] = Field("sample", description="VAE posterior: its mean, or mean + std * eps "
                                                                     "(a point posterior, the pixel tokenizer's, "
                                                                     "is the same either way)")


class MixtureItem(_Section):
    task: str = Field(min_length=1, description="a task of model/tasks.py, e.g. text2image, depth2image")
    direction: str | None = Field(None, description="null: each of the task's directions, drawn evenly")
    weight: float = Field(1.0, gt=0, description="the probability that a global step trains this item is its "
                                                 "weight over the sum of the weights of the items the builds feed")
    optional: bool = Field(False, description="true: skipped (and logged) when the builds have no row for it; "
                                              "false: such a run is refused before any worker starts")
    resolution: int | None = Field(None, description="the build resolution this item trains on; null: the "
                                                     "stage's (stage 2 of the paper: 512 for text2image, 256 for "
                                                     "the rest)")
    views: tuple[int, int] | None = Field(None, description="[min, max] frames of its sequences (multiview: 2 per "
                                                            "camera); null: any the rows give")
    name: str | None = Field(None, min_length=1, description="what its loss and counts are logged under; null: "
                                                             "task, or task:direction")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from model.tasks import get_task  # a pure-python module: no torch import

        try:
            return get_task(value).name  # aliases and tokens become the task's name
        except KeyError as err:
            raise ValueError(str(err).strip("'\"")) from None

    @model_validator(mode="after")
    def _known_direction(self) -> "MixtureItem":
        from model.tasks import get_task

        directions = get_task(self.task).directions
        if self.direction is not None and self.direction not in directions:
            raise ValueError(f"task {self.task} has no direction {self.direction!r}; valid: {', '.join(directions)}")
        task = get_task(self.task)
        if self.views is not None:
            low, high = self.views
            if not task.min_views <= low <= high <= task.max_views:
                raise ValueError(f"views {list(self.views)}: task {self.task} takes {task.min_views} to "
                                 f"{task.max_views} frames; give [min, max] within them")
        if self.resolution is not None and (problem := resolution_problem(self.resolution)):
            raise ValueError(problem)
        return self

    @property
    def label(self) -> str:
        """The name its loss and counts are logged under: `name`, else task, or task:direction."""
        return self.name or (self.task if self.direction is None else f"{self.task}:{self.direction}")

    def resolution_in(self, stage: "StageSection") -> int:
        return self.resolution or stage.resolution


class StageSection(_Section):
    name: str = Field(min_length=1, description="names the checkpoint folder runs/RUN/NAME/")
    steps: int = Field(gt=0, description="optimizer steps of the stage")
    resolution: int = Field(description="the build resolution the stage trains on, unless a mixture item names "
                                        "its own (rows of other resolutions are skipped)")
    mixture: list[MixtureItem] = Field(min_length=1)
    start_from: Literal["ema", "model"] = Field("ema", description="a stage after the first starts from the "
                                                "previous stage's final EMA weights (its pipeline/) or its trained "
                                                "weights (consolidated from its DeepSpeed checkpoint); the first "
                                                "starts from model.init or the preset's initialisation")

    _safe_name = field_validator("name")(check_safe_name)

    @model_validator(mode="after")
    def _unique_labels(self) -> "StageSection":
        labels = [item.label for item in self.mixture]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"mixture items must have distinct labels (their losses and counts are logged under "
                             f"them), repeated: {repeated}; give each a `name`")
        return self

    @property
    def resolutions(self) -> list[int]:
        return sorted({item.resolution_in(self) for item in self.mixture})

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: int) -> int:
        problem = resolution_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class OptimizerSection(_Section):
    """torch.optim.AdamW handed to DeepSpeed (INTERFACES §6: no JIT-compiled optimizer)."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr")
    schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="after the warm-up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine / linear decay ends at lr * this")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip (0: none)")


class FlowSection(_Section):
    """The objective's settings (model.flow.FlowConfig)."""

    shift: float = Field(3.0, gt=0, description="static shift of the training sigmas (the paper: 3)")
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    clean_condition_prob: float = Field(0.0, ge=0, le=1, description="condition views kept clean, at the "
                                                                     "sampler's condition time")
    text_dropout_prob: float = Field(0.1, ge=0, le=1)
    loss_on: Literal["all", "targets"] = "all"


class EmaSection(_Section):
    """diffusers' EMAModel over the transformer's weights; what every checkpoint's pipeline/ holds."""

    decay: float = Field(0.9999, gt=0, lt=1, description="the most the decay reaches")
    min_decay: float = Field(0.0, ge=0, lt=1)
    use_warmup: bool = Field(True, description="decay = 1 - (1 + step / inv_gamma) ** -power, so a short run's EMA "
                                               "is already near its weights (false: (1 + step) / (10 + step))")
    inv_gamma: float = Field(1.0, gt=0)
    power: float = Field(2 / 3, gt=0, description="2/3 suits runs of up to ~1M steps; 3/4 shorter ones")
    update_after_step: int = Field(0, ge=0, description="steps during which the average just copies the weights "
                                                        "(decay 0) before it starts averaging")


class SamplesSection(_Section):
    """Sample grids: one example per mixture task sampled with the EMA weights, logged to the stage's MLflow run as
    samples/STAGE/step_STEP/TASK.png (conditions | generated | ground truth). Rank 0 samples while the others wait."""

    every: int = Field(500, ge=0, description="steps between grids (and one at the end of every stage); 0: only "
                                               "at the end", **_role(RUNTIME))
    steps: int = Field(20, gt=0, le=1000, description="sampling steps of a grid", **_role(RUNTIME))
    guidance_scale: float = Field(1.0, ge=1.0, description="text CFG of a grid (1: none)", **_role(RUNTIME))


class TrainTrackingSection(TrackingSection):
    registered_model: str = Field("onegen", min_length=1, description="the MLflow registered model the job's final "
                                  "pipeline becomes a version of, with the alias `candidate`", **_role(RUNTIME))


class TrainSection(_Section):
    data: TrainData
    stages: list[StageSection] = Field(min_length=1)
    global_batch_size: int = Field(8, gt=0, description="samples per optimizer step, split evenly over the ranks")
    optimizer: OptimizerSection = OptimizerSection()
    flow: FlowSection = FlowSection()
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 on GPUs; fp32 on CPUs (bf16 matmul is "
                                                                  "several times slower there)")
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage; under 3 the EMA step assembles each "
                                                      "full float32 master weight, one parameter at a time")
    ema: EmaSection = EmaSection()
    samples: SamplesSection = SamplesSection()
    zero3_persistence_threshold: int = Field(100_000, ge=0, description="ZeRO-3 keeps parameters with fewer "
                                             "elements whole on every rank (DeepSpeed's default 1e5; 0 partitions "
                                             "all)", **_role(RUNTIME))
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in the backward "
                                           "pass (less memory, ~30% more compute; same numbers)", **_role(RUNTIME))
    num_workers: int = Field(2, gt=0, description="Ray Train workers (ranks)", **_role(RUNTIME))
    use_gpu: bool = Field(False, description="one GPU per worker", **_role(RUNTIME))
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs per worker (2-core machines: 1 each for 2 "
                                                          "workers)", **_role(RUNTIME))
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints (and one at the end)",
                                  **_role(RUNTIME))
    keep_checkpoints: int = Field(3, gt=0, description="newest checkpoints kept per stage", **_role(RUNTIME))
    max_failures: int = Field(3, ge=-1, description="worker-group restarts from the latest checkpoint (-1: "
                                                    "unlimited)", **_role(RUNTIME))
    log_every: int = Field(1, gt=0, description="steps between MLflow metric writes", **_role(RUNTIME))

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "TrainSection":
        names = [stage.name for stage in self.stages]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"stage names must be unique (they name checkpoint folders), repeated: {repeated}")
        return self


class TrainConfig(OnegenConfig):
    """`onegen train`: Ray Train + DeepSpeed training of the NextDiT on the latents of one or more builds."""

    model: TrainModelSection = TrainModelSection()
    train: TrainSection
    tracking: TrainTrackingSection = TrainTrackingSection()

    def stage_content_hash(self, index: int) -> str:
        """The content hash of the job up to and including stage `index`: what that stage's checkpoints are checked
        against, so stages appended later (`--stages a.yaml` now, `--stages a.yaml b.yaml` next week) continue the
        finished ones instead of being refused as another config."""
        from onegen.config import content_hash

        stages = self.train.stages[:index + 1]
        return content_hash(self.model_copy(update={"train": self.train.model_copy(update={"stages": stages})}))

    def cross_field_problems(self) -> list[tuple[str, str]]:
        problems = super().cross_field_problems()
        train = self.train
        if self.model.lora is not None and self.model.init is None:
            problems.append(("model.lora", "LoRA adapts existing weights: give them with --init PATH_OR_HUB_ID (or "
                                           "model.init), or set model.lora to null to train every weight"))
        if self.model.lora is not None and train.zero_stage == 3:
            problems.append(("train.zero_stage", "3 partitions every weight, but a LoRA run trains a small adapter "
                                                 "of a frozen base that every rank holds whole: use 2"))
        if train.global_batch_size % train.num_workers:
            problems.append(("train.global_batch_size",
                             f"{train.global_batch_size} does not split evenly over train.num_workers="
                             f"{train.num_workers} ranks; make it a multiple of the worker count"))
        return problems


SCHEMAS["train"] = TrainConfig
