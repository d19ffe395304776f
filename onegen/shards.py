"""The build's output contract (docs/INTERFACES.md §2): the latent shard schema, the manifest and the build layout.

One module owns it, versioned, because it is where the data build (`pipelines/`) and its readers (the trainer,
evaluation, retraining in `training/`) meet; neither imports the other. pyarrow only (no torch), so readers can plan
from it on any machine.

Layout of a build under the storage root (`Storage`):

    builds/NAME/build.json              the build's identity: content hash + resolved content config (put-if-absent)
    builds/NAME/images/SHARD.tar        WebDataset: bucketed images, condition maps (PNG), ground truth, JSON
    builds/NAME/latents/SHARD.parquet   one row per (sample or group, resolution): LATENT_SCHEMA
    builds/NAME/stats/SHARD.json        kept / dropped per reason, seconds per stage (not part of the contract)
    builds/NAME/plan.json               the frozen plan: partitions -> inputs, written on the first run (put-if-absent)
    builds/NAME/manifest/SHARD.json     the shard's manifest entry, written LAST with put-if-absent: the commit
    builds/NAME/manifest/_final.json    written once every planned shard is committed: entries + duplicates

A shard exists for readers only through its manifest entry; files without one are an interrupted writer's and are
rewritten (same bytes) by the next run. SHARD = f"{source}-{partition:05d}", so names come from the inputs.

Latents are stored as the tokenizer's posterior per view: `mean` and `std` (std null for the exact pixel tokenizer,
whose posterior is a point), raw little-endian bytes with their shape and dtype ("float32", "float16", "bfloat16").
The trainer samples mean + std·ε with its own seeded generator, or takes the mean.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

SHARD_SCHEMA_VERSION = 2  # 2: modalities named by model/tasks.py's view roles (1 wrote blur, inpaint, semantic, boxes)
MANIFEST_ENTRY_SCHEMA = "onegen.manifest_entry/1"
MANIFEST_SCHEMA = "onegen.manifest/1"
BUILD_SCHEMA = "onegen.build/1"
PLAN_SCHEMA = "onegen.plan/1"
SCHEMA_METADATA_KEY = b"onegen.shard_schema"
SPLITS = ("train", "heldout")
LATENT_DTYPES = ("float32", "float16", "bfloat16")

_LATENT = pa.struct([
    ("view", pa.int32()),            # index of the picture view in its group (0 for single images)
    ("modality", pa.string()),       # one of MODALITIES: "image" or the condition's view role ("canny", "depth", ...)
    ("mean", pa.binary()),
    ("std", pa.binary()),            # null: a point posterior (pixel tokenizer)
    ("shape", pa.list_(pa.int32())),  # (C, h, w)
    ("dtype", pa.string()),
])
_CAPTION = pa.struct([("name", pa.string()), ("text", pa.string()), ("origin", pa.string())])  # source / generated
_ENTITY = pa.struct([
    ("view", pa.int32()), ("id", pa.int32()), ("class", pa.string()), ("colour", pa.string()),
    ("hex", pa.string()), ("label", pa.string()), ("box", pa.list_(pa.float32())),  # (x0, y0, x1, y1) pixels
])
_CAMERA = pa.struct([
    ("view", pa.int32()),
    ("c2w_opengl", pa.list_(pa.float64())),  # 16 values, row major
    ("K", pa.list_(pa.float64())),           # 9 values in bucket pixels, row major; null when the source had none
])

LATENT_SCHEMA = pa.schema([
    ("id", pa.string()),              # the sample (or group) id: the same at every resolution
    ("group_id", pa.string()),
    ("source", pa.string()),
    ("input_id", pa.string()),        # URL, or path + size + mtime/ETag, or tar + key, or synthetic scene
    ("sha256", pa.string()),          # of the decoded pixels (of every view's digest, for a group)
    ("split", pa.string()),
    ("resolution", pa.int32()),
    ("bucket_h", pa.int32()),
    ("bucket_w", pa.int32()),
    ("num_views", pa.int32()),        # picture views (1, or the multiview group's size)
    ("modalities", pa.list_(pa.string())),
    ("latents", pa.list_(_LATENT)),
    ("captions", pa.list_(_CAPTION)),
    ("class_colours", pa.string()),   # JSON {class: {"name", "hex"}}: the colours the prompt builder uses
    ("entities", pa.list_(_ENTITY)),
    ("cameras", pa.list_(_CAMERA)),
    ("params", pa.string()),          # JSON: how the conditions were drawn (blur sigma, canny thresholds, ...)
    ("image_tokenizer", pa.string()),  # id (hub id, path or "pixel") + sha of its config, below
    ("image_tokenizer_sha", pa.string()),
    ("downsample_factor", pa.int32()),
    ("text_tokenizer", pa.string()),   # the text tokenizer the trainer must use (null: the model's own)
], metadata={SCHEMA_METADATA_KEY: str(SHARD_SCHEMA_VERSION).encode()})


# The modalities a build writes, each named by the view role of model/tasks.py it fills, so a task's frame is read
# from the latent of the same name. Roles missing here (references, source images, HED) no build writes yet.
MODALITIES = ("image", "canny", "blurred_image", "masked_image", "depth", "semantic_map", "bounding_boxes", "pose")
# The WebDataset member holding a view's inpainting hole (8-bit grey, 255 = masked) beside its cond_masked_image.png.
INPAINT_MASK_MEMBER = "inpaint_mask.png"


class ShardSchemaError(ValueError):
    """A shard or manifest does not follow this module's schema (wrong version, missing columns, bad entry)."""


