"""The one reader of a build (docs/INTERFACES.md §6): open it by name or URI, list its shards from the manifest,
iterate its rows with latents decoded to tensors. The trainer, evaluation, retraining and `onegen build inspect`
read builds only through this module and `onegen.shards` (the schema), never through `pipelines/`.

    build = open_build("synthetic_small", storage_root="work/data")     # a name, resolved against a root
    build = open_build("s3://bucket/onegen/builds/web-2026-12")          # or the build's full URI
    build.complete                # the final manifest exists (the trainer trains only on complete builds)
    for row in build.rows(resolution=256):
        row["latents"][(0, "image")]   # (mean tensor, std tensor or None), shape (C, h, w), float32 by default
        row["captions"], row["bucket_h"], row["entities"], row["cameras"] ...

Only shards with a manifest entry exist for a reader (an interrupted writer's files never show), and every file is
checked against the sha256 its entry recorded before a row of it is returned.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from onegen.shards import (ShardSchemaError, build_json_path, build_prefix, canonical_json, check_shard_schema,
                           read_entries, read_manifest, row_latents, sha256_hex)
from onegen.storage import Storage


def locate_build(target: str, storage_root: str | None = None) -> tuple[Storage, str]:
    """(storage at the root, build name) from a build URI (ROOT/builds/NAME), a root holding exactly one build, or a
    bare name resolved against `storage_root`."""
    target = str(target).rstrip("/")
    if "/builds/" in target + "/" and not target.endswith("/builds"):
        root, _, rest = target.rpartition("/builds/")
        return Storage(root or "/"), rest.split("/")[0]
    if storage_root is not None and "/" not in target and ":" not in target:
        return Storage(storage_root), target
    storage = Storage(target)
    names = build_names(storage)
    if len(names) != 1:
        raise FileNotFoundError(f"{storage.uri('builds')}: {len(names)} builds ({', '.join(names) or 'none'}); "
                                f"name one as {storage.uri('builds')}/NAME")
    return storage, names[0]


def build_names(storage: Storage) -> list[str]:
    """The builds under a storage root (those with a build.json)."""
    return sorted({rel.split("/")[1] for rel in storage.list("builds", recursive=True)
                   if rel.count("/") == 2 and rel.endswith("/build.json")})


def open_build(target: str, storage_root: str | None = None) -> "Build":
    """The build at `target` (see `locate_build`); FileNotFoundError naming where it looked if there is none."""
    storage, name = locate_build(target, storage_root)
    if not storage.exists(build_json_path(name)):
        known = build_names(storage)
        raise FileNotFoundError(f"{storage.uri(build_prefix(name))}: no build there (builds under "
                                f"{storage.uri('builds')}: {', '.join(known) or 'none'}); run `onegen build` first "
                                "or check the name / storage.root")
    return Build(storage, name)


@dataclass
class Build:
    storage: Storage
    name: str
    _entries: dict[str, dict[str, Any]] | None = field(default=None, repr=False)
    _tables: "OrderedDict[str, Any]" = field(default_factory=OrderedDict, repr=False)
    table_cache: int = 8  # shard tables kept decoded by `row` (random access by the trainer's plan)

    @property
    def uri(self) -> str:
        return self.storage.uri(build_prefix(self.name))

    @property
    def complete(self) -> bool:
        try:
            self.manifest()
        except FileNotFoundError:
            return False
        return True

    def manifest(self) -> dict[str, Any]:
        """The final manifest (FileNotFoundError, saying how to finish the build, while it is incomplete)."""
        return read_manifest(self.storage, self.name)

    def manifest_digest(self) -> str:
        """sha256 of the final manifest (canonical JSON): what a training run records to name the data it read."""
        return sha256_hex(canonical_json(self.manifest()))

    def entries(self) -> dict[str, dict[str, Any]]:
        """{shard: manifest entry} of every committed shard, in shard-name order."""
        if self._entries is None:
            self._entries = dict(sorted(read_entries(self.storage, self.name).items()))
        return self._entries

    def shards(self) -> list[str]:
        """The shards a reader may use: the final manifest's list (its order: the plan's) when the build is complete,
        else the committed ones."""
        try:
            return [item["shard"] for item in self.manifest()["shards"]]
        except FileNotFoundError:
            return list(self.entries())

    def duplicate_ids(self) -> set[str]:
        """Ids the final manifest lists as exact duplicates of an earlier sample (readers usually skip them)."""
        try:
            return {item["id"] for item in self.manifest()["duplicates"]}
        except FileNotFoundError:
            return set()

    def read_file(self, shard: str, kind: str) -> bytes:
        """The bytes of a shard's `images` tar or `latents` parquet, checked against the manifest's sha256."""
        if shard not in self.entries():
            committed = ", ".join(self.entries()) or "none"
            raise KeyError(f"{self.uri}: no committed shard {shard!r} (committed: {committed})")
        recorded = self.entries()[shard]["files"][kind]
        data = self.storage.read_bytes(recorded["path"])
        if sha256_hex(data) != recorded["sha256"]:
            raise ShardSchemaError(f"{self.storage.uri(recorded['path'])}: sha256 differs from the manifest entry's "
                                   "(the file was changed after the build committed it); rebuild under a new name")
        return data

    def table(self, shard: str):
        """One shard's latent rows as a pyarrow Table (schema checked)."""
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(self.read_file(shard, "latents")))
        check_shard_schema(table.schema, self.storage.uri(self.entries()[shard]["files"]["latents"]["path"]))
        return table

    def row(self, shard: str, index: int, *, as_tensors: bool = True) -> dict[str, Any]:
        """Row `index` of a shard, decoded as `rows` decodes it; the last `table_cache` shard tables stay in memory,
        so a reader that jumps between rows (the trainer's plan) reads and checks each shard once in a while."""
        table = self._tables.pop(shard, None)
        if table is None:
            table = self.table(shard)
        self._tables[shard] = table
        while len(self._tables) > self.table_cache:
            self._tables.popitem(last=False)
        return _decoded(table.slice(index, 1).to_pylist()[0], as_tensors)

    def rows(self, shards: Iterable[str] | None = None, *, resolution: int | None = None, split: str | None = None,
             skip_duplicates: bool = True, as_tensors: bool = True) -> Iterator[dict[str, Any]]:
        """Every row of `shards` (default: all), in shard then row order, with "latents" = {(view, modality):
        (mean, std or None)} as float32 torch tensors (numpy arrays with as_tensors=False), whatever dtype the build
        stored them in."""
        skip = self.duplicate_ids() if skip_duplicates else set()
        for shard in (self.shards() if shards is None else shards):
            for row in self.table(shard).to_pylist():
                if row["id"] in skip or (resolution is not None and row["resolution"] != resolution) or \
                        (split is not None and row["split"] != split):
                    continue
                yield _decoded(row, as_tensors)


def prompt_kwargs(task, row: dict[str, Any], view: int) -> dict:
    """Extra prompt fields a row gives a task (model.tasks.Task) of its style: the colour entries of the classes
    seen in `view` for semantic maps and boxes (the colours the build drew them in). The trainer and `inspect`
    build their prompts with it."""
    if task.prompt_style not in ("colour_mask", "colour_box"):
        return {}
    entries: dict[str, str] = {}
    colours = json.loads(row.get("class_colours") or "{}")
    for entity in row.get("entities") or []:
        if entity["view"] == view and entity["class"] not in entries:
            entries[entity["class"]] = entity.get("colour") or colours.get(entity["class"], {}).get("name")
    return {"entries": [(label, colour) for label, colour in entries.items() if colour]}


def _decoded(row: dict[str, Any], as_tensors: bool) -> dict[str, Any]:
    latents = row_latents(row)
    if as_tensors:
        latents = {key: (_tensor(mean), None if std is None else _tensor(std)) for key, (mean, std) in latents.items()}
    row["latents"] = latents
    return row


def _tensor(array):
    import torch

    return torch.from_numpy(array.copy())  # decoded arrays view the parquet buffer (read-only): torch wants its own
