"""Commit one shard: tar, parquet and stats written atomically, then the manifest entry with put-if-absent.

The entry is the commit: a reader (and the next run) sees a shard only through it. Everything before it may be
interrupted at any byte (`ONEGEN_CRASH_AT` injects a SIGKILL at the named point, for the tests): files are written
by `Storage.write_bytes` (temp file + rename, one S3 PUT or a completed multipart upload), so a file is either its
whole old content or its whole new content, and a rerun rewrites the same bytes. Then the final manifest, once
every planned shard has an entry, lists them with the build's exact duplicates (onegen.shards.duplicate_losers).
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

from onegen.shards import (MANIFEST_ENTRY_SCHEMA, MANIFEST_SCHEMA, SHARD_SCHEMA_VERSION, ShardPaths, canonical_json,
                           duplicate_losers, manifest_path, parquet_bytes, sha256_hex, shard_table)
from onegen.storage import Storage
from pipelines.ingest import Partition
from pipelines.record import wds_tar_bytes

CRASH_POINTS = ("mid_tar", "before_parquet", "before_manifest", "in_manifest_put", "before_final")
_CHUNK = 1 << 16


def crash_point(point: str) -> None:
    """SIGKILL the driver when ONEGEN_CRASH_AT names `point` (the tests' exact crash points): its whole process group
    when it leads one (started from a shell, or with start_new_session), else itself only (a child sharing its
    parent's group, e.g. under pytest, must not take the parent down). Never an exception: Ray would retry it."""
    if os.environ.get("ONEGEN_CRASH_AT") == point:
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def _chunks(data: bytes, point: str) -> Iterator[bytes]:
    for start in range(0, len(data), _CHUNK):
        yield data[start:start + _CHUNK]
        if start == 0:
            crash_point(point)  # after the first chunk: the target holds a partial temp file, never a torn file


def commit_shard(storage: Storage, build: str, partition: Partition, records: list[dict], source_stats: dict,
                 content_hash: str, code_version: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the shard of `partition` from its records (all of them, any order) and commit it. Returns (entry,
    stats); the entry is the existing one if another writer committed first (its content is the same)."""
    records = sorted(records, key=lambda r: r["index"])
    kept = [r for r in records if not r["dropped"]]
    paths = ShardPaths(build, partition.shard)
    tar = wds_tar_bytes(members for r in kept for members in r["members"])
    rows = [row for r in kept for row in r["rows"]]
    table = parquet_bytes(shard_table(rows))

    storage.write_bytes(paths.images, _chunks(tar, "mid_tar"))
    crash_point("before_parquet")
    storage.write_bytes(paths.latents, table)
    stats = shard_stats(partition, records, source_stats)
    storage.write_bytes(paths.stats, json.dumps(stats, indent=1, sort_keys=True).encode())
    crash_point("before_manifest")

    counts = Counter((row["resolution"], row["bucket_h"], row["bucket_w"], row["num_views"],
                      tuple(row["modalities"]), row["split"]) for row in rows)
    entry = {
        "schema": MANIFEST_ENTRY_SCHEMA, "build": build, "shard": partition.shard, "source": partition.source,
        "source_type": partition.source_type, "partition": partition.index,
        "partition_spec_sha256": partition.spec_sha256,
        "files": {"images": {"path": paths.images, "sha256": sha256_hex(tar), "bytes": len(tar)},
                  "latents": {"path": paths.latents, "sha256": sha256_hex(table), "bytes": len(table)},
                  "stats": {"path": paths.stats}},
        "rows": len(rows), "samples": len(kept), "inputs": len(records),
        "counts": [{"resolution": k[0], "bucket": [k[1], k[2]], "views": k[3], "modalities": list(k[4]),
                    "split": k[5], "rows": n} for k, n in sorted(counts.items())],
        "ids": [r["id"] for r in kept], "sha256": [r["sha256"] for r in kept],
        "input_ids": [r["input_id"] for r in kept],
        "dropped": dict(sorted(Counter(r["dropped"] for r in records if r["dropped"]).items())),
        "dropped_input_ids": [[r["input_id"], r["dropped"]] for r in records if r["dropped"]],
        "content_hash": content_hash, "shard_schema_version": SHARD_SCHEMA_VERSION, "code_version": code_version,
    }
    left_out = left_out_counts(kept)
    if left_out:  # pictures taken out of identity groups (pipelines.process.leave_out), by reason
        entry["left_out"] = left_out
    labels = label_counts(kept)
    if labels:  # only where labelers ran: entries of builds without them stay as they were
        entry["labels"] = labels
        entry["labelled_by"] = {stage: sorted({r["labelled_by"][stage] for r in kept
                                               if stage in r.get("labelled_by", {})})
                                for stage in labels}  # which model (id@commit dtype) wrote them ([]: the sources)
    if not storage.put_if_absent(paths.entry, _chunks(canonical_json(entry), "in_manifest_put")):
        entry = json.loads(storage.read_bytes(paths.entry))
    return entry, stats


def label_counts(records: list[dict]) -> dict[str, dict[str, int]]:
    """{labeler stage: {outcome: samples}} over kept records (pipelines/labelers.py: "ok" or a failure reason)."""
    counts: dict[str, Counter] = {}
    for record in records:
        for stage, outcome in record.get("labels", {}).items():
            counts.setdefault(stage, Counter())[outcome] += 1
    return {stage: dict(sorted(c.items())) for stage, c in sorted(counts.items())}


def left_out_counts(records: list[dict]) -> dict[str, int]:
    """{reason: pictures} left out of the kept records' groups (meta["left_out"])."""
    return dict(sorted(Counter(item["reason"] for r in records for item in r["meta"].get("left_out", [])).items()))


def add_label_counts(total: dict[str, Counter], entry: dict[str, Any]) -> None:
    """Add a manifest entry's label counts to `total` ({stage: Counter of outcomes})."""
    for stage, counts in entry.get("labels", {}).items():
        total.setdefault(stage, Counter()).update(counts)


def shard_stats(partition: Partition, records: list[dict], source_stats: dict) -> dict[str, Any]:
    """Kept and dropped per reason (with example messages), labeler failures (with example messages) and seconds
    per stage: the shard's stats file."""
    seconds: Counter = Counter()
    for record in records:
        seconds.update(record["timings"])
    examples: dict[str, list[str]] = {}
    for record in records:
        if record["dropped"] and len(examples.setdefault(record["dropped"], [])) < 5:
            examples[record["dropped"]].append(f"{record['input_id']}: {record['error']}")
        for item in [] if record["dropped"] else record["meta"].get("left_out", []):
            if len(examples.setdefault(f"left_out.{item['reason']}", [])) < 5:
                examples[f"left_out.{item['reason']}"].append(f"{item['file']}: {item['message']}")
        for stage, message in record.get("label_errors", {}).items():
            key = f"{stage}.{record['labels'][stage]}"
            if len(examples.setdefault(key, [])) < 5:
                examples[key].append(f"{record['input_id']}: {message}")
    return {"shard": partition.shard, "source": partition.source, "inputs": len(records),
            "kept": sum(not r["dropped"] for r in records),
            "dropped": dict(Counter(r["dropped"] for r in records if r["dropped"])), "examples": examples,
            "seconds": dict(seconds), "source_stats": source_stats}


def write_manifest(storage: Storage, build: str, plan: list[Partition], entries: dict[str, dict],
                   content_hash: str) -> dict[str, Any] | None:
    """The final manifest once every planned shard is committed (None while some are missing). Put-if-absent:
    a finished build's manifest never changes."""
    if any(p.shard not in entries for p in plan):
        return None
    ordered = [entries[p.shard] for p in plan]
    dropped: Counter = Counter()
    left_out: Counter = Counter()
    labels: dict[str, Counter] = {}
    for entry in ordered:
        dropped.update(entry["dropped"])
        left_out.update(entry.get("left_out", {}))
        add_label_counts(labels, entry)
    duplicates = duplicate_losers(ordered)
    manifest = {
        "schema": MANIFEST_SCHEMA, "build": build, "content_hash": content_hash,
        "shard_schema_version": SHARD_SCHEMA_VERSION,
        "shards": [{"shard": e["shard"], "entry": f"{build}/manifest/{e['shard']}.json",
                    "entry_sha256": sha256_hex(canonical_json(e)), "rows": e["rows"], "samples": e["samples"]}
                   for e in ordered],
        "totals": {"shards": len(ordered), "inputs": sum(e["inputs"] for e in ordered),
                   "samples": sum(e["samples"] for e in ordered), "rows": sum(e["rows"] for e in ordered),
                   "duplicates": len(duplicates), "dropped": dict(sorted(dropped.items()))},
        "duplicates": duplicates,
    }
    if left_out:
        manifest["totals"]["left_out"] = dict(sorted(left_out.items()))
    if labels:
        manifest["totals"]["labels"] = {stage: dict(sorted(c.items())) for stage, c in sorted(labels.items())}
    storage.put_if_absent(manifest_path(build), canonical_json(manifest))
    return json.loads(storage.read_bytes(manifest_path(build)))