# --- paths ---------------------------------------------------------------------------------------------------------

def build_prefix(name: str) -> str:
    return f"builds/{name}"


def shard_name(source: str, partition: int) -> str:
    return f"{source}-{partition:05d}"


@dataclass(frozen=True)
class ShardPaths:
    build: str
    shard: str

    @property
    def images(self) -> str:
        return f"{build_prefix(self.build)}/images/{self.shard}.tar"

    @property
    def latents(self) -> str:
        return f"{build_prefix(self.build)}/latents/{self.shard}.parquet"

    @property
    def stats(self) -> str:
        return f"{build_prefix(self.build)}/stats/{self.shard}.json"

    @property
    def entry(self) -> str:
        return f"{build_prefix(self.build)}/manifest/{self.shard}.json"


def build_json_path(name: str) -> str:
    return f"{build_prefix(name)}/build.json"


def manifest_path(name: str) -> str:
    return f"{build_prefix(name)}/manifest/_final.json"  # '_': no shard is named so (source names start [a-z0-9])


def plan_path(name: str) -> str:
    return f"{build_prefix(name)}/plan.json"


# --- latents ---------------------------------------------------------------------------------------------------

def encode_array(array: np.ndarray, dtype: str) -> bytes:
    """float array -> little-endian bytes in `dtype` (bfloat16: round-to-nearest-even of float32)."""
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype must be one of {LATENT_DTYPES}, got {dtype!r}")
    values = np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "float32":
        return values.astype("<f4").tobytes()
    if dtype == "float16":
        return values.astype("<f2").tobytes()
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even, as torch's bfloat16 cast
    return rounded.astype("<u2").tobytes()


def decode_array(data: bytes, shape: Iterable[int], dtype: str) -> np.ndarray:
    """Inverse of `encode_array`: a float32 array of `shape`."""
    shape = tuple(int(s) for s in shape)
    if dtype == "float32":
        out = np.frombuffer(data, dtype="<f4")
    elif dtype == "float16":
        out = np.frombuffer(data, dtype="<f2").astype(np.float32)
    elif dtype == "bfloat16":
        out = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise ShardSchemaError(f"unknown latent dtype {dtype!r} (expected one of {LATENT_DTYPES})")
    return out.reshape(shape).astype(np.float32, copy=False)


def latent_entry(view: int, modality: str, mean: np.ndarray, std: np.ndarray | None, dtype: str) -> dict[str, Any]:
    return {"view": int(view), "modality": modality, "mean": encode_array(mean, dtype),
            "std": None if std is None else encode_array(std, dtype), "shape": [int(s) for s in mean.shape],
            "dtype": dtype}


def row_latents(row: dict[str, Any]) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]]:
    """{(view, modality): (mean, std or None)} of one row (as `pyarrow.Table.to_pylist` gives it)."""
    out = {}
    for item in row["latents"]:
        mean = decode_array(item["mean"], item["shape"], item["dtype"])
        std = None if item["std"] is None else decode_array(item["std"], item["shape"], item["dtype"])
        out[(item["view"], item["modality"])] = (mean, std)
    return out


