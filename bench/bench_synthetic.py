"""Synthetic world throughput: images/s at 128 px on one core, and ratios measured side by side in the same run.

    OMP_NUM_THREADS=1 python -m bench.bench_synthetic            # or: python bench/bench_synthetic.py
    python -m bench.bench_synthetic --scenes 4 --no-write        # quicker, leaves bench/RESULTS.md alone

Measured (each the median of `--repeats` runs over the same scenes):
* samples/s of `synthetic_samples` (scene generation + render + labels + captions + entities), with and without
  figures; and with WebDataset encoding (`Sample.to_wds`, PNG + npy + JSON) as `onegen synth render` does it;
* render-only images/s with and without per-primitive culling (same scenes and cameras; outputs are identical);
* the vectorised primary-visibility pass vs a naive per-pixel Python loop over the same intersection kernels, in
  pixels/s, on a small image (the loop is too slow for 128 px), after checking both give identical hits.
Writes the "Synthetic world" section of bench/RESULTS.md (other sections are left as they are).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch load their thread pools

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.results_file import RESULTS, cpu_name, replace_section
from pipelines.sources.synthetic import render_scene, resolve_config, synthetic_samples
from pipelines.sources.synthetic_camera import camera_from_spherical
from pipelines.sources.synthetic_render import primary_hits, render_view
from pipelines.sources.synthetic_scene import generate_scene

SECTION = "## Synthetic world"


def _median_rate(fn, items: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return items / statistics.median(times)


def sample_rates(scenes: int, views: int, size: int, repeats: int) -> dict[str, float]:
    out = {}
    for label, figures in (("with_figures", True), ("without_figures", False)):
        config = resolve_config(views_per_scene=views, size=size, with_figures=figures)
        list(synthetic_samples(100, 1, config=config))  # warm-up
        out[f"samples_per_s_{label}"] = _median_rate(
            lambda: list(synthetic_samples(0, scenes, config=config)), scenes * views, repeats)
        out[f"samples_per_s_{label}_with_wds_encoding"] = _median_rate(
            lambda: [s.to_wds() for s in synthetic_samples(0, scenes, config=config)], scenes * views, repeats)
    return out


def culling_ratio(scenes: int, views: int, size: int, repeats: int) -> dict[str, float]:
    config = resolve_config(views_per_scene=views, size=size, with_figures=True)
    rendered = [render_scene(0, i, config) for i in range(scenes)]
    jobs = [(scene, v.camera) for scene, views_ in rendered for v in views_]
    for scene, cam in jobs[:2]:  # identical outputs either way (also a test)
        a, b = render_view(scene, cam, cull=True), render_view(scene, cam, cull=False)
        assert a.image.tobytes() == b.image.tobytes() and a.depth.tobytes() == b.depth.tobytes()
    on = _median_rate(lambda: [render_view(s, c, cull=True) for s, c in jobs], len(jobs), repeats)
    off = _median_rate(lambda: [render_view(s, c, cull=False) for s, c in jobs], len(jobs), repeats)
    return {"render_per_s_culling_on": on, "render_per_s_culling_off": off, "culling_speedup": on / off}


def naive_primary_hits(scene, camera):
    """Per-pixel, per-primitive Python loop over the same kernels (the baseline a first version would write)."""
    H, W = camera.height, camera.width
    dx, dy, dz = camera.pixel_directions()
    ox, oy, oz = camera.position
    t = np.full((H, W), np.inf)
    ids = np.zeros((H, W), dtype=np.int32)
    for i in range(H):
        for j in range(W):
            best, best_id = np.inf, 0
            if scene.spec.ground and dz[i, j] < 0:
                best, best_id = -oz / dz[i, j], 1
            for k, prim in enumerate(scene.primitives):
                tk = float(prim.intersect(ox, oy, oz, dx[i, j], dy[i, j], dz[i, j]))
                if tk < best:
                    best, best_id = tk, k + 2
            t[i, j], ids[i, j] = best, best_id
    return t, ids


def loop_ratio(size: int, repeats: int) -> dict[str, float]:
    scene = generate_scene(np.random.default_rng(0), resolve_config(with_figures=True))
    cam = camera_from_spherical(30.0, 25.0, 5.5, scene.spec.target, size=size)
    t_vec, ids_vec, _, _ = primary_hits(scene, cam)
    t_loop, ids_loop = naive_primary_hits(scene, cam)
    assert (ids_vec == ids_loop).all() and np.array_equal(t_vec, t_loop), "vectorised and loop hits differ"
    pixels = size * size
    vec = _median_rate(lambda: primary_hits(scene, cam), pixels, max(repeats, 5))
    loop = _median_rate(lambda: naive_primary_hits(scene, cam), pixels, 1)
    cam128 = cam.with_size(128)
    vec128 = _median_rate(lambda: primary_hits(scene, cam128), 128 * 128, max(repeats, 5))
    return {"loop_image_size": size, "primary_pixels_per_s_loop": loop, "primary_pixels_per_s_vectorised": vec,
            "vectorised_over_loop": vec / loop, "primary_pixels_per_s_vectorised_128": vec128,
            "vectorised_128_over_loop": vec128 / loop}


def write_section(result: dict, path: Path = RESULTS) -> None:
    r = result
    lines = [
        SECTION,
        "",
        f"`OMP_NUM_THREADS=1 python -m bench.bench_synthetic` — {r['machine']}, one core, in-process, numpy "
        f"{r['numpy']}; {r['scenes']} scenes x {r['views']} views at {r['size']} px, median of {r['repeats']} runs; "
        f"1-min load average {r['load_average_1min']} on {r['cores_online']} cores (shared machine: absolute rates "
        f"vary with load, the ratios are measured side by side).",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| samples/s with figures (generate + render + labels + captions) | "
        f"**{r['samples_per_s_with_figures']:.1f}** |",
        f"| samples/s without figures | **{r['samples_per_s_without_figures']:.1f}** |",
        f"| samples/s with figures, + WebDataset encoding (PNG/npy/JSON) | "
        f"{r['samples_per_s_with_figures_with_wds_encoding']:.1f} |",
        f"| samples/s without figures, + WebDataset encoding | "
        f"{r['samples_per_s_without_figures_with_wds_encoding']:.1f} |",
        f"| render-only images/s, culling on / off | {r['render_per_s_culling_on']:.1f} / "
        f"{r['render_per_s_culling_off']:.1f} (**{r['culling_speedup']:.1f}x**, identical bytes) |",
        f"| primary visibility, pixels/s: vectorised vs per-pixel Python loop ({r['loop_image_size']} px, "
        f"identical hits) | {r['primary_pixels_per_s_vectorised']:.3g} vs {r['primary_pixels_per_s_loop']:.3g} "
        f"(**{r['vectorised_over_loop']:.0f}x**; at 128 px {r['vectorised_128_over_loop']:.0f}x) |",
        "",
        f"Target >= 20 images/s at 128 px on one core: "
        f"{'met' if min(r['samples_per_s_with_figures'], r['samples_per_s_without_figures']) >= 20 else 'MISSED'}.",
        "",
    ]
    replace_section(SECTION, lines, path)


def run(scenes: int = 10, views: int = 4, size: int = 128, repeats: int = 3, loop_size: int = 24) -> dict:
    result = {"scenes": scenes, "views": views, "size": size, "repeats": repeats, "machine": cpu_name(),
              "load_average_1min": round(os.getloadavg()[0], 2), "cores_online": os.cpu_count(),
              "numpy": np.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    result.update(sample_rates(scenes, views, size, repeats))
    result.update(culling_ratio(scenes, views, size, repeats))
    result.update(loop_ratio(loop_size, repeats))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=10)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-size", type=int, default=24, help="image size for the per-pixel loop baseline")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch bench/RESULTS.md")
    a = p.parse_args(argv)
    result = run(a.scenes, a.views, a.size, a.repeats, a.loop_size)
    print(json.dumps(result, indent=2))
    if not a.no_write:
        write_section(result)
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
