"""Data-build throughput: the Ray Data job against a bare single-process loop over the same stages, side by side.

    .venv/bin/python bench/bench_build.py [--scenes 48] [--photos 96] [--repeats 2] [--write-results]

Both run the same inputs (the synthetic world with its exact maps + a folder of real photographs from
scikit-image), the same stage functions (pipelines/process.py), the same tokenizer and the same shard writer, with
one thread per process for torch, OpenCV and BLAS (pinned equally: the job gets its parallelism from Ray workers,
not from intra-op threads). The loop is the thinnest version of the stack: read a partition, run the stages, commit
the shard. For the pixel tokenizer and a small random-weight VAE (two encoder actors: the job's knob for a
compute-bound encoder on 2 cores; a quarter of the inputs): samples/s of each, their ratio (target: the job >= 1.6x
the loop on 2 cores), the machine's CPU time per sample and cores busy on each side, and milliseconds per sample
per stage. Each side is warm (a small build through each first) and builds into its own fresh root."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_env import PIN_ENV  # first: thread pins and the repository on sys.path

from bench.results_file import cpu_name, replace_section

SECTION = "## Data build (CPU)"


def pin_threads() -> None:
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def write_photo_folder(folder: Path, count: int) -> None:
    """`count` distinct real photographs (crops and flips of scikit-image's bundled ones) as PNG files."""
    import numpy as np
    import skimage.data
    from PIL import Image

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        k = i // len(photos)
        crop = photo[k % 7: h - (k * 3) % 11, (k * 5) % 13: w - k % 5]
        if k % 2:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"photo_{i:03d}.png")


