"""The build's model stages (labelers): the shape every one shares, so captions, depth, segmentation and pose copy it.

A labeler runs between `bucket` and `conditions` (its labels can become condition maps) as a Ray Data actor pool:

  * preflight: before the build name is claimed or any input read, `preflight_labelers` runs one Ray task per
    enabled labeler on the stage's own resources (its num_cpus / num_gpus, so on the kind of node its actors get)
    that resolves the model (a hub id to a commit in that node's cache, or a local folder) and loads its config. A
    model that cannot be found fails the build in seconds with one line naming the stage, the model and the fix.
  * `__init__` loads the model once per actor, at the commit the preflight resolved (every shard of a build is
    labelled by one model even if the hub repo moves while the build runs).
  * `__call__` is pure per batch: records in, the same records out, each live one with `labels[stage]` = "ok" or a
    failure reason. A label is extra, never a reason to drop: a record the model fails on keeps its views and the
    rest of its labels, its reason is counted (manifest entries' `labels`) and its message kept in the shard's
    stats. A batch that raises is retried record by record, so one bad sample costs only its own label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import numpy as np

from onegen.build_config import BuildConfig, LabelerSection
from pipelines.process import add_seconds, batch_of, records_of

OK = "ok"
ERROR = "error"


@dataclass(frozen=True)
class Labeler:
    stage: str  # the config section build.<stage>, the stage's name in timings and counts
    module: str  # holds `Stage` (the actor class) and `preflight(section) -> dict` (what the actors need)

    def section(self, cfg: BuildConfig) -> LabelerSection:
        return getattr(cfg.build, self.stage)

    def actor_class(self) -> type[LabelerStage]:
        return import_module(self.module).Stage

    def preflight(self, section: LabelerSection) -> dict[str, Any]:
        return import_module(self.module).preflight(section)


LABELERS = (Labeler("caption", "pipelines.caption"),)  # build order


def enabled_labelers(cfg: BuildConfig) -> list[Labeler]:
    return [labeler for labeler in LABELERS if labeler.section(cfg).enabled]


class LabelerStage:
    """The actor: subclasses set `stage`, load their model in `setup(resolved)` and label live records in
    `label(records)`, returning one (outcome, message or None) per record; they never drop a record."""

    stage = ""

    def __init__(self, cfg: BuildConfig, resolved: dict[str, Any]):
        self.cfg = cfg
        self.section = getattr(cfg.build, self.stage)
        self.setup(resolved)

    def setup(self, resolved: dict[str, Any]) -> None:
        raise NotImplementedError

    def label(self, records: list[dict]) -> list[tuple[str, str | None]]:
        raise NotImplementedError

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
            results = self.label(live)
        except Exception:  # find the record the model fails on: the others are labelled one by one
            results = [self._label_one(record) for record in live]
        spent = (time.perf_counter() - start) / len(live)
        for record, (outcome, message) in zip(live, results, strict=True):
            record.setdefault("labels", {})[self.stage] = outcome
            if message:
                record.setdefault("label_errors", {})[self.stage] = message
            record["timings"][self.stage] = record["timings"].get(self.stage, 0.0) + spent
        return records

    def _label_one(self, record: dict) -> tuple[str, str | None]:
        start = time.perf_counter()
        try:
            return self.label([record])[0]
        except Exception as err:
            return ERROR, f"{type(err).__name__}: {err}"
        finally:
            add_seconds(record["timings"], f"{self.stage}.retry", start)


def preflight_labelers(ray, cfg: BuildConfig) -> dict[str, dict[str, Any]]:
    """{stage: what its actors need}, from one Ray task per enabled labeler on the stage's resources, all at once.
    A model that cannot be resolved or loaded is a UsageError naming the stage, the model and the fix; no node with
    the stage's resources within its preflight_timeout_s is an UnreachableError naming the resources."""
    from onegen.errors import UnreachableError, UsageError

    pending = {}
    for labeler in enabled_labelers(cfg):
        section = labeler.section(cfg)
        task = ray.remote(_preflight_task).options(num_cpus=section.num_cpus, num_gpus=section.num_gpus or None,
                                                   max_retries=0)
        pending[labeler.stage] = (labeler, section, task.remote(labeler, section))
    resolved = {}
    for stage, (labeler, section, ref) in pending.items():
        try:
            outcome = ray.get(ref, timeout=section.preflight_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise UnreachableError(
                f"build.{stage}: its start-up check found no node with the stage's resources (num_cpus="
                f"{section.num_cpus:g}, num_gpus={section.num_gpus:g}) within {section.preflight_timeout_s:g} s; "
                f"add such a node, lower build.{stage}.num_gpus / num_cpus, or raise "
                f"build.{stage}.preflight_timeout_s for a slow download") from None
        if "problem" in outcome:
            raise UsageError(f"build.{stage}.model={section.model!r} (the {stage} stage's model): "
                             f"{outcome['problem']}")
        resolved[stage] = outcome
    return resolved


def _preflight_task(labeler: Labeler, section: LabelerSection) -> dict[str, Any]:
    """On the stage's resources: what the actors need, or {"problem": one line} (exceptions would arrive as a Ray
    traceback)."""
    from onegen.errors import first_line

    try:
        return labeler.preflight(section)
    except Exception as err:  # noqa: BLE001 - any failure to load is the user's model setting to fix
        return {"problem": f"{first_line(err)}"}


def resolve_model(section: LabelerSection) -> tuple[str, str | None]:
    """(the folder to load, its hub commit or None): a local folder as is, a hub id's snapshot (downloaded into this
    node's cache, or found there offline). Raises FileNotFoundError with the fix (model.hub)."""
    from pathlib import Path

    from model.hub import resolve_pretrained_folder

    if Path(section.model).exists():
        return str(resolve_pretrained_folder(section.model)), None
    folder = resolve_pretrained_folder(section.model, revision=section.revision)  # its errors say what to do
    return str(folder), folder.name


def torch_dtype(section: LabelerSection, device: str):
    import torch

    if section.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, section.dtype)
