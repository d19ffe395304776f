"""The build's model stages (labelers): the shape captions, depth, segmentation, pose and faces share.

A labeler runs before `conditions` (its labels can become condition maps) as a Ray Data actor pool: after `bucket` on
each resolution's pictures, or (`sees = "decoded"`: pose, faces) after `decode` on the full-size pictures, whose
keypoints and boxes are then bucketed with them (pipelines.process.stage_chain):

  * preflight: before the build name is claimed or any input read, `preflight_labelers` runs one Ray task per
    enabled labeler on the stage's own resources (its num_cpus / num_gpus, so on the kind of node its actors get)
    that resolves the model (a hub id to a commit, fetching only its small files into that node's cache; or a local
    folder), reads its config and lists its weights. A model that cannot be found fails the build in seconds with
    one line naming the stage, the model and the fix. The first run freezes the commits in the build's plan, so a
    rerun labels with the same weights even if the hub repo moved.
  * `__init__` loads the model once per actor at that commit, then runs it once on a blank picture: a model that
    cannot run at all (no GPU where num_gpus asks for one, weights cut short, a dtype the device lacks) stops the
    build with one line naming the stage and the node, instead of every sample being counted as an error.
  * `__call__` is pure per batch: records in, the same records out, each live one with `labels[stage]` = "ok" or a
    failure reason, and what the stage found written by its `apply` (`label_values[stage]` by default; the
    picture labellers put their maps beside the pictures, for the conditions stage to draw). `label()` only returns
    `Label`s; the base class applies them, so a batch that raises half-way leaves no partial labels. A picture
    that already has the label from its source (the synthetic world's exact depth and masks) is not labelled again:
    `source` is counted. A label is extra, never a reason to
    drop (except a stage's own `drops`: an identity group left with too few pictures): a record the model fails on
    keeps its views, its reason is counted (manifest entries' `labels`) and its
    message kept in the shard's stats. A batch that raises is retried record by record, so one bad sample costs
    only its own label.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import numpy as np

from onegen.build_config import BuildConfig, LabelerSection
from pipelines.decode import DropSample
from pipelines.process import add_seconds, batch_of, drop, records_of

OK = "ok"
ERROR = "error"
SOURCE = "source"  # every picture of the sample had this label from its source: the model was not run on it
CONFIG_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]  # config, processor, tokenizer, template
# An actor's start failure, found again in the many-line error Ray wraps it in (one_line_start_failures).
START_FAILED = re.compile(r"build\.[a-z_]+: its model .*? could not start on node [^\n]*")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Labeler:
    stage: str  # the config section build.<stage>, the stage's name in timings and counts
    module: str  # holds `Stage` (the actor class) and `preflight(section) -> dict` (what the actors need)

    def section(self, cfg: BuildConfig) -> LabelerSection:
        return getattr(cfg.build, self.stage)

    def actor_class(self) -> type[LabelerStage]:
        return import_module(self.module).Stage

    @property
    def sees(self) -> str:
        return self.actor_class().sees

    def preflight(self, section: LabelerSection) -> dict[str, Any]:
        return import_module(self.module).preflight(section)


LABELERS = (Labeler("faces", "pipelines.faces"), Labeler("pose", "pipelines.pose"),  # faces first: fewer pictures
            Labeler("caption", "pipelines.caption"), Labeler("depth", "pipelines.depth_estimation"),
            Labeler("segmentation", "pipelines.segmentation"))  # build order


def enabled_labelers(cfg: BuildConfig) -> list[Labeler]:
    return [labeler for labeler in LABELERS if labeler.section(cfg).enabled]


@dataclass(frozen=True)
class Label:
    outcome: str  # OK, or the reason it failed (counted), or a kept-but-noted outcome (a caption's "truncated")
    value: Any = None  # what the stage found (record["label_values"][stage]); None: nothing
    message: str | None = None  # why it failed (the shard's stats keep a few)


class LabelerStage:
    """The actor. Subclasses set `stage` and write `load(folder, device, dtype)`, `smoke_test()` (one tiny model
    call) and `label(records) -> [Label]` (one per live record, never mutating them); `apply(record, value)` writes
    a label's value where the later stages read it. `resolved`: what the stage's preflight found (its commit, the
    files to load, anything else it read from the config)."""

    stage = ""
    drops: tuple[str, ...] = ()  # outcomes that drop the record (named by the outcome) instead of keeping it
    start_fix = "check the model folder there (or download it again) and build.{stage}.num_gpus / dtype"
    sees = "bucketed"  # or "decoded": the full-size pictures before bucketing (pipelines.process.stage_chain)

    def __init__(self, cfg: BuildConfig, resolved: dict[str, Any]):
        import socket

        import torch

        self.cfg = cfg
        self.resolved = resolved
        self.section = getattr(cfg.build, self.stage)
        section = self.section.model_copy(update={"revision": resolved.get("revision")})
        try:
            if section.num_gpus > 0 and not torch.cuda.is_available():
                raise RuntimeError(f"build.{self.stage}.num_gpus={section.num_gpus:g} but this worker sees no GPU")
            self.device = "cuda" if section.num_gpus > 0 else "cpu"
            self.dtype = torch_dtype(section, self.device)
            self.load(self.model_folder(section), self.device, self.dtype)
            self.smoke_test()
        except Exception as err:  # noqa: BLE001 - any failure to start is the model setting's or the node's
            from onegen.errors import first_line

            raise RuntimeError(f"build.{self.stage}: its model {section.model!r} could not start on node "
                               f"{socket.gethostname()} ({type(err).__name__}: {first_line(err)}); "
                               f"{self.start_fix.format(stage=self.stage)}") from err
        self.identity = self.describe(section)

    def model_folder(self, section: LabelerSection) -> str:
        """Where the weights are: a local folder, or a hub id's snapshot (only the files the preflight named)."""
        return resolve_model(section, self.resolved.get("files"))[0]

    def describe(self, section: LabelerSection) -> str:
        """The model as `labelled_by` names it: id@commit and dtype."""
        return f"{section.model}" + (f"@{section.revision}" if section.revision else "") + \
            f" {str(self.dtype).removeprefix('torch.')}"

    def load(self, folder: str, device: str, dtype) -> None:
        raise NotImplementedError

    def smoke_test(self) -> None:
        raise NotImplementedError

    def label(self, records: list[dict]) -> list[Label]:
        raise NotImplementedError

    def apply(self, record: dict, value: Any) -> None:
        """Write a label's value into the record (only called with a value that is not None). Assignments only:
        the work belongs in `label()`, where a failure is retried and counted."""
        record.setdefault("label_values", {})[self.stage] = value

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = records_of(batch)
        self.label_records(records)
        return batch_of(records)

    def label_records(self, records: list[dict]) -> list[dict]:
        """Label the live records in place (also the in-process form: tests, the benchmark's bare loop)."""
        live = [r for r in records if not r["dropped"]]
        if not live:
            return records
        start = time.perf_counter()
        try:
            labels = self.label(live)
            if len(labels) != len(live):
                raise RuntimeError(f"{type(self).__name__}.label gave {len(labels)} labels for {len(live)} records")
        except Exception:  # find the record the model fails on: the others are labelled one by one
            labels = [self._label_one(record) for record in live]
        spent = (time.perf_counter() - start) / len(live)
        for record, label in zip(live, labels, strict=True):
            record["timings"][self.stage] = record["timings"].get(self.stage, 0.0) + spent
            if label.outcome in self.drops:
                drop(record, label.outcome, label.message or label.outcome)
                continue
            record.setdefault("labels", {})[self.stage] = label.outcome
            if label.outcome != SOURCE:  # the model did not touch a sample its source had labelled
                record.setdefault("labelled_by", {})[self.stage] = self.identity
            if label.value is not None:
                try:
                    self.apply(record, label.value)
                except DropSample as refused:  # e.g. a group left too small: that record only, not the batch
                    drop(record, refused.reason, str(refused))
                    continue
            if label.message:
                record.setdefault("label_errors", {})[self.stage] = label.message
        return records

    def _label_one(self, record: dict) -> Label:
        start = time.perf_counter()
        try:
            return self.label([record])[0]
        except Exception as err:
            return Label(ERROR, message=f"{type(err).__name__}: {err}")
        finally:
            add_seconds(record["timings"], f"{self.stage}.retry", start)


