"""Data-build throughput: the Ray Data job against a bare single-process loop over the same stages, side by side.

    .venv/bin/python bench/bench_build.py [--scenes 24] [--photos 48] [--write-results]

Both run the same inputs (the synthetic world with its exact maps + a folder of real photographs from
scikit-image), the same stage functions (pipelines/process.py), the same tokenizer and the same shard writer, with
one thread per process for torch, OpenCV and BLAS (pinned equally: the job gets its parallelism from Ray workers,
not from intra-op threads). The loop is the thinnest version of the stack: read a partition, run the stages, commit
the shard. Reported: samples/s of each, their ratio (target: the job >= 1.6x the loop on 2 cores), and seconds per
sample per stage. The Ray instance is started before the clock; each side builds into its own fresh root.

GPU entry (when CUDA is there): the VAE encode stage alone, images/s at 256 px, bf16, torch.compile'd encoder, with a
16-channel AutoencoderKL of the SD3/FLUX architecture (random weights: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PIN_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


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


def bench_config(root: Path, photos: Path, scenes: int, name: str):
    from onegen.build_config import BuildConfig
    from onegen.config import load_config

    return load_config(None, [
        f"run.name={name}", f"run.work_dir={root / 'work'}", f"storage.root={root / 'data'}",
        f"build.sources=[{{name: synth, type: synthetic, scenes: {scenes}, partition_size: 4, size: 256}}, "
        f"{{name: photos, type: folder, path: '{photos}', partition_size: 8}}]",
        "ray.num_cpus=2", f"ray.object_store_memory={1 << 30}",
        f"ray.runtime_env.env_vars={{OMP_NUM_THREADS: '1', MKL_NUM_THREADS: '1', OPENBLAS_NUM_THREADS: '1'}}",
    ], BuildConfig)


def run_loop(cfg) -> tuple[float, int, dict[str, float]]:
    """The bare loop: partitions one after another, every stage in this process."""
    from collections import Counter

    from onegen.storage import Storage
    from pipelines.build import claim_build, code_version
    from pipelines.ingest import plan_partitions, read_partition
    from pipelines.process import ViewEncoder, process_records
    from pipelines.shard_writer import commit_shard
    from onegen.config import content_hash

    storage = Storage.from_config(cfg)
    claim_build(storage, cfg)
    encoder = ViewEncoder(cfg)
    seconds: Counter = Counter()
    inputs = 0
    start = time.perf_counter()
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

    init_ray(cfg)  # before the clock: cluster start-up is not the build's throughput
    start = time.perf_counter()
    summary = run_build(cfg)
    return time.perf_counter() - start, summary.inputs, dict(summary.seconds)


def gpu_encode_entry() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2).to("cuda", torch.bfloat16)
    encoder = torch.compile(vae.encoder)
    batch = torch.randn(64, 3, 256, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3):
            encoder(batch)
        torch.cuda.synchronize()
        start, steps = time.perf_counter(), 20
        for _ in range(steps):
            encoder(batch)
        torch.cuda.synchronize()
    images_per_s = steps * batch.shape[0] / (time.perf_counter() - start)
    return {"vae_encode_images_per_s_256px_bf16_compiled": round(images_per_s, 1), "target": 1400}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--photos", type=int, default=48)
    parser.add_argument("--write-results", action="store_true", help="append the numbers to bench/RESULTS.md")
    args = parser.parse_args()
    pin_threads()
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        tmp = Path(tmp)
        write_photo_folder(tmp / "photos", args.photos)
        loop_s, loop_n, loop_stages = run_loop(bench_config(tmp / "loop", tmp / "photos", args.scenes, "loop"))
        job_s, job_n, job_stages = run_job(bench_config(tmp / "job", tmp / "photos", args.scenes, "job"))
    assert loop_n == job_n, (loop_n, job_n)
    loop_rate, job_rate = loop_n / loop_s, job_n / job_s
    lines = [f"data build, {job_n} inputs ({args.scenes} synthetic scenes + {args.photos} photos), 256 px, pixel "
             f"tokenizer, 2 cores, 1 thread per process",
             f"  bare loop: {loop_rate:6.2f} samples/s ({loop_s:.1f} s)",
             f"  Ray job:   {job_rate:6.2f} samples/s ({job_s:.1f} s)   ratio job/loop = {job_rate / loop_rate:.2f} "
             f"(target >= 1.6)",
             "  stage         loop s/sample   job s/sample (summed over workers)"]
    for stage in ("ingest", "decode", "bucket", "conditions", "encode", "pack"):
        lines.append(f"  {stage:<12}  {loop_stages.get(stage, 0) / loop_n:12.4f}   "
                     f"{job_stages.get(stage, 0) / job_n:12.4f}")
    gpu = gpu_encode_entry()
    lines.append(f"  GPU VAE encode: {gpu}" if gpu else "  GPU VAE encode: skipped (no CUDA device here)")
    report = "\n".join(lines)
    print(report)
    if args.write_results:
        from results_file import append_section

        append_section("bench_build.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
