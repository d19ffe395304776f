"""Labeller throughput: each model stage as the build runs it (a Ray Data actor pool) against the same model in a plain
loop, side by side.

    .venv/bin/python bench/bench_labelers.py [--photos 48] [--resolution 128] [--repeats 2] [--write-results]

Inputs: real photographs (crops and flips of scikit-image's, bench_build.write_photo_folder), read, decoded and
bucketed once (decoded only for the stages that see full-size pictures: pose, faces); every stage then labels the
same records. Models: tiny random-weight models of the real transformers classes, saved locally (tests/tiny_vlm.py:
LLaVA-NeXT; tests/tiny_vision.py: Depth Anything, Mask2Former), so for those this measures the stage's own cost
around a model (pickling records, the actor pool, batching, post-processing, drawing-ready labels), not a real
model's FLOPs: on a GPU with the default 8B / large models the model dominates. Pose and faces run mediapipe's real
bundled models (CPU, offline). Both sides load the model inside the timed span, use the stage's batch_size and one
thread for torch, OpenCV and BLAS. The loop is the thinnest form: `Stage(cfg, resolved).label_records(batch)`
batch after batch in this process; the Ray side is the build's own operator (pipelines.build._actor_stage, one
actor) over the records in a Ray Dataset, streamed out batch by batch. Each side's steady rate is pictures/s once
the model is up (the loop: after the stage's constructor; Ray: from its first output batch to its last) and its
start-up the time before (for Ray: a worker process, its imports and the model's load and smoke test, paid once per
actor per build). Reported: both rates, their ratio, both start-ups; median (spread) over repeats."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_env import PIN_ENV  # first: thread pins and the repository on sys.path

from bench.bench_build import pin_threads, spread, write_photo_folder
from bench.results_file import cpu_name, replace_section

SECTION = "## Labellers (CPU)"


def tiny_models(folder: Path) -> dict[str, list[str]]:
    """{stage: config overrides enabling it on its tiny model}."""
    from tests.tiny_vision import save_tiny_depth_anything, save_tiny_mask2former
    from tests.tiny_vlm import save_tiny_llava_next

    return {
        "pose": ["build.pose.enabled=true"],
        "faces": ["build.faces.enabled=true"],
        "caption": ["build.caption.enabled=true", f"build.caption.model={save_tiny_llava_next(folder / 'vlm')}",
                    "build.caption.max_new_tokens=8"],
        "depth": ["build.depth.enabled=true", f"build.depth.model={save_tiny_depth_anything(folder / 'depth')}"],
        "segmentation": ["build.segmentation.enabled=true",
                         f"build.segmentation.model={save_tiny_mask2former(folder / 'seg', seed=3)}",
                         "build.segmentation.threshold=0.0"],
    }


def stage_config(photos: Path, resolution: int, overrides: list[str]):
    from onegen.build_config import BuildConfig
    from onegen.config import load_config

    return load_config(None, ["run.name=bench", f"build.resolutions=[{resolution}]",
                              f"build.sources=[{{name: photos, type: folder, path: '{photos}', partition_size: 16}}]",
                              "build.decode.min_size=32", "build.caption.num_cpus=1", "build.depth.num_cpus=1",
                              "build.segmentation.num_cpus=1", *overrides], BuildConfig)


def stage_records(cfg, sees: str) -> list[dict]:
    """The records a labeller that `sees` "decoded" or "bucketed" pictures receives in the build."""
    from pipelines.ingest import plan_partitions, read_partition
    from pipelines.process import run_stages

    records = []
    for partition in plan_partitions(cfg):
        part, _ = read_partition(cfg, partition)
        records += run_stages(("decode",) if sees == "decoded" else ("decode", "bucket"), part, cfg)
    return [r for r in records if not r["dropped"]]


def run_loop(cfg, labeler, resolved, blobs: list[bytes]) -> tuple[float, float]:
    """(start-up s, steady pictures/s) of the plain loop."""
    import pickle

    records = [pickle.loads(blob) for blob in blobs]
    batch_size = labeler.section(cfg).batch_size
    start = time.perf_counter()
    stage = labeler.actor_class()(cfg, resolved)
    ready = time.perf_counter()
    for first in range(0, len(records), batch_size):
        stage.label_records(records[first:first + batch_size])
    done = time.perf_counter()
    assert all(labeler.stage in r["labels"] for r in records)
    return ready - start, len(records) / (done - ready)


def run_ray(ray, cfg, labeler, resolved, blobs: list[bytes]) -> tuple[float, float]:
    """(start-up s, steady pictures/s) of the build's actor-pool operator: the first output batch carries the
    start-up and its own pictures; the rate is the pictures after it over the time after it."""
    from pipelines.build import _actor_stage

    section = labeler.section(cfg)
    # One record per block, as the build's partition tasks hand over small blocks: each actor call is then one
    # output block, and the arrivals below time the actor's batches one by one.
    ds = ray.data.from_items([{"record": blob} for blob in blobs], override_num_blocks=len(blobs)).materialize()
    start = time.perf_counter()
    out = _actor_stage(ds, labeler.actor_class(), {"cfg": cfg, "resolved": resolved}, section.batch_size,
                       1, section.num_cpus, 0)
    arrivals = []
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        arrivals.append((time.perf_counter(), len(batch["record"])))
    assert sum(n for _, n in arrivals) == len(blobs) and len(arrivals) == -(-len(blobs) // section.batch_size) > 1
    rate = sum(n for _, n in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0])
    return arrivals[0][0] - start - arrivals[0][1] / rate, rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write-results", action="store_true", help=f"replace {SECTION!r} in bench/RESULTS.md")
    args = parser.parse_args()
    pin_threads()
    import pickle

    import ray

    from pipelines.labelers import LABELERS

    tmp = Path(tempfile.mkdtemp(prefix="bench-labelers-"))
    write_photo_folder(tmp / "photos", args.photos)
    overrides = tiny_models(tmp / "models")
    ray.init(num_cpus=2, object_store_memory=512 * 1024 ** 2, include_dashboard=False,
             runtime_env={"env_vars": PIN_ENV})
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    try:
        for labeler in LABELERS:
            cfg = stage_config(tmp / "photos", args.resolution, overrides[labeler.stage])
            resolved = labeler.preflight(labeler.section(cfg))
            blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in stage_records(cfg, labeler.sees)]
            warm = blobs[:2 * labeler.section(cfg).batch_size]
            run_loop(cfg, labeler, resolved, warm)  # warm: imports, first-call kernels
            run_ray(ray, cfg, labeler, resolved, warm)
            measured = {"loop": ([], []), "ray": ([], [])}  # side: (steady pictures/s, start-up s)
            for _ in range(args.repeats):
                for side, run in (("loop", run_loop), ("ray", lambda *a: run_ray(ray, *a))):
                    startup, rate = run(cfg, labeler, resolved, blobs)
                    measured[side][0].append(rate)
                    measured[side][1].append(startup)
            loop_rate, ray_rate = (statistics.median(measured[side][0]) for side in ("loop", "ray"))
            rows.append((labeler.stage, len(blobs), spread(measured["loop"][0]), spread(measured["ray"][0]),
                         ray_rate / loop_rate, spread(measured["loop"][1]), spread(measured["ray"][1])))
            print(f"{labeler.stage}: loop {loop_rate:.1f} pictures/s, Ray stage {ray_rate:.1f} pictures/s, "
                  f"ratio {ray_rate / loop_rate:.2f}", flush=True)
    finally:
        ray.shutdown()
    lines = [f"{SECTION} — {cpu_name()}, {os.cpu_count()} cores, one thread per process", "",
             f"`.venv/bin/python bench/bench_labelers.py --photos {args.photos} --resolution {args.resolution} "
             f"--repeats {args.repeats}`: each labeller over the same photographs (caption, depth, segmentation: "
             f"tiny random-weight models, {args.resolution}-px bucketed pictures; pose, faces: mediapipe's real "
             "models on the full-size decoded pictures); the plain loop (the stage's class called batch after batch "
             "in one process) against the build's actor-pool operator (one actor). "
             "Steady rate once the model is up (Ray: from the first output batch to the last); start-up: the time "
             "before. Median (spread) over the repeats.", "",
             "| stage | pictures | plain loop (pictures/s) | Ray stage (pictures/s) | Ray / loop | loop start-up (s) "
             "| Ray start-up (s) |",
             "|---|---|---|---|---|---|---|"]
    for stage, count, loop, job, ratio, loop_start, job_start in rows:
        lines.append(f"| {stage} | {count} | {loop} | {job} | {ratio:.2f} | {loop_start} | {job_start} |")
    lines += ["", "The tiny models cost milliseconds per picture, so their steady ratio shows the stage's own overhead "
              "per picture (records pickled into and out of the object store, one more process); the Ray start-up "
              "(a worker, torch and transformers imports, the model's load and smoke test) is paid once per actor "
              "per build. With a real model both matter less.", ""]
    print("\n".join(lines))
    if args.write_results:
        replace_section(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
