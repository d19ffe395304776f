"""The trainer's deterministic reader (INTERFACES §3): one global plan per (seed, stage) over the builds' manifests,
each global step one (bucket, view count, task) batch split evenly over the ranks, and a cursor that lives in the
checkpoint.

Why onegen shards data itself here (the one place it does): Ray Data's `streaming_split` has no in-epoch position, so
a restarted worker group could not continue at the exact sample it stopped at, and its split depends on the worker
count. Here the batch of global step k is a pure function of (seed, stage, k) and the cursor, computed the same on
every rank from the same manifests, so resuming from a checkpoint's cursor replays the identical stream, and every
rank slices its own contiguous share of the same global batch.

    index = index_rows(builds, [64])                           # every train row of the stage's resolutions
    plan = DataPlan(index, mixture, seed=0, stage=0, global_batch=8, resolution=64)
    cursor = plan.start()                                      # Cursor(step=0, positions=((0, 0), ...))
    key, choices = plan.batch(cursor)                          # the global batch of this step
    mine = rank_share(choices, rank, world_size)
    cursor = plan.advance(cursor)

The mixture is a per-step draw, so it is what the config says (PEERS.md: a peer's mixing ratios had no effect):
global step k trains mixture item i with probability weight_i / sum of the weights of the items the builds feed,
drawn from (seed, stage, k) alone, whatever the items' row counts (OneDiffusion's "equal probability" per batch is
equal weights). Items without rows are never drawn (optional ones are noted as skipped; required ones refused). Each
item then takes the next batch of its own stream of epochs: in epoch e of item i every row that can feed it (of its
resolution, frame range, modalities; rows of build b copied floor(w_b) times plus once more with probability
frac(w_b)) draws a direction, a picture view and a caption; the draws are grouped by (bucket, frames), each group
shuffled and cut into global batches (the tail that does not fill one is dropped, never left uneven), and the
batches shuffled. The cursor holds the step and every item's (epoch, index). Builds are read only through the
platform reader (onegen.dataset); only final (complete) builds are trained on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from model.tasks import get_task
from onegen.dataset import Build
from training.samples import Choice, sequence_frames, supported_directions, usable_views

TRAIN_SPLIT = "train"
MAX_EMPTY_EPOCHS = 100
MIXTURE_STREAM = 0x6D6978  # "mix": the per-step item draws' own random stream
MIXTURE_COUNTS = ("tasks", "sources", "buckets", "frames")  # the realised mixture's tables (count_step)


class DataPlanError(ValueError):
    """The builds cannot feed the stage as configured (a required task has no rows, no batch fills)."""


@dataclass(frozen=True)
class RowInfo:
    """What the plan needs of a row, read once from the shards (no latents decoded)."""

    build: int
    shard: str
    index: int
    id: str
    source: str
    resolution: int
    bucket: tuple[int, int]
    num_views: int
    keys: frozenset  # {(view, modality)} of its latents
    has_cameras: bool
    num_captions: int
    image_tokenizer: str


@dataclass(frozen=True)
class Cursor:
    """Where the data stream stands: the next global step is `step`; mixture item i's next batch is batch
    positions[i][1] of its epoch positions[i][0]."""

    step: int
    positions: tuple[tuple[int, int], ...]

    def to_dict(self) -> dict:
        return {"step": self.step, "positions": [list(p) for p in self.positions]}

    @classmethod
    def from_dict(cls, data: dict) -> "Cursor":
        return cls(int(data["step"]), tuple((int(e), int(i)) for e, i in data["positions"]))


def index_rows(builds: Sequence[Build], resolutions: int | Iterable[int]) -> list[RowInfo]:
    """The train-split rows of the given resolutions of every build (duplicates the final manifest lists are
    skipped), in build, manifest-shard and row order: the same list on every rank."""
    import pyarrow.compute as pc

    wanted = {resolutions} if isinstance(resolutions, int) else set(resolutions)
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
            columns = table.select(["id", "source", "split", "resolution", "bucket_h", "bucket_w", "num_views",
                                    "image_tokenizer"]).to_pylist()
            start = 0
            for i, meta in enumerate(columns):
                keys = frozenset(zip(views[start:start + lengths[i]], modalities[start:start + lengths[i]]))
                start += lengths[i]
                if meta["split"] != TRAIN_SPLIT or meta["resolution"] not in wanted or meta["id"] in skip:
                    continue
                rows.append(RowInfo(b, shard, i, meta["id"], meta["source"], meta["resolution"],
                                    (meta["bucket_h"], meta["bucket_w"]), meta["num_views"],
                                    keys, camera_counts[i] >= meta["num_views"] > 0, caption_counts[i],
                                    meta["image_tokenizer"]))
    return rows


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


class DataPlan:
    """The global batches of a stage (see the module docstring). Pure: the same arguments give the same batches."""

    def __init__(self, rows: Sequence[RowInfo], mixture: Sequence, *, seed: int, stage: int, global_batch: int,
                 resolution: int, build_weights: Sequence[float] = (1.0,), build_names: Sequence[str] = ()):
        self.rows = list(rows)
        self.mixture = list(mixture)
        self.seed, self.stage, self.global_batch = int(seed), int(stage), int(global_batch)
        self.resolution = int(resolution)
        self.build_weights = list(build_weights)
        self.build_names = list(build_names)
        self.tasks = [get_task(item.task) for item in self.mixture]
        # per item: [(row index, directions it can feed)]
        self.support = [self._item_support(i) for i in range(len(self.mixture))]
        self.active = [i for i, support in enumerate(self.support) if support and self.epoch(i, 0)]
        weights = np.array([self.mixture[i].weight for i in self.active], dtype=np.float64)
        self.probabilities = weights / weights.sum() if self.active else weights

    def _item_support(self, item: int) -> list[tuple[int, tuple[str, ...]]]:
        spec, task = self.mixture[item], self.tasks[item]
        resolution = spec.resolution or self.resolution
        wanted = (spec.direction,) if spec.direction else tuple(task.directions)
        out = []
        for r, row in enumerate(self.rows):
            if row.resolution != resolution:
                continue
            if spec.views is not None and not spec.views[0] <= self._frames(row, item) <= spec.views[1]:
                continue
            directions = supported_directions(task, wanted, row.keys, row.num_views, row.has_cameras)
            if directions:
                out.append((r, directions))
        return out

    def rows_per_item(self) -> list[int]:
        """How many rows can feed each mixture item."""
        return [len(support) for support in self.support]

    def problems(self) -> tuple[list[str], list[str]]:
        """(refusals, notes): a required item no row feeds (or whose rows fill no global batch) is refused; an
        optional one is noted and skipped (never drawn)."""
        refusals, notes = [], []
        for i, (item, count) in enumerate(zip(self.mixture, self.rows_per_item())):
            if i in self.active:
                continue
            where = _where(item, item.resolution or self.resolution)
            line = (f"mixture task {item.label}: no row of the builds {where} can feed it" if count == 0 else
                    f"mixture task {item.label}: its {count} rows {where} fill no global batch of {self.global_batch}")
            if item.optional:
                notes.append(line + " (optional: skipped, never drawn)")
            else:
                refusals.append(line + ("; mark it optional: true or build its data" if count == 0 else
                                        "; lower train.global_batch_size or build more data"))
        if not self.active and not refusals:
            refusals.append("no mixture task can be fed by the builds (every one is optional and skipped); build "
                            "the data of one of them or change the mixture")
        return refusals, notes

    def _frames(self, row: RowInfo, item: int) -> int:
        return sequence_frames(self.tasks[item], row.num_views)

    @functools.lru_cache(maxsize=32)
    def epoch(self, item: int, epoch: int) -> tuple[tuple[tuple, tuple[Choice, ...]], ...]:
        """Mixture item `item`'s global batches in its epoch `epoch`: ((key, choices), ...) with key = (bucket,
        frames, item)."""
        rng = _seed(self.seed, self.stage, item, epoch)
        task = self.tasks[item]
        groups: dict[tuple, list[Choice]] = {}
        for r, directions in self.support[item]:
            row = self.rows[r]
            weight = self.build_weights[row.build] if row.build < len(self.build_weights) else 1.0
            copies = int(math.floor(weight)) + int(rng.random() < weight - math.floor(weight))
            for _ in range(copies):
                direction = directions[int(rng.integers(len(directions)))]
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

    def draw(self, step: int) -> int:
        """The mixture item global step `step` trains: a function of (seed, stage, step) alone."""
        if not self.active:
            raise DataPlanError("no mixture item of the stage can be fed by the builds")
        pick = _seed(self.seed, self.stage, MIXTURE_STREAM, step).choice(len(self.active), p=self.probabilities)
        return self.active[int(pick)]

    def start(self) -> Cursor:
        return Cursor(0, tuple(self._settle(i, 0, 0) for i in range(len(self.mixture))))

    def _settle(self, item: int, epoch: int, index: int) -> tuple[int, int]:
        """(epoch, index) moved past epochs of the item that have no batch (possible by chance on tiny builds)."""
        if item not in self.active:
            return (0, 0)
        for _ in range(MAX_EMPTY_EPOCHS):
            if index < len(self.epoch(item, epoch)):
                return (epoch, index)
            epoch, index = epoch + 1, 0
        raise DataPlanError(f"mixture task {self.mixture[item].label}: {MAX_EMPTY_EPOCHS} epochs in a row without a "
                            f"full global batch of {self.global_batch}; lower train.global_batch_size or build more "
                            "data")

    def batch(self, cursor: Cursor) -> tuple[tuple, tuple[Choice, ...]]:
        item = self.draw(cursor.step)
        epoch, index = cursor.positions[item]
        return self.epoch(item, epoch)[index]

    def advance(self, cursor: Cursor) -> Cursor:
        item = self.draw(cursor.step)
        positions = list(cursor.positions)
        epoch, index = positions[item]
        positions[item] = self._settle(item, epoch, index + 1)
        return Cursor(cursor.step + 1, tuple(positions))

    def label(self, key: tuple) -> str:
        return self.mixture[key[2]].label

    def source_name(self, row: RowInfo) -> str:
        return f"{self.build_names[row.build]}/{row.source}" if row.build < len(self.build_names) else row.source

    def configured(self) -> dict[str, float]:
        """{label: probability} of the configured mixture over every item (skipped ones included)."""
        weights = np.array([item.weight for item in self.mixture], dtype=np.float64)
        return {item.label: float(w / weights.sum()) for item, w in zip(self.mixture, weights)}

    def effective(self) -> dict[str, float]:
        """{label: probability a step draws it}: the configured weights renormalised over the items drawn."""
        return {self.mixture[i].label: float(p) for i, p in zip(self.active, self.probabilities)}


def count_step(counts: dict, plan: DataPlan, key: tuple, choices: Sequence[Choice]) -> dict:
    """Add one global step to the realised mixture `counts` (kept in the checkpoint, so a resumed stage counts on):
    steps by mixture item; samples by source, bucket and frame count."""
    counts = {"steps": counts.get("steps", 0) + 1, **{k: dict(counts.get(k, {})) for k in MIXTURE_COUNTS}}
    _add(counts["tasks"], plan.label(key), 1)
    _add(counts["buckets"], f"{key[0][0]}x{key[0][1]}", len(choices))
    _add(counts["frames"], str(key[1]), len(choices))
    for choice in choices:
        _add(counts["sources"], plan.source_name(plan.rows[choice.row]), 1)
    return counts


def _add(table: dict, key: str, n: int) -> None:
    table[key] = table.get(key, 0) + n


def manifest_problems(builds: Sequence[Build], stage, global_batch: int) -> tuple[list[str], list[str]]:
    """(refusals, notes) of a stage from the builds' manifest counts alone (no shard read): a required mixture item
    for which no (resolution, bucket, frames, modality set) count of train rows holds a global batch is refused.
    The manifest's modality sets are per row and it does not record cameras, so this check is the optimistic one the
    driver runs for every stage before any worker starts; DataPlan.problems, over the rows, is the exact one."""
    counts = [c for build in builds for entry in build.entries().values() for c in entry["counts"]
              if c["split"] == TRAIN_SPLIT]
    refusals, notes = [], []
    fed = 0
    for item in stage.mixture:
        task = get_task(item.task)
        resolution = item.resolution_in(stage)
        per_bucket: dict[tuple, int] = {}
        for c in counts:
            # optimistic keys: every view holds every modality of the row's set, and there are cameras
            keys = frozenset((v, m) for v in range(c["views"]) for m in c["modalities"])
            frames = sequence_frames(task, c["views"])
            if c["resolution"] != resolution or not supported_directions(task, tuple(task.directions), keys,
                                                                         c["views"], True) or \
                    (item.views is not None and not item.views[0] <= frames <= item.views[1]):
                continue
            _add(per_bucket, (tuple(c["bucket"]), frames), c["rows"])
        if max(per_bucket.values(), default=0) >= global_batch:
            fed += 1
            continue
        line = (f"stage {stage.name}: mixture task {item.label}: the builds' manifests list no train rows "
                f"{_where(item, resolution)} that can feed it" +
                (f" {global_batch} at a time (a global batch)" if per_bucket else ""))
        if item.optional:
            notes.append(line + " (optional: skipped, never drawn)")
        else:
            refusals.append(line + "; mark it optional: true, build its data, or lower train.global_batch_size")
    if not fed and not refusals:
        refusals.append(f"stage {stage.name}: no mixture task can be fed by the builds (every one is optional and "
                        "skipped); build the data of one of them or change the mixture")
    return refusals, notes


def _where(item, resolution: int) -> str:
    return f"at resolution {resolution}" + (f" with {item.views[0]}-{item.views[1]} frames" if item.views else "")


def rank_share(choices: Sequence[Choice], rank: int, world_size: int) -> list[Choice]:
    """Rank `rank`'s contiguous, equal share of a global batch."""
    if len(choices) % world_size:
        raise ValueError(f"a global batch of {len(choices)} does not split evenly over {world_size} ranks")
    per = len(choices) // world_size
    return list(choices[rank * per:(rank + 1) * per])


__all__ = ["Cursor", "DataPlan", "DataPlanError", "MIXTURE_COUNTS", "RowInfo", "count_step", "index_rows",
           "manifest_problems", "rank_share"]