def shard_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with every LATENT_SCHEMA column) -> a table of exactly this schema (ShardSchemaError if not)."""
    missing = [name for name in LATENT_SCHEMA.names if rows and name not in rows[0]]
    if missing:
        raise ShardSchemaError(f"shard rows lack columns {missing}")
    return pa.Table.from_pylist(rows, schema=LATENT_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    """The table as Parquet bytes, deterministic for the same rows and pyarrow version (no timestamps inside)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=256)
    return sink.getvalue().to_pybytes()


def check_shard_schema(schema: pa.Schema, where: str) -> None:
    """Refuse a shard written by another schema version, naming the file and what to do."""
    version = (schema.metadata or {}).get(SCHEMA_METADATA_KEY)
    if version != str(SHARD_SCHEMA_VERSION).encode():
        raise ShardSchemaError(f"{where}: shard schema version {version!r}, this onegen reads "
                               f"{SHARD_SCHEMA_VERSION}; rebuild the data with this version (onegen build) or use "
                               "the onegen version that wrote it")
    missing = [name for name in LATENT_SCHEMA.names if name not in schema.names]
    if missing:
        raise ShardSchemaError(f"{where}: missing columns {missing}")


def split_of(sample_id: str, heldout_fraction: float) -> str:
    """'heldout' for a stable `heldout_fraction` of ids (the first 8 bytes of sha256(id) as a fraction), else
    'train': the same id lands in the same split in every build and on every machine."""
    if heldout_fraction <= 0:
        return "train"
    value = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2**64
    return "heldout" if value < heldout_fraction else "train"


# --- manifest --------------------------------------------------------------------------------------------------

def canonical_json(document: Any) -> bytes:
    """The one JSON form of manifests and build files: sorted keys, no spaces, no NaN (equal content, equal bytes)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_ENTRY_KEYS = ("schema", "build", "shard", "source", "partition", "files", "rows", "samples", "counts", "ids",
               "input_ids", "dropped", "content_hash", "shard_schema_version", "code_version")


def check_entry(entry: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(entry, dict) or entry.get("schema") != MANIFEST_ENTRY_SCHEMA:
        raise ShardSchemaError(f"{where}: not a manifest entry of schema {MANIFEST_ENTRY_SCHEMA!r}")
    missing = [key for key in _ENTRY_KEYS if key not in entry]
    if missing:
        raise ShardSchemaError(f"{where}: manifest entry lacks {missing}")
    return entry


def read_entries(storage, build: str) -> dict[str, dict[str, Any]]:
    """{shard: manifest entry} of every committed shard of `build` (a `onegen.storage.Storage` at the root)."""
    prefix = f"{build_prefix(build)}/manifest"
    entries = {}
    for rel in storage.list(prefix):
        name = rel.rsplit("/", 1)[-1]
        if not name.endswith(".json") or name.startswith("_"):  # _final.json is the manifest, not an entry
            continue
        where = storage.uri(f"{prefix}/{name}")
        entries[name[:-len(".json")]] = check_entry(json.loads(storage.read_bytes(f"{prefix}/{name}")), where)
    return entries


def read_manifest(storage, build: str) -> dict[str, Any]:
    """The final manifest of a finished build (FileNotFoundError naming the path if the build is not complete)."""
    rel = manifest_path(build)
    if not storage.exists(rel):
        raise FileNotFoundError(f"{storage.uri(rel)}: no manifest; the build {build!r} has not finished (run the "
                                "same `onegen build` again to finish it)")
    manifest = json.loads(storage.read_bytes(rel))
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise ShardSchemaError(f"{storage.uri(rel)}: schema {manifest.get('schema')!r}, expected {MANIFEST_SCHEMA!r}")
    return manifest


def duplicate_losers(entries: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Exact duplicates over a whole build: entries in plan order (source order in the config, then partition),
    rows in index order; the first id with a given sha256 wins, every later one is listed as
    {"id", "sha256", "kept"}. Deterministic whatever order the shards were committed in."""
    first: dict[str, str] = {}
    losers = []
    for entry in entries:
        for sample_id, digest in zip(entry["ids"], entry["sha256"]):
            kept = first.setdefault(digest, sample_id)
            if kept != sample_id:
                losers.append({"id": sample_id, "sha256": digest, "kept": kept})
    return losers