def one_line_start_failures(batches: Iterator) -> Iterator:
    """The build's stream, with a labeler actor's start failure (Ray reports it as a many-line ActorDiedError)
    re-raised as its own one line (a UsageError: the model setting or the node's copy of the weights to fix)."""
    from onegen.errors import UsageError

    try:
        yield from batches
    except Exception as err:
        match = START_FAILED.search(ANSI.sub("", str(err)))
        if match is None:
            raise
        raise UsageError(match.group(0)) from err


def preflight_labelers(ray, cfg: BuildConfig, frozen: dict[str, dict] | None = None) -> dict[str, dict[str, Any]]:
    """{stage: what its actors need}, from one Ray task per enabled labeler on the stage's resources, all at once.
    `frozen`: what a first run of this build resolved (its plan), kept on a rerun. A model that cannot be resolved
    or read is a UsageError naming the stage, the model and the fix; a task that does not finish within the stage's
    preflight_timeout_s (no node with its resources, or a hub that does not answer) an UnreachableError."""
    from onegen.errors import UnreachableError, UsageError

    pending = {}
    for labeler in enabled_labelers(cfg):
        section = labeler.section(cfg)
        revision = (frozen or {}).get(labeler.stage, {}).get("revision")
        if revision:
            section = section.model_copy(update={"revision": revision})
        task = ray.remote(_preflight_task).options(num_cpus=section.num_cpus, num_gpus=section.num_gpus or None,
                                                   max_retries=0)
        pending[labeler.stage] = (section, task.remote(labeler, section))
    resolved = {}
    for stage, (section, ref) in pending.items():
        try:
            outcome = ray.get(ref, timeout=section.preflight_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise UnreachableError(
                f"build.{stage}: its start-up check did not finish within {section.preflight_timeout_s:g} s: no node "
                f"offers the stage's resources (num_cpus={section.num_cpus:g}, num_gpus={section.num_gpus:g}), or "
                f"the Hugging Face hub did not answer; add such a node, lower build.{stage}.num_gpus / num_cpus, or "
                f"raise build.{stage}.preflight_timeout_s") from None
        except ray.exceptions.RayError as err:  # the task's worker died (out of memory, a runtime env that failed)
            from onegen.errors import first_line

            raise UnreachableError(f"build.{stage}: its start-up check failed on the cluster ({type(err).__name__}: "
                                   f"{first_line(err)})") from None
        if "problem" in outcome:
            raise UsageError(f"build.{stage}.model={section.model!r} (the {stage} stage's model): "
                             f"{outcome['problem']}")
        first = (frozen or {}).get(stage, {}).get("sha256")  # a bundled model (mediapipe's): no hub commit to pin
        if first and outcome.get("sha256") != first:
            raise UsageError(f"build.{stage}: this build's first run labelled with {section.model} sha256 "
                             f"{first[:12]} (version {(frozen or {})[stage].get('version')}), the cluster now has "
                             f"sha256 {str(outcome.get('sha256'))[:12]} (version {outcome.get('version')}): install "
                             "the same version again (make install), or build under a new build.name")
        resolved[stage] = outcome
    return resolved


def _preflight_task(labeler: Labeler, section: LabelerSection) -> dict[str, Any]:
    """On the stage's resources: what the actors need, or {"problem": one line} (exceptions would arrive as a Ray
    traceback)."""
    from onegen.errors import first_line

    try:
        return labeler.preflight(section)
    except Exception as err:  # noqa: BLE001 - any failure to load is the user's model setting to fix
        return {"problem": first_line(err)}


def resolve_model(section: LabelerSection, allow_patterns: list[str] | None = None) -> tuple[str, str | None]:
    """(the folder to load, its hub commit or None): a local folder as is, a hub id's snapshot at section.revision
    (downloaded into this node's cache, only `allow_patterns` if given, or found there offline). Raises
    FileNotFoundError with the fix (model.hub)."""
    from pathlib import Path

    from model.hub import resolve_pretrained_folder

    if Path(section.model).exists():
        return str(resolve_pretrained_folder(section.model)), None
    folder = resolve_pretrained_folder(section.model, revision=section.revision, allow_patterns=allow_patterns)
    return str(folder), folder.name  # the cache's snapshots/<commit>


def checked_model(section: LabelerSection, classes: dict[str, str], auto_class: str,
                  example: str) -> tuple[str, str | None, Any, list[str]]:
    """A preflight's common part: (folder, hub commit or None, config, weight files) of section.model, reading only
    its small files (a hub id: CONFIG_FILES into this node's cache; the weights are only listed). Raises with the
    fix when it is not a model `auto_class` loads (`classes`: transformers' model_type -> class table for it) or has
    no weights."""
    from transformers import AutoConfig

    folder, revision = resolve_model(section, CONFIG_FILES)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in classes:
        raise ValueError(f"{folder} holds a {config.model_type!r} model, which {auto_class} cannot load; pick "
                         f"{example}")
    weights = list_weights(section, folder, revision)
    if not weights:
        raise FileNotFoundError(f"{folder} has a config but no weights (*.safetensors); download the whole folder")
    return folder, revision, config, weights


def preflight_result(revision: str | None, weights: list[str], **found: Any) -> dict[str, Any]:
    """What a preflight hands the actors: the commit, the files to download at it (None: a local folder) and what
    else it read."""
    return {"revision": revision, "files": None if revision is None else CONFIG_FILES + weights, **found}


def run_on_pictures(records: list[dict], has_label, run, batch_size: int) -> dict[int, dict[tuple[int, int], Any]]:
    """{record index: {(output index, view): run's result}}: `run(images)` (one result per image) over every picture
    of the bucketed records (every resolution, every view) that `has_label(sample)` says its source did not label
    already, in batches of at most `batch_size` same-sized pictures (a model call takes one tensor, and a build's
    pictures come in a few bucket sizes). A record missing from the result had all its pictures labelled by its
    source."""
    groups: dict[tuple[int, ...], list] = {}
    for i, record in enumerate(records):
        for k, output in enumerate(record["outputs"]):
            for v, sample in enumerate(output["samples"]):
                if not has_label(sample):
                    groups.setdefault(sample.image.shape, []).append((i, k, v, sample.image))
    found: dict[int, dict[tuple[int, int], Any]] = {}
    for group in groups.values():
        for first in range(0, len(group), batch_size):
            batch = group[first:first + batch_size]
            for (i, k, v, _), result in zip(batch, run([job[3] for job in batch]), strict=True):
                found.setdefault(i, {})[(k, v)] = result
    return found


def list_weights(section: LabelerSection, folder: str, revision: str | None) -> list[str]:
    """The model's weight files, safetensors if there are any: in the folder (a local one, or a hub snapshot that
    has them cached), else as the hub lists them at `revision` (empty when the hub cannot be asked: offline, the
    weights must be cached)."""
    from pathlib import Path

    names = sorted(p.name for p in Path(folder).iterdir() if p.suffix == ".safetensors") or \
        sorted(p.name for p in Path(folder).iterdir() if p.suffix == ".bin")
    if names or revision is None:
        return names
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(section.model, revision=revision)
    except Exception:  # noqa: BLE001 - offline, refused, no answer (httpx errors are not OSErrors): cannot tell
        return []
    safetensors = [name for name in files if name.endswith(".safetensors")]
    return safetensors or [name for name in files if name.endswith(".bin")]  # one set: not both formats


def torch_dtype(section: LabelerSection, device: str):
    import torch

    if section.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, section.dtype)
