"""The trainer's deterministic reader (INTERFACES §3): one global plan per (seed, stage, epoch) over the builds'
manifests, each global step one (bucket, view count, task) batch split evenly over the ranks, and a cursor that lives
in the checkpoint.

Why onegen shards data itself here (the one place it does): Ray Data's `streaming_split` has no in-epoch position, so
a restarted worker group could not continue at the exact sample it stopped at, and its split depends on the worker
count. Here the batch of global step k is a pure function of (seed, stage, epoch, index in epoch), computed the same
on every rank from the same manifests, so resuming from a checkpoint's cursor replays the identical stream, and every
rank slices its own contiguous share of the same global batch.

    index = index_rows(builds, resolution=64)                  # every train row of the stage's resolution
    plan = DataPlan(index, mixture, seed=0, stage=0, global_batch=8)
    cursor = plan.start()                                      # Cursor(epoch=0, index=0)
    key, choices = plan.batch(cursor)                          # the global batch of this step
    mine = rank_share(choices, rank, world_size)
    cursor = plan.advance(cursor)

Epoch plan: every row (of build b, copied floor(w_b) times plus once more with probability frac(w_b)) draws one task
of the mixture among those it supports (weights renormalised over them), a direction, a picture view and a caption;
the draws are grouped by (bucket, frames, mixture item), each group shuffled and cut into global batches (the tail that
does not fill one is dropped, never left uneven), and the batches shuffled. Builds are read only through the platform
reader (onegen.dataset); only final (complete) builds are trained on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.tasks import get_task
from onegen.dataset import Build
from training.samples import MAX_CAMERAS, Choice, supported_directions, usable_views

TRAIN_SPLIT = "train"
MAX_EMPTY_EPOCHS = 100


class DataPlanError(ValueError):
    """The builds cannot feed the stage as configured (a required task has no rows, no batch fills)."""


@dataclass(frozen=True)
class RowInfo:
    """What the plan needs of a row, read once from the shards (no latents decoded)."""

    build: int
    shard: str
    index: int
    id: str
    bucket: tuple[int, int]
    num_views: int
    keys: frozenset  # {(view, modality)} of its latents
    has_cameras: bool
    num_captions: int
    image_tokenizer: str


@dataclass(frozen=True)
class Cursor:
    """Where the data stream stands: the next global batch is `index` of epoch `epoch`."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, data: dict) -> "Cursor":
        return cls(int(data["epoch"]), int(data["index"]))


def index_rows(builds: Sequence[Build], resolution: int) -> list[RowInfo]:
    """The train-split rows of `resolution` of every build (duplicates the final manifest lists are skipped), in
    build, manifest-shard and row order: the same list on every rank."""
    import pyarrow.compute as pc

    rows: list[RowInfo] = []
    for b, build in enumerate(builds):
        skip = build.duplicate_ids()
        for shard in build.shards():
            table = build.table(shard)
            flat = pc.list_flatten(table["latents"])
            views = pc.struct_field(flat, "view").to_pylist()
            modalities = pc.struct_field(flat, "modality").to_pylist()
            lengths = pc.list_value_length(table["latents"]).to_pylist()
            camera_counts = pc.list_value_length(table["cameras"]).fill_null(0).to_pylist()
            caption_counts = pc.list_value_length(table["captions"]).fill_null(0).to_pylist()
            columns = table.select(["id", "split", "resolution", "bucket_h", "bucket_w", "num_views",
                                    "image_tokenizer"]).to_pylist()
            start = 0
            for i, meta in enumerate(columns):
                keys = frozenset(zip(views[start:start + lengths[i]], modalities[start:start + lengths[i]]))
                start += lengths[i]
                if meta["split"] != TRAIN_SPLIT or meta["resolution"] != resolution or meta["id"] in skip:
                    continue
                rows.append(RowInfo(b, shard, i, meta["id"], (meta["bucket_h"], meta["bucket_w"]), meta["num_views"],
                                    keys, camera_counts[i] >= meta["num_views"] > 0, caption_counts[i],
                                    meta["image_tokenizer"]))
    return rows


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