def bench_config(root: Path, photos: Path, scenes: int, name: str, tokenizer: str = "pixel",
                 object_store_gib: float | None = None, concurrency: int = 1):
    from onegen.build_config import BuildConfig
    from onegen.config import load_config

    return load_config(None, [
        f"run.name={name}", f"run.work_dir={root / 'work'}", f"storage.root={root / 'data'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"build.sources=[{{name: synth, type: synthetic, scenes: {scenes}, partition_size: 4, size: 256}}, "
        f"{{name: photos, type: folder, path: '{photos}', partition_size: 8}}]",
        f"build.encode.image_tokenizer='{tokenizer}'", f"build.encode.concurrency={concurrency}",
        "ray.num_cpus=2", f"ray.runtime_env.env_vars={PIN_ENV}",
        *([f"ray.object_store_memory={int(object_store_gib * (1 << 30))}"] if object_store_gib else []),
    ], BuildConfig)


def small_vae(folder: Path) -> str:
    """A 16-channel f=8 AutoencoderKL of the SD3/FLUX architecture, narrow (16-64 channels, 0.4 M encoder
    parameters), random weights saved locally: the build's encode stage is the same code for any VAE, and its speed
    does not depend on the weights."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
                  norm_num_groups=8).save_pretrained(str(folder))
    return str(folder)


def run_loop(cfg) -> tuple[float, int, dict[str, float]]:
    """The bare loop: partitions one after another, every stage in this process."""
    from collections import Counter

    from onegen.storage import Storage
    from pipelines.build import claim_build, code_version
    from pipelines.ingest import plan_partitions, read_partition
    from pipelines.process import ViewEncoder, process_records
    from pipelines.shard_writer import commit_shard
    from onegen.config import content_hash

    start = time.perf_counter()  # like the job's: the claim and the tokenizer's load are in the time
    storage = Storage.from_config(cfg)
    claim_build(storage, cfg)
    encoder = ViewEncoder(cfg)
    seconds: Counter = Counter()
    inputs = 0
    for partition in plan_partitions(cfg):
        t0 = time.perf_counter()
        records, stats = read_partition(cfg, partition, str(cfg.run.work_dir))
        for record in records:
            record["timings"]["ingest"] = (time.perf_counter() - t0) / max(1, len(records))
        process_records(cfg, records, encoder)
        commit_shard(storage, cfg.build_name, partition, records, stats, content_hash(cfg), code_version())
        for record in records:
            seconds.update(record["timings"])
        inputs += len(records)
    return time.perf_counter() - start, inputs, dict(seconds)


def run_job(cfg) -> tuple[float, int, dict[str, float]]:
    from onegen.raycluster import init_ray
    from pipelines.build import run_build

    init_ray(cfg)  # before the clock: cluster start-up is not the build's throughput (see warm_up)
    start = time.perf_counter()
    summary = run_build(cfg)
    return time.perf_counter() - start, summary.inputs, dict(summary.seconds)


def warm_up(root: Path, photos: Path, tokenizer: str, concurrency: int, object_store_gib: float | None) -> None:
    """A small build on the same Ray instance and MLflow store before the clock, and one through the loop: Ray's
    worker processes have imported torch, OpenCV and the pipeline (seconds each, once per worker for the life of a
    cluster), MLflow's store has its tables, the loop's process its imports; as a long build or a warm cluster."""
    name = f"warm-{Path(tokenizer).name}"
    run_loop(bench_config(root / "loop", photos, 2, name, tokenizer, object_store_gib))
    run_job(bench_config(root, photos, 2, name, tokenizer, object_store_gib, concurrency))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def busy_seconds() -> float:
    """CPU seconds this machine has been busy (all cores, all processes: /proc/stat), to see how much of the 2
    cores each side used and how much CPU a sample cost it, Ray's processes included."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed(run, cfg) -> dict:
    busy = busy_seconds()
    seconds, inputs, stages = run(cfg)
    return {"seconds": seconds, "inputs": inputs, "stages": stages, "cpu": busy_seconds() - busy}


def measure(tmp: Path, label: str, tokenizer: str, args, concurrency: int) -> dict:
    """Loop and job alternated `args.repeats` times on the same inputs, each into a fresh root."""
    import ray

    tag = "pixel" if tokenizer == "pixel" else "vae"
    write_photo_folder(tmp / "warm-photos", 4)
    warm_up(tmp / "jobs", tmp / "warm-photos", tokenizer, concurrency, args.object_store_gib)
    loops, jobs = [], []
    for repeat in range(args.repeats):
        loops.append(timed(run_loop, bench_config(tmp / f"loop-{tag}-{repeat}", tmp / "photos", args.scenes, "loop",
                                                  tokenizer)))
        jobs.append(timed(run_job, bench_config(tmp / "jobs", tmp / "photos", args.scenes, f"job-{tag}-{repeat}",
                                                tokenizer, args.object_store_gib, concurrency)))
        assert loops[-1]["inputs"] == jobs[-1]["inputs"], (loops[-1]["inputs"], jobs[-1]["inputs"])
        lo, jo = loops[-1], jobs[-1]
        print(f"{label} repeat {repeat}: loop {lo['inputs'] / lo['seconds']:.2f} samples/s ({lo['seconds']:.1f} s, "
              f"{lo['cpu']:.1f} CPU s), job {jo['inputs'] / jo['seconds']:.2f} samples/s ({jo['seconds']:.1f} s, "
              f"{jo['cpu']:.1f} CPU s), ratio {lo['seconds'] / jo['seconds']:.2f}", flush=True)
    ray.shutdown()  # the next tokenizer starts from a fresh instance and warms it up again
    return {"label": label, "inputs": jobs[0]["inputs"], "loops": loops, "jobs": jobs}


STAGES = ("ingest", "decode", "bucket", "conditions", "encode", "pack")


def report_rows(results: list[dict]) -> list[str]:
    lines = ["| tokenizer | inputs | bare loop samples/s | Ray job samples/s | job / loop (target >= 1.6) | CPU ms per "
             "sample, loop / job | cores busy, loop / job |", "|---|---|---|---|---|---|---|"]
    for r in results:
        loops, jobs, n = r["loops"], r["jobs"], r["inputs"]
        rate = [n / x["seconds"] for x in loops], [n / x["seconds"] for x in jobs]
        ratios = [lo["seconds"] / jo["seconds"] for lo, jo in zip(loops, jobs)]
        cpu = [statistics.median(x["cpu"] for x in side) / n * 1e3 for side in (loops, jobs)]
        busy = [statistics.median(x["cpu"] / x["seconds"] for x in side) for side in (loops, jobs)]
        lines.append(f"| {r['label']} | {n} | {spread(rate[0])} | {spread(rate[1])} | **{spread(ratios)}** | "
                     f"{cpu[0]:.0f} / {cpu[1]:.0f} | {busy[0]:.2f} / {busy[1]:.2f} |")
    lines += ["", "Milliseconds per sample in each stage (the job's summed over its workers, so time a worker waited "
              "for a core counts), last repeat:", "",
              "| stage | " + " | ".join(f"{r['label']}: loop | job" for r in results) + " |",
              "|---|" + "---|---|" * len(results)]
    for stage in STAGES:
        cells = []
        for r in results:
            n = r["inputs"]
            cells += [f"{r['loops'][-1]['stages'].get(stage, 0) / n * 1e3:.1f}",
                      f"{r['jobs'][-1]['stages'].get(stage, 0) / n * 1e3:.1f}"]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=48, help="synthetic scenes (pixel tokenizer)")
    parser.add_argument("--photos", type=int, default=96, help="photographs (pixel tokenizer)")
    parser.add_argument("--vae-scale", type=float, default=0.25, help="inputs of the VAE run, as a fraction")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokenizers", default="pixel,vae")
    parser.add_argument("--object-store-gib", type=float, default=None,
                        help="the job's object store (default: Ray's, 30%% of RAM, as `onegen build` gets)")
    parser.add_argument("--write-results", action="store_true", help=f"replace {SECTION!r} in bench/RESULTS.md")
    args = parser.parse_args()
    pin_threads()
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        tmp = Path(tmp)
        for tokenizer in args.tokenizers.split(","):
            scale = 1.0 if tokenizer == "pixel" else args.vae_scale
            run = argparse.Namespace(**{**vars(args), "scenes": max(1, round(args.scenes * scale))})
            photos = max(1, round(args.photos * scale))
            shutil.rmtree(tmp / "photos", ignore_errors=True)
            write_photo_folder(tmp / "photos", photos)
            spec = "pixel" if tokenizer == "pixel" else small_vae(tmp / "small-vae")
            label = "pixel" if tokenizer == "pixel" else "small VAE (2 encoder actors)"
            results.append(measure(tmp, label, spec, run, concurrency=1 if tokenizer == "pixel" else 2))
    report = [SECTION, "", f"`.venv/bin/python bench/bench_build.py --write-results` - {cpu_name()}, 2 cores, "
              f"{time.strftime('%Y-%m-%d')}; synthetic scenes (one view each, with its exact depth, segmentation, box "
              "and pose maps) + real photographs, 256 px, canny/blur/inpaint conditions; one thread per process for "
              f"torch, OpenCV and BLAS on both sides; {args.repeats} repeats alternated (median, min-max); object "
              f"store {f'{args.object_store_gib} GiB' if args.object_store_gib else 'Ray default'}; whole run "
              f"{time.perf_counter() - started:.0f} s. Both sides end to end from a warm process (imports done, Ray "
              "workers warm): claim, plan, stages, shard commits, and for the job its MLflow run and manifest. CPU "
              "ms per sample and cores busy: the whole machine's busy time (/proc/stat) while each side ran.", "",
              *report_rows(results), "",
              "The GPU VAE encode stage's images/s: bench/gpu_bench.py (the GPU bench section)."]
    print("\n".join(report))
    if args.write_results:
        replace_section(SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
