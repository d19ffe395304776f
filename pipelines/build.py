"""`onegen build` / `python -m pipelines.build`: the One-Gen data build as one Ray Data job, exactly-once.

    python -m pipelines.build --config configs/build/NAME.yaml [--set key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m pipelines.build --config ...

1. Claim the build name: `builds/NAME/build.json` (content hash + content config) is created with put-if-absent;
   a different content hash under the same name is refused (builds are immutable; pick a new name).
2. Plan: on the first run every source is listed and cut into partitions (pipelines/ingest.py), and the plan is
   frozen in `builds/NAME/plan.json` (put-if-absent). Every rerun works from that plan, so inputs added to a source
   later never slip into this build (they go into a new one) and a rerun that finds the sources changed says so.
   Shards with a manifest entry are skipped.
3. Run the rest as Ray Data operators, streaming with Ray Data's backpressure:
       ingest -> decode -> bucket -> conditions -> pack's members (one task per partition: img2dataset / folder /
       tars / synthetic world read, then the weight-free stages in slices of stages.batch_size records, and the
       WebDataset members' PNGs) -> encode (actor pool holding the tokenizer; the latents into the rows)
   Records flow pickled in one column: they hold nested, ragged arrays that Arrow has no type for.
4. The driver gathers each shard's records (order preserved, so about one shard at a time is open) and commits it
   (pipelines/shard_writer.py) in a writer thread while the stream goes on. Then the final manifest.
5. MLflow: one run per build (a rerun of an unfinished build continues it), resolved config, the closing numbers,
   the manifest as an artifact and `mlflow.log_input` of the build, so a training run can name the data it used.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onegen.build_config import BuildConfig
from onegen.config import CONTENT, MACHINE, content_hash, fields_by_role
from onegen.errors import UsageError, step
from onegen.shards import (BUILD_SCHEMA, PLAN_SCHEMA, SHARD_SCHEMA_VERSION, build_json_path, build_prefix,
                           canonical_json, manifest_path, plan_path, read_entries, sha256_hex)
from onegen.storage import Storage
from pipelines.earlier import EarlierBuilds, load_earlier
from pipelines.ingest import Partition, plan_source, read_partition
from pipelines.labelers import LABELERS, one_line_start_failures
from pipelines.process import (WEIGHT_FREE_STAGES, batch_of, check_image_tokenizer,
                               records_of, run_stages, stage_chain)

TAG_BUILD = "onegen.build"
TAG_BUILD_URI = "onegen.build_uri"
STAGES = ("ingest", "decode", *(labeler.stage for labeler in LABELERS if labeler.sees == "decoded"), "bucket",
          *(labeler.stage for labeler in LABELERS if labeler.sees != "decoded"), "conditions", "encode", "pack")


class BuildConflict(UsageError):
    """The build name holds a build of another config, or its inputs changed: builds are immutable."""


@dataclass
class BuildSummary:
    name: str
    uri: str
    shards_planned: int
    shards_committed: int = 0
    shards_skipped: int = 0
    inputs: int = 0
    kept: int = 0
    rows: int = 0
    bytes_written: int = 0
    dropped: Counter = field(default_factory=Counter)
    left_out: Counter = field(default_factory=Counter)  # pictures taken out of identity groups, by reason
    labels: dict[str, Counter] = field(default_factory=dict)  # {labeler stage: {outcome: samples}}
    seconds: Counter = field(default_factory=Counter)  # wall time per stage, summed over records (and workers)
    source_stats: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    run_id: str | None = None
    mlflow: list[str] = field(default_factory=list)  # where to see the build's MLflow run (table lines)
    build_bytes: int = 0  # every committed shard's tar + parquet, whichever attempt wrote it

    def table(self) -> str:
        lines = [f"build {self.name} -> {self.uri}",
                 f"  shards: {self.shards_committed} committed, {self.shards_skipped} skipped (already committed), "
                 f"{self.shards_planned} planned",
                 f"  inputs {self.inputs}: kept {self.kept}, dropped {sum(self.dropped.values())}; "
                 f"{self.rows} latent rows; {self.bytes_written / 2**20:.1f} MiB written in {self.wall_s:.1f} s "
                 f"({self.inputs / max(self.wall_s, 1e-9):.2f} inputs/s)"]
        if self.seconds:
            lines.append("  stage        samples/s   s/sample (summed over workers)")
            for stage in STAGES:
                parts = sorted(key for key in self.seconds if key.startswith(f"{stage}."))  # e.g. conditions.canny
                for name in ([stage] if self.seconds.get(stage) else []) + parts:
                    per = self.seconds[name] / max(1, self.inputs)
                    label = f"  {name.split('.', 1)[1]}" if "." in name else name
                    lines.append(f"  {label:<12} {1 / per if per else float('inf'):>9.1f}   {per:.4f}")
        if self.dropped:
            lines.append("  dropped by reason:")
            lines += [f"    {reason:<22} {n}" for reason, n in sorted(self.dropped.items())]
        if self.left_out:  # the group is kept without them (their messages: stats/SHARD.json)
            lines.append("  pictures left out of their groups: " +
                         ", ".join(f"{n} {reason}" for reason, n in sorted(self.left_out.items())))
        for stage, counts in sorted(self.labels.items()):  # failures keep the sample: counted, not dropped
            lines.append(f"  {stage} labels: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
                         + (" (their messages: stats/SHARD.json)" if "error" in counts else ""))
        for source, stats in sorted(self.source_stats.items()):
            counts = ", ".join(f"{stats.get(key, 0)} {key}" for key in ("successes", "failed_to_download",
                                                                          "failed_to_resize"))
            lines.append(f"  {source} (img2dataset): {stats.get('count', 0)} urls: {counts}")
            lines += [f"    {n:>5}  {_one_line(message)}" for message, n in sorted(stats.get("errors", {}).items(),
                                                                                  key=lambda item: (-item[1], item[0]))]
        lines += [f"  note: {note}" for note in self.notes]
        if self.manifest:
            totals = self.manifest["totals"]
            lines.append(f"  manifest: {totals['shards']} shards, {totals['samples']} samples, {totals['rows']} rows, "
                         f"{totals['duplicates']} exact duplicates listed")
            lines.append(f"            of {totals['inputs']} inputs, {sum(totals['dropped'].values())} dropped; "
                         f"{self.build_bytes / 2**20:.1f} MiB (the whole build: manifest/_final.json)")
        if self.mlflow:
            lines += [f"  mlflow: {self.mlflow[0]}"] + [f"          {line}" for line in self.mlflow[1:]]
        return "\n".join(lines)


def _one_line(message: str, width: int = 100) -> str:
    """An error message on one table line (urllib's redirect-loop message spans three)."""
    text = " ".join(str(message).split())
    return text if len(text) <= width else text[:width - 3] + "..."


# --- identity of a build ---------------------------------------------------------------------------------------------

def code_version() -> dict[str, str]:
    from importlib import metadata

    from onegen.tracking import git_state

    try:
        version = metadata.version("onegen")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed (a Ray job's working dir)
        version = "unknown"
    commit, dirty = git_state()
    return {"onegen": version, "git_commit": commit, "git_dirty": dirty}


def claim_build(storage: Storage, cfg: BuildConfig) -> dict[str, Any]:
    """Create builds/NAME/build.json, or check that the existing one is this config's (BuildConflict if not)."""
    name, digest = cfg.build_name, content_hash(cfg)
    document = {"schema": BUILD_SCHEMA, "build": name, "content_hash": digest,
                "shard_schema_version": SHARD_SCHEMA_VERSION, "content": fields_by_role(cfg, {CONTENT})}
    rel = build_json_path(name)
    storage.put_if_absent(rel, canonical_json(document))
    existing = json.loads(storage.read_bytes(rel))
    if existing.get("content_hash") != digest:
        changed = sorted(key for key in set(existing.get("content", {})) | set(document["content"])
                         if existing.get("content", {}).get(key) != document["content"].get(key))
        raise BuildConflict(
            f"{storage.uri(rel)} holds build {name!r} of another config (changed: {', '.join(changed) or 'schema'})"
            f"; builds are immutable: start a new build with --set build.name={name}-v2 (or another name), or "
            f"rerun with the config that made it to finish or extend nothing")
    return existing


def source_locations(cfg: BuildConfig) -> dict[str, dict[str, Any]]:
    """{source name: its machine fields (folder path, url-list files)}: where the inputs were, not what they are."""
    return {source.name: fields_by_role(source, {MACHINE}) for source in cfg.build.sources}


def frozen_plan(storage: Storage, cfg: BuildConfig, digest: str, labelled: dict[str, dict] | None = None
                ) -> tuple[list[Partition], dict[str, Any], "EarlierBuilds | None"]:
    """(the build's partitions, the plan document, the earlier builds when this run froze the plan, else None).
    The first run reads the earlier builds (build.previous), lists every source without what they hold and writes
    builds/NAME/plan.json with put-if-absent (of two racing first runs, one plan wins and both use it); later runs
    read it back and never re-plan. `labelled`: what the labelers' preflight resolved (their hub commits), frozen
    with the plan."""
    rel = plan_path(cfg.build_name)
    earlier = None
    if not storage.exists(rel):
        with step("read the earlier builds", ", ".join(cfg.build.previous) or "none named"):
            earlier = load_earlier(storage, cfg.build.previous, own=storage.uri(build_prefix(cfg.build_name)))
        plan = [partition for source in cfg.build.sources for partition in _listed(source, earlier=earlier)]
        document = {"schema": PLAN_SCHEMA, "build": cfg.build_name, "content_hash": digest,
                    "sources": source_locations(cfg), "partitions": [p.to_dict() for p in plan],
                    "previous_named": cfg.build.previous, "previous": earlier.builds,
                    "already_built": dict(sorted(earlier.skipped.items()))}
        if labelled:
            document["labelers"] = labelled
        if not storage.put_if_absent(rel, canonical_json(document)):
            earlier = None  # another first run froze its plan first: this run follows that one
    document = json.loads(storage.read_bytes(rel))
    if document.get("schema") != PLAN_SCHEMA or document.get("content_hash") != digest:
        raise BuildConflict(f"{storage.uri(rel)}: a plan of schema {document.get('schema')!r} for content hash "
                            f"{document.get('content_hash')!r}, not this config's ({digest}); builds are immutable: "
                            f"start a new build with --set build.name={cfg.build_name}-v2")
    return [Partition.from_dict(item) for item in document["partitions"]], document, earlier


def plan_earlier(storage: Storage, document: dict[str, Any]) -> "EarlierBuilds":
    """The earlier builds a frozen plan names, reloaded (and checked against the digests it recorded)."""
    with step("read the earlier builds", ", ".join(b["name"] for b in document.get("previous", [])) or "none"):
        return load_earlier(storage, [], frozen=document.get("previous", []))


def earlier_note(document: dict[str, Any]) -> str | None:
    """The closing table's line on an incremental build: which builds, how many planned inputs they held."""
    if not document.get("previous"):
        return None
    skipped = document.get("already_built", {})
    counts = ", ".join(f"{n} from {source}" for source, n in skipped.items()) or "none"
    return (f"incremental: earlier builds {', '.join(b['name'] for b in document['previous'])}; inputs they hold "
            f"left out of the plan: {counts} (tars: whole tars); their pictures under new names drop as duplicate")


def changes_since_plan(cfg: BuildConfig, document: dict[str, Any], plan: list[Partition],
                       pending: list[Partition], earlier: "EarlierBuilds | None" = None) -> list[str]:
    """Notes on the sources that still have partitions to read, when they differ from the frozen plan. A source that
    cannot be listed at all (a wrong path, a folder gone) is refused: its partitions would all come out dropped."""
    notes = []
    if cfg.build.previous != document.get("previous_named", []):
        notes.append(f"build.previous is {cfg.build.previous} now; this build's plan was frozen with "
                     f"{document.get('previous_named', [])} and keeps it (builds are immutable): build against other "
                     f"earlier builds under a new name, --set build.name={cfg.build_name}-v2")
    frozen_sources = document.get("sources", {})
    now = source_locations(cfg)
    for source in cfg.build.sources:
        mine = [p for p in pending if p.source == source.name]
        if not mine:
            continue
        if now[source.name] != frozen_sources.get(source.name):
            notes.append(f"source {source.name}: the plan was frozen from {frozen_sources.get(source.name)}; its "
                         f"remaining inputs are read from {now[source.name]}")
        current = _listed(source, f"; {len(mine)} partitions of this build's frozen plan still read from it: "
                                  "point the source where its inputs are", earlier=earlier)
        now_specs = {p.spec_sha256 for p in current}
        frozen_specs = {p.spec_sha256 for p in plan if p.source == source.name}
        changed = [p for p in mine if p.spec_sha256 not in now_specs]
        added = [p for p in current if p.spec_sha256 not in frozen_specs]
        if changed or added:
            notes.append(f"source {source.name} lists other inputs than when this build's plan was frozen "
                         f"({len(changed)} of its {len(mine)} unfinished partitions differ, {len(added)} partitions "
                         f"are new): the build finishes its frozen plan (a changed or vanished input is dropped as "
                         f"`unreadable`, a new one is not in it); build new inputs as a new build, "
                         f"--set build.name={cfg.build_name}-v2")
    return notes


def _listed(source, hint: str = "", earlier: "EarlierBuilds | None" = None) -> list[Partition]:
    """A source's partitions (without what `earlier` builds hold); a source that cannot be listed (no such folder,
    no images, an unreadable url list) is the user's to fix: a UsageError naming the source (exit 2), not a
    traceback."""
    try:
        return plan_source(source, earlier)
    except (OSError, ValueError) as err:
        raise UsageError(f"source {source.name!r}: {err}{hint}") from err


def check_plan_matches(entries: dict[str, dict], plan: list[Partition], storage: Storage, name: str) -> None:
    """A committed shard must come from a partition of the frozen plan (a plan.json replaced by hand would not)."""
    planned = {p.shard: p for p in plan}
    for shard, entry in entries.items():
        partition = planned.get(shard)
        if partition is None or entry.get("partition_spec_sha256") != partition.spec_sha256:
            raise BuildConflict(
                f"{storage.uri(build_prefix(name))}: shard {shard} was committed from other inputs than the "
                f"build's plan lists; builds are immutable: build under a new name (--set build.name={name}-v2)")


# --- Ray Data stages (module level: Ray pickles them by reference) ----------------------------------------------------

def partition_stage(batch: dict[str, np.ndarray], cfg: BuildConfig, work_dir: str, built=None,
                    stages: tuple[str, ...] = WEIGHT_FREE_STAGES):
    """One partition in, its records out through the weight-free `stages` (pipelines.process), in slices of
    stages.batch_size (so Ray Data streams them on before the partition ends). One operator, one task per
    partition: as separate map_batches, Ray Data fused them and bundled stages.batch_size partitions into each task
    (the largest batch size of a fused chain sets its bundle), which left 2 cores with a handful of serial tasks and
    huge blocks."""
    size = cfg.build.stages.batch_size
    hashes = _built_hashes(built)
    for text in batch["partition"]:
        partition = Partition.from_json(str(text))
        start = time.perf_counter()
        records, source_stats = read_partition(cfg, partition, work_dir)
        spent = (time.perf_counter() - start) / max(1, len(records))
        if not records:  # an empty partition still commits an (empty) shard, or the build never completes
            records = [{"shard": partition.shard, "shard_items": 0, "index": -1, "placeholder": True,
                        "dropped": "placeholder", "timings": {}}]
        for record in records:
            record["timings"]["ingest"] = spent
        records[0]["source_stats"] = source_stats
        for first in range(0, len(records), size):
            yield batch_of(run_stages(stages, records[first:first + size], cfg, hashes))


def records_stage(batch: dict[str, np.ndarray], cfg: BuildConfig, stages: tuple[str, ...],
                  built=None) -> dict[str, np.ndarray]:
    """Weight-free stages between or after the labelers (bucket; conditions, pack's members), over one block of
    records; `built` as for partition_stage (bucket checks identity groups against the earlier builds)."""
    return batch_of(run_stages(stages, records_of(batch), cfg, _built_hashes(built)))


_BUILT: dict[str, np.ndarray] = {}


def _built_hashes(built) -> np.ndarray | None:
    """The digests behind `built`, fetched once per worker process: the set is put in the object store once by the
    driver (it may hold millions of digests) instead of travelling with every task."""
    if built is None or isinstance(built, np.ndarray):
        return built
    import ray

    key = built.hex()
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = ray.get(built)
    return _BUILT[key]


class EncodeStage:
    """The tokenizer, loaded once per actor."""

    def __init__(self, cfg: BuildConfig, revision: str | None = None):
        from pipelines.process import ViewEncoder

        self.encoder = ViewEncoder(cfg, revision=revision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.process import encode_and_finish

        return batch_of(encode_and_finish(self.encoder, records_of(batch)))


def build_dataset(ray, cfg: BuildConfig, pending: list[Partition], revision: str | None = None, built=None,
                  labelled: dict[str, dict] | None = None):
    """The Ray Data pipeline over the pending partitions (lazy: it runs when iterated); `revision`: the commit of a
    hub-id VAE the driver resolved (check_image_tokenizer); `built`: an ObjectRef of the earlier builds' picture
    digests (incremental builds) for the decode stage; `labelled`: what each enabled labeler's preflight resolved
    (pipelines.labelers.preflight_labelers)."""
    import ray.data

    from pipelines.labelers import enabled_labelers

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shards complete in plan order: the driver holds ~one at a time
    stages = cfg.build.stages
    encode = cfg.build.encode
    first, *chain = stage_chain(enabled_labelers(cfg))
    items = [{"partition": p.to_json()} for p in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(partition_stage, batch_size=1, num_cpus=stages.num_cpus,
                        fn_kwargs={"cfg": cfg, "work_dir": str(cfg.run.work_dir), "built": built, "stages": first})
    for part in chain:
        if isinstance(part, tuple):
            ds = ds.map_batches(records_stage, batch_size=None, num_cpus=stages.num_cpus,
                                fn_kwargs={"cfg": cfg, "stages": part, "built": built})
        else:
            section = part.section(cfg)
            ds = _actor_stage(ds, part.actor_class(), {"cfg": cfg, "resolved": (labelled or {})[part.stage]},
                              section.batch_size, section.concurrency, section.num_cpus, section.num_gpus)
    return _actor_stage(ds, EncodeStage, {"cfg": cfg, "revision": revision}, stages.batch_size, encode.concurrency,
                        encode.num_cpus, encode.num_gpus)


def _actor_stage(ds, actor: type, kwargs: dict, batch_size: int, concurrency: int, num_cpus: float,
                 num_gpus: float):
    """A model stage as an actor pool. A CPU actor (num_gpus 0) with the stages' num_cpus would let Ray Data fuse
    the weight-free task stage before it into the actors, and every partition would be read, decoded and drawn by
    the `concurrency` actors alone. Naming the strategy Ray Data uses anyway (SPREAD) makes the remote args differ:
    the stages stay a task pool over every CPU of the cluster. (With GPUs, num_gpus already keeps them apart.)"""
    return ds.map_batches(actor, fn_constructor_kwargs=kwargs, batch_size=batch_size, concurrency=concurrency,
                          num_cpus=num_cpus, num_gpus=num_gpus or None, scheduling_strategy="SPREAD")


# --- the job ---------------------------------------------------------------------------------------------------------

def run_build(cfg: BuildConfig) -> BuildSummary:
    from onegen.preflight import check_run_targets
    from onegen.raycluster import init_ray
    from pipelines.shard_writer import CRASH_POINTS, commit_shard, crash_point, write_manifest

    point = os.environ.get("ONEGEN_CRASH_AT")
    if point and point not in CRASH_POINTS:
        raise UsageError(f"ONEGEN_CRASH_AT={point!r} is not a crash point (one of {', '.join(CRASH_POINTS)}); it is "
                         "for tests: unset it")
    check_run_targets(cfg)  # work dir, Ray, MLflow and storage usable: refused before anything is written
    with step("load the image tokenizer", cfg.build.encode.image_tokenizer):
        revision = check_image_tokenizer(cfg)
    started = time.perf_counter()
    storage = Storage.from_config(cfg)
    name = cfg.build_name
    digest = content_hash(cfg)
    labelled = check_labelers(cfg, storage, digest)
    with step("claim the build name", storage.uri(build_json_path(name))):
        claim_build(storage, cfg)
    with step("plan partitions"):
        plan, document, earlier = frozen_plan(storage, cfg, digest, labelled)
    labelled = document.get("labelers", labelled)  # a first run that lost the race to freeze the plan: the winner's
    entries = read_entries(storage, name)
    check_plan_matches(entries, plan, storage, name)
    pending = [p for p in plan if p.shard not in entries]
    summary = BuildSummary(name=name, uri=storage.uri(build_prefix(name)), shards_planned=len(plan),
                           shards_skipped=len(plan) - len(pending))
    if pending and earlier is None:  # a rerun (or a lost race to freeze the plan)
        if document.get("previous"):
            earlier = plan_earlier(storage, document)
        summary.notes = changes_since_plan(cfg, document, plan, pending, earlier)
        for note in summary.notes:
            print(f"onegen build: {note}", file=sys.stderr, flush=True)
    incremental = earlier_note(document)
    if incremental:
        summary.notes.insert(0, incremental)
    version = code_version()
    with _tracked_run(cfg, storage, summary) as run:
        if pending:
            ray = init_ray(cfg)
            built = ray.put(earlier.hashes) if earlier is not None and len(earlier.hashes) else None
            by_shard = {p.shard: p for p in pending}
            open_shards: dict[str, list[dict]] = {}
            stats: dict[str, dict] = {}
            futures: list[Future] = []
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-writer") as writers, \
                    step("run the build's Ray Data stages"):
                stream = build_dataset(ray, cfg, pending, revision, built, labelled)
                for batch in one_line_start_failures(stream.iter_batches(batch_size=None, batch_format="numpy")):
                    for record in records_of(batch):
                        shard = record["shard"]
                        stats.setdefault(shard, {}).update(record.pop("source_stats", None) or {})
                        records = open_shards.setdefault(shard, [])
                        if not record.get("placeholder"):
                            records.append(record)
                        if len(records) == record["shard_items"]:
                            futures.append(writers.submit(commit_shard, storage, name, by_shard[shard],
                                                          open_shards.pop(shard), stats.pop(shard), digest,
                                                          version))
                    _raise_failed(futures)
                for future in futures:
                    _count(summary, future.result())
            missing = sorted(set(open_shards))
            if missing:
                raise RuntimeError(f"the stream ended before shards {missing} were complete (a stage lost records)")
            summary.shards_committed = len(futures)
        entries = read_entries(storage, name)
        summary.build_bytes = sum(map(entry_bytes, entries.values()))
        if pending:
            crash_point("before_final")  # every shard committed, the duplicate pass and _final.json not yet done
        with step("write the final manifest", storage.uri(manifest_path(name))):
            summary.manifest = write_manifest(storage, name, plan, entries, digest)
        summary.wall_s = time.perf_counter() - started
        _log_results(run, storage, summary)
    return summary


def check_labelers(cfg: BuildConfig, storage: Storage, digest: str) -> dict[str, dict]:
    """The enabled labelers' preflight (pipelines/labelers.py), before the build name is claimed: a model that
    cannot load is fixed by editing the config, and the fixed config must still be free to claim the name. A rerun
    resolves the hub commits the build's first run froze in its plan (this config's plan only: another config's is
    refused by claim_build just after)."""
    from pipelines.labelers import enabled_labelers, preflight_labelers

    labelers = enabled_labelers(cfg)
    if not labelers:
        return {}
    from onegen.raycluster import init_ray

    frozen = {}
    rel = plan_path(cfg.build_name)
    if storage.exists(rel):
        document = json.loads(storage.read_bytes(rel))
        if document.get("content_hash") == digest:
            frozen = document.get("labelers", {})
    ray = init_ray(cfg)
    check_actor_cpus(ray, cfg, labelers)
    with step("check the labelers' models", ", ".join(f"{l.stage}: {l.section(cfg).model}" for l in labelers)):
        return preflight_labelers(ray, cfg, frozen)


def check_actor_cpus(ray, cfg: BuildConfig, labelers: list) -> None:
    """The actor pools (labellers, encoder) hold their CPUs for the whole job and the partition tasks need theirs
    beside them; when the sum is more than the cluster has, Ray Data waits for ever with every actor idle. On the
    local instance onegen started that is a UsageError naming the settings to lower; on a cluster a warning (an
    autoscaler may still add nodes)."""
    from onegen.raycluster import in_submitted_job, resolve_ray_address

    encode = cfg.build.encode
    pools = [(f"build.{l.stage}", l.section(cfg).num_cpus, l.section(cfg).concurrency) for l in labelers]
    pools.append(("build.encode", encode.num_cpus, encode.concurrency))
    needed = sum(cpus * n for _, cpus, n in pools) + cfg.build.stages.num_cpus
    have = float(ray.cluster_resources().get("CPU", 0.0))
    if needed <= have + 1e-9:
        return
    held = ", ".join(f"{name}: {n} x {cpus:g}" for name, cpus, n in pools)
    message = (f"the build's actors hold {needed - cfg.build.stages.num_cpus:g} CPUs ({held}) and its tasks need "
               f"build.stages.num_cpus={cfg.build.stages.num_cpus:g} beside them, but the Ray cluster has {have:g}")
    if resolve_ray_address(cfg) is None and not in_submitted_job():
        raise UsageError(f"{message}: the job would wait for ever; lower those num_cpus (fractions such as 0.5 are "
                         "fine) or concurrency, raise ray.num_cpus (the local instance's logical CPUs), or run on a "
                         "cluster with more CPUs")
    print(f"warning: {message}; the build waits until the cluster has that many", flush=True)


def entry_bytes(entry: dict) -> int:
    """Bytes of a committed shard's files (its entry records them: the tar and the parquet)."""
    return sum(f.get("bytes", 0) for f in entry["files"].values())


def _raise_failed(futures: list[Future]) -> None:
    for future in futures:
        if future.done() and future.exception() is not None:
            raise future.exception()


def _count(summary: BuildSummary, result: tuple[dict, dict]) -> None:
    from pipelines.shard_writer import add_label_counts

    entry, stats = result
    summary.inputs += entry["inputs"]
    summary.kept += entry["samples"]
    summary.rows += entry["rows"]
    summary.dropped.update(entry["dropped"])
    summary.left_out.update(entry.get("left_out", {}))
    add_label_counts(summary.labels, entry)
    summary.bytes_written += entry_bytes(entry)
    summary.seconds.update(stats["seconds"])
    if stats.get("source_stats"):  # img2dataset's counts, and its error messages counted over the shards
        merged = summary.source_stats.setdefault(entry["source"], {"errors": Counter()})
        for key, value in stats["source_stats"].items():
            if key == "errors":
                merged["errors"].update(value)
            elif isinstance(value, (int, float)):
                merged[key] = merged.get(key, 0) + value


# --- MLflow ------------------------------------------------------------------------------------------------------

class _tracked_run:
    """The build's MLflow run: resumed when an earlier attempt of the same build left one unfinished."""

    def __init__(self, cfg: BuildConfig, storage: Storage, summary: BuildSummary):
        self.cfg, self.storage, self.summary = cfg, storage, summary

    def __enter__(self):
        import mlflow

        from onegen.secrets import install_log_redaction
        from onegen.tracking import ensure_experiment, log_config, run_location, run_tags, tracking_uri

        install_log_redaction()
        experiment_id = ensure_experiment(self.cfg)
        uri = self.summary.uri
        previous = mlflow.search_runs([experiment_id], filter_string=f"tags.`{TAG_BUILD_URI}` = '{uri}'",
                                      order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
        resume = previous[0].info.run_id if previous and previous[0].info.status != "FINISHED" else None
        tags = run_tags(self.cfg, {TAG_BUILD: self.summary.name, TAG_BUILD_URI: uri})
        self.run = mlflow.start_run(run_id=resume, experiment_id=None if resume else experiment_id,
                                    run_name=None if resume else f"build-{self.summary.name}", tags=tags)
        if not resume:
            log_config(self.cfg)
        self.summary.run_id = self.run.info.run_id
        self.summary.mlflow = run_location(tracking_uri(self.cfg), self.run.info.experiment_id, self.run.info.run_id)
        return self.run

    def __exit__(self, kind, value, traceback):
        import mlflow

        from onegen.tracking import end_status

        mlflow.end_run(end_status(value))
        return False


def _log_results(run, storage: Storage, summary: BuildSummary) -> None:
    """This attempt's work (shards committed and skipped, bytes, seconds, samples/s per stage) and the build's counts
    from the final manifest (run_build has written it by now), so a build resumed after a crash (its MLflow run
    continued) shows the whole build's kept, dropped and duplicates, not just what the last attempt did."""
    import mlflow

    metrics = {"shards_committed": summary.shards_committed, "shards_skipped": summary.shards_skipped,
               "bytes_written": summary.bytes_written, "wall_s": summary.wall_s}
    metrics.update({f"samples_per_s.{stage}": summary.inputs / s for stage, s in summary.seconds.items() if s})
    totals = summary.manifest["totals"]
    metrics.update({"inputs": totals["inputs"], "kept": totals["samples"], "rows": totals["rows"],
                    "duplicates": totals["duplicates"], "shards": totals["shards"], "bytes": summary.build_bytes})
    metrics.update({f"dropped.{reason}": n for reason, n in totals["dropped"].items()})
    metrics.update({f"left_out.{reason}": n for reason, n in totals.get("left_out", {}).items()})
    metrics.update({f"labels.{stage}.{outcome}": n for stage, counts in totals.get("labels", {}).items()
                    for outcome, n in counts.items()})
    mlflow.log_metrics({key.replace(":", "_"): float(v) for key, v in metrics.items()})
    mlflow.log_text(summary.table(), "build/summary.txt")
    mlflow.log_text(json.dumps(summary.manifest, indent=1, sort_keys=True), "build/manifest.json")
    mlflow.log_input(build_dataset_input(summary), context="build")


def build_dataset_input(summary: BuildSummary):
    """The build as an MLflow dataset (onegen.tracking.dataset_input): the same digest a training run logs."""
    from onegen.tracking import dataset_input

    return dataset_input(summary.uri, summary.name, sha256_hex(canonical_json(summary.manifest)))


if __name__ == "__main__":  # `python -m pipelines.build` (what `ray job submit` runs) is `onegen build`
    from onegen.cli.build import main

    sys.exit(main())