class DataPlan:
    """The global batches of a stage (see the module docstring). Pure: the same arguments give the same batches."""

    def __init__(self, rows: Sequence[RowInfo], mixture: Sequence, *, seed: int, stage: int, global_batch: int,
                 build_weights: Sequence[float] = (1.0,)):
        self.rows = list(rows)
        self.mixture = list(mixture)
        self.seed, self.stage, self.global_batch = int(seed), int(stage), int(global_batch)
        self.build_weights = list(build_weights)
        self.tasks = [get_task(item.task) for item in self.mixture]
        self.weights = np.array([item.weight for item in self.mixture], dtype=np.float64)
        # per row: [(item index, directions it can feed)]
        self.support = [self._row_support(row) for row in self.rows]

    def _row_support(self, row: RowInfo) -> list[tuple[int, tuple[str, ...]]]:
        out = []
        for i, (item, task) in enumerate(zip(self.mixture, self.tasks)):
            wanted = (item.direction,) if item.direction else tuple(task.directions)
            directions = supported_directions(task, wanted, row.keys, row.num_views, row.has_cameras)
            if directions:
                out.append((i, directions))
        return out

    def rows_per_item(self) -> list[int]:
        """How many rows can feed each mixture item."""
        counts = [0] * len(self.mixture)
        for support in self.support:
            for i, _ in support:
                counts[i] += 1
        return counts

    def problems(self) -> tuple[list[str], list[str]]:
        """(refusals, notes): a required item no row feeds is refused; an optional one is noted and skipped."""
        refusals, notes = [], []
        for item, count in zip(self.mixture, self.rows_per_item()):
            if count == 0:
                line = f"mixture task {item.label}: no row of the builds at this resolution can feed it"
                (notes if item.optional else refusals).append(line + (" (optional: skipped)" if item.optional else
                                                                      "; mark it optional: true or build its data"))
        if not refusals and not self.epoch(0):
            refusals.append(f"no (bucket, view count, task) group of the {len(self.rows)} rows fills a global batch "
                            f"of {self.global_batch}; lower train.global_batch_size or build more data")
        return refusals, notes

    def _frames(self, row: RowInfo, item: int) -> int:
        task = self.tasks[item]
        if task.view_layout == "camera_pairs":
            return 2 * min(row.num_views, MAX_CAMERAS)
        return task.num_views

    @functools.lru_cache(maxsize=4)
    def epoch(self, epoch: int) -> tuple[tuple[tuple, tuple[Choice, ...]], ...]:
        """The global batches of `epoch`: ((key, choices), ...) with key = (bucket, frames, item index)."""
        rng = _seed(self.seed, self.stage, epoch)
        groups: dict[tuple, list[Choice]] = {}
        for r, (row, support) in enumerate(zip(self.rows, self.support)):
            weight = self.build_weights[row.build] if row.build < len(self.build_weights) else 1.0
            copies = int(math.floor(weight)) + int(rng.random() < weight - math.floor(weight))
            for _ in range(copies if support else 0):
                items = [i for i, _ in support]
                p = self.weights[items] / self.weights[items].sum()
                pick = int(rng.choice(len(items), p=p))
                item, directions = support[pick]
                direction = directions[int(rng.integers(len(directions)))]
                task = self.tasks[item]
                if task.view_layout == "camera_pairs":
                    view = -1
                else:
                    views = usable_views(task, row.keys, row.num_views)
                    view = views[int(rng.integers(len(views)))]
                caption = int(rng.integers(row.num_captions)) if row.num_captions else 0
                key = (row.bucket, self._frames(row, item), item)
                groups.setdefault(key, []).append(Choice(r, item, direction, view, caption))
        batches = []
        for key in sorted(groups):
            members = groups[key]
            order = rng.permutation(len(members))
            for start in range(0, len(members) - self.global_batch + 1, self.global_batch):
                batches.append((key, tuple(members[j] for j in order[start:start + self.global_batch])))
        order = rng.permutation(len(batches))
        return tuple(batches[j] for j in order)

    def start(self) -> Cursor:
        return self._settle(Cursor(0, 0))

    def _settle(self, cursor: Cursor) -> Cursor:
        """The cursor moved past epochs that have no batch (possible by chance on tiny builds)."""
        for _ in range(MAX_EMPTY_EPOCHS):
            if cursor.index < len(self.epoch(cursor.epoch)):
                return cursor
            cursor = Cursor(cursor.epoch + 1, 0)
        raise DataPlanError(f"{MAX_EMPTY_EPOCHS} epochs in a row without a full global batch of "
                            f"{self.global_batch}; lower train.global_batch_size or build more data")

    def batch(self, cursor: Cursor) -> tuple[tuple, tuple[Choice, ...]]:
        return self.epoch(cursor.epoch)[cursor.index]

    def advance(self, cursor: Cursor) -> Cursor:
        return self._settle(Cursor(cursor.epoch, cursor.index + 1))

    def label(self, key: tuple) -> str:
        return self.mixture[key[2]].label


def rank_share(choices: Sequence[Choice], rank: int, world_size: int) -> list[Choice]:
    """Rank `rank`'s contiguous, equal share of a global batch."""
    if len(choices) % world_size:
        raise ValueError(f"a global batch of {len(choices)} does not split evenly over {world_size} ranks")
    per = len(choices) // world_size
    return list(choices[rank * per:(rank + 1) * per])


__all__ = ["Cursor", "DataPlan", "DataPlanError", "RowInfo", "index_rows", "rank_share"]
