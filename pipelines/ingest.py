"""The build's plan and its first stage: every source cut into named partitions, and a partition read into records.

A partition is the unit of work and of output: partition i of source S becomes shard `S-0000i`
(onegen.shards.shard_name), so a rerun finds what is already committed by name. Plans are JSON (`Partition.spec`)
computed on the driver from listings only; reading happens in Ray tasks.

A record is one input of the build — one image, or one multiview group — as a plain dict (records travel between
Ray Data stages pickled):

    shard, shard_items      the shard it belongs to and how many records that partition has (the writer knows a
                            shard is complete when it has seen that many)
    index                   position in the partition (rows are written in this order)
    source, source_type     the source's config name and kind
    id                      the sample id: f"{source}_{sha256(input_id)[:16]}", stable across rebuilds
    input_id                URL; path + size + mtime/ETag; tar + key; or the synthetic scene
    group_id                multiview group (folder or scene) or None
    views                   [{"data": file bytes, "name": ..., "camera": ...} | {"sample": Sample}, ...]
    captions, meta          from the source (sidecars, url-list columns, tar JSON, the synthetic world)
    dropped, error          a named reason and its message once a stage refused the record (it then carries no
                            pixels, only what the stats need)
    timings                 seconds per stage
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from onegen.build_config import BuildConfig, FolderSource, SyntheticSource, UrlSource, WebDatasetSource
from onegen.shards import shard_name

if TYPE_CHECKING:
    from pipelines.earlier import EarlierBuilds


@dataclass(frozen=True)
class Partition:
    source: str
    source_type: str
    index: int
    spec: dict[str, Any]

    @property
    def shard(self) -> str:
        return shard_name(self.source, self.index)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "source_type": self.source_type, "index": self.index, "spec": self.spec}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Partition":
        return cls(data["source"], data["source_type"], data["index"], data["spec"])

    @classmethod
    def from_json(cls, text: str) -> "Partition":
        return cls.from_dict(json.loads(text))

    @property
    def spec_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()


def sample_id(source: str, input_id: str) -> str:
    return f"{source}_{hashlib.sha256(input_id.encode()).hexdigest()[:16]}"


def plan_partitions(cfg: BuildConfig) -> list[Partition]:
    """Every partition of every source, in config order: the build's deterministic plan."""
    return [partition for source in cfg.build.sources for partition in plan_source(source)]


def plan_source(source, earlier: "EarlierBuilds | None" = None) -> list[Partition]:
    """One source's partitions, from a listing of its inputs (no image is read). With `earlier` (an incremental
    build), inputs whose input_id an earlier build lists are left out before the inputs are cut into partitions,
    so partitions stay full (tars: a tar whose samples an earlier build read is left out whole). Synthetic scenes
    are not listed by id: a scene an earlier build rendered drops as `duplicate` (same pixels) in the decode stage."""
    skip = earlier.skipper(source.name) if earlier else None
    if isinstance(source, UrlSource):
        from pipelines.sources.urls import expand_url_lists, plan_url_partitions

        specs = plan_url_partitions(expand_url_lists(source.lists), source.partition_size, url_col=source.url_col,
                                    caption_col=source.caption_col, skip=skip)
    elif isinstance(source, FolderSource):
        from pipelines.sources.folder import plan_folder_partitions

        specs = plan_folder_partitions(source.path, source.partition_size, skip=skip, layout=source.layout)
    elif isinstance(source, WebDatasetSource):
        from pipelines.sources.tars import plan_tar_partitions

        specs = plan_tar_partitions(source.paths, skip=skip)
    else:
        specs = _plan_synthetic(source)
    return [Partition(source.name, source.type, i, spec) for i, spec in enumerate(specs)]


def read_partition(cfg: BuildConfig, partition: Partition, work_dir: str | None = None) -> tuple[list[dict], dict]:
    """(records, source stats) of one partition, records in index order with the common fields filled in."""
    source = next(s for s in cfg.build.sources if s.name == partition.source)
    stats: dict[str, Any] = {}
    if isinstance(source, UrlSource):
        from pipelines.sources.urls import read_url_partition

        records, stats = read_url_partition(
            partition.spec, url_col=source.url_col, caption_col=source.caption_col, timeout_s=source.timeout_s,
            retries=source.retries, threads=source.threads, resize_mode=source.resize_mode,
            image_size=source.image_size, work_dir=work_dir)
    elif isinstance(source, FolderSource):
        from pipelines.sources.folder import read_folder_partition

        records = read_folder_partition(source.path, partition.spec)
    elif isinstance(source, WebDatasetSource):
        from pipelines.sources.tars import read_tar_partition

        records = read_tar_partition(partition.spec)
    else:
        records = _read_synthetic(source, partition.spec, cfg.run.seed)
    for record in records:
        if not record["input_id"]:  # a blank URL: still one distinct input (its row), never a shared id
            record["input_id"] = f"{partition.shard}#row{record['index']}"
        record.setdefault("group_id", None)
        record.setdefault("captions", {})
        record.setdefault("meta", {})
        record.setdefault("dropped", None)
        record.setdefault("error", None)
        record.update(shard=partition.shard, shard_items=len(records), source=partition.source,
                      source_type=partition.source_type, id=sample_id(partition.source, record["input_id"]),
                      timings={})
    return records, stats


# --- the synthetic world as a source -------------------------------------------------------------------------------

def _plan_synthetic(source: SyntheticSource) -> list[dict[str, Any]]:
    step = source.partition_size
    return [{"first_scene": start, "scenes": min(step, source.scenes - start)}
            for start in range(0, source.scenes, step)]


def _read_synthetic(source: SyntheticSource, spec: dict[str, Any], run_seed: int) -> list[dict]:
    """One record per scene: its views as ready Samples with the world's exact labels (depth, segmentation,
    keypoints, cameras, entities, captions, prompt colours)."""
    from pipelines.sources.synthetic import resolve_config, synthetic_samples

    seed = run_seed if source.seed is None else source.seed
    config = resolve_config(views_per_scene=source.views_per_scene, size=source.size,
                            with_figures=source.with_figures)
    by_scene: dict[int, list] = {}
    for sample in synthetic_samples(seed, spec["scenes"], config=config, first_scene=spec["first_scene"]):
        by_scene.setdefault(sample.meta["scene_index"], []).append(sample)
    records = []
    for index, (scene, samples) in enumerate(sorted(by_scene.items())):
        first = samples[0]
        records.append({
            "index": index,
            "input_id": f"synthetic:seed={seed}:scene={scene}:views={len(samples)}:size={source.size}",
            "group_id": first.group if len(samples) > 1 else None,
            "views": [{"sample": sample, "name": sample.key} for sample in samples],
            "captions": dict(first.captions),
            "meta": {"scene_index": scene, "seed": seed},
        })
    return records
