"""`onegen demo`: the most complete real chain that exists today, end to end on the embedded defaults.

1. Render the synthetic One-Gen world in Ray tasks (local Ray, or RAY_ADDRESS) and write the samples as WebDataset
   shards under the storage root (local path or s3://), each shard written atomically.
2. Read the shards back, tokenize images with `data.tokenizer` (default: the exact pixel tokenizer) and captions with
   a tiny T5 built locally (no hub downloads here), and draw the depth condition maps (model.depth: 8-bit relative
   inverse depth, near = white, sky black).
3. Train a small NextDiT in this process with the flow-matching objective on a 50/50 mix of text→image and
   image→depth, tracked in MLflow (resolved config, git commit, both tasks' loss curves). It trains in fp32:
   bf16 is several times slower on CPUs without bf16 matmul units (bench/RESULTS.md); precision, workers and ZeRO
   belong to the DeepSpeed trainer's schema. The same noise schedule (`demo.shift`) is used to train, to sample
   and in the saved scheduler.
4. Save the model in the release layout, load it back through `OneDiffusionPipeline`, generate images for training
   captions and estimate depth for training images, score the depth against the exact ground truth next to two
   baselines (a constant map, a "closer at the bottom" ramp) with the one protocol of model.depth.score_depth
   (scale+shift fit in inverse depth, then AbsRel and δ1), and log a picture grid. The model memorises its small
   training set: the numbers show the chain works, not generalisation.

The data build, Ray Train/DeepSpeed training and evaluation issues replace steps 1–4 with the real jobs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from model.depth import constant_map, depth_map_to_uint8, depth_to_map, score_depth, vertical_ramp_map
from onegen import errors
from onegen.cli import add_config_options, config_from_args
from onegen.config import ConfigError, image_size_problem

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser)
    parser.set_defaults(config=str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = run_demo(cfg)
    print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# 1. Render the synthetic world with Ray, write shards to storage
# ---------------------------------------------------------------------------------------------------------------------

def _render_shard(seed: int, first_scene: int, num_scenes: int, views: int, size: int) -> bytes:
    """One WebDataset tar (bytes) holding the views of scenes first_scene .. first_scene + num_scenes - 1."""
    from pipelines.sources.synthetic import render_shard_bytes, resolve_config

    return render_shard_bytes(seed, first_scene, num_scenes, resolve_config(views_per_scene=views, size=size))


def render_shards(cfg, storage, prefix: str) -> list[str]:
    """Render the demo scenes in Ray tasks, one shard per task; returns the shard paths relative to storage."""
    import ray
    from tqdm import tqdm

    from onegen.raycluster import init_ray

    demo = cfg.demo
    started_here = not ray.is_initialized()
    init_ray(cfg)
    render = ray.remote(num_cpus=1)(_render_shard)
    starts = list(range(0, demo.scenes, demo.scenes_per_shard))
    futures = {render.remote(cfg.run.seed, s, min(demo.scenes_per_shard, demo.scenes - s), demo.views_per_scene,
                             cfg.data.image_size): f"{prefix}/shard-{i:05d}.tar" for i, s in enumerate(starts)}
    # Shards are written as their tasks finish, in any order; each shard's bytes depend only on its scenes and the
    # returned list is sorted, so what the demo reads back (and trains on) is the same every run.
    pending = list(futures)
    try:
        with tqdm(total=len(pending), desc="render shards (ray)", unit="shard") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                storage.write_bytes(futures[done[0]], ray.get(done[0]))
                bar.update(1)
    finally:
        if started_here:
            ray.shutdown()  # training runs in this process: free the local instance's workers, also on errors
    return sorted(futures.values())


def read_samples(storage, shard_paths: list[str]):
    """The samples of the shards, in order."""
    from pipelines.record import samples_from_wds_tar

    return [sample for path in shard_paths for sample in samples_from_wds_tar(storage.read_bytes(path))]


# ---------------------------------------------------------------------------------------------------------------------
# 2. Views: images and depth maps in [-1, 1]
# ---------------------------------------------------------------------------------------------------------------------

def _to_unit_range(rgb01: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb01, dtype=np.float32)).permute(2, 0, 1) * 2 - 1


def condition_map(depth: np.ndarray) -> np.ndarray:
    """The depth condition map as a labeler writes it (model.depth: 8-bit inverse depth, near = white), in [0, 1]."""
    return depth_map_to_uint8(depth_to_map(depth)) / 255.0


def make_views(samples):
    """(images (N,3,H,W), depth maps (N,3,H,W), both in [-1, 1]; captions)."""
    import torch

    images = torch.stack([_to_unit_range(s.image / 255.0) for s in samples])
    depth_maps = torch.stack([_to_unit_range(np.repeat(condition_map(s.depth)[..., None], 3, axis=2))
                              for s in samples])
    captions = [s.captions["short"] for s in samples]
    return images, depth_maps, captions


# ---------------------------------------------------------------------------------------------------------------------
# 3. Train (in-process for now; the training issue moves this to Ray Train + DeepSpeed)
# ---------------------------------------------------------------------------------------------------------------------

def demo_flow_config(cfg):
    """The one noise schedule of the demo: trained with, sampled with, and saved as the pipeline's scheduler."""
    from model.flow import FlowConfig

    sampling = {"num_train_timesteps": 1000, "shift": cfg.demo.shift, "use_dynamic_shifting": False}
    return FlowConfig(shift=cfg.demo.shift, clean_condition_prob=0.5, text_dropout_prob=0.1,
                      sampling_schedule=sampling, condition_steps=cfg.demo.sample_steps)


def demo_layouts():
    """The two tasks the demo trains, as model.views lays them out for the pipeline too."""
    from model.views import view_layout

    return {"text2image": view_layout("text2image"), "depth": view_layout("depth2image", direction="estimate")}


def encode_task_prompts(text_encoder, captions):
    """Every caption as each task's prompt (task token first, model.views.full_prompt), encoded once: T5 is frozen."""
    from model.views import full_prompt

    return {name: text_encoder.encode([full_prompt(layout.task, c) for c in captions])
            for name, layout in demo_layouts().items()}


def train(cfg, model, flow_cfg, image_latents, depth_latents, task_text, uncond_states, uncond_mask, channel_mask,
          log_metric):
    """A 50/50 mix of text→image (1 view) and image→depth (2 views, the image a condition) batches, built by the
    view layer the pipeline samples with (model.views), prompts with their task tokens."""
    import torch
    from tqdm import tqdm

    from model.flow import flow_matching_loss
    from model.views import build_sample, stack

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - 0.9 * step / cfg.train.steps)  # to 10%
    generator = torch.Generator().manual_seed(cfg.run.seed)
    n = image_latents.shape[0]
    size = tuple(image_latents.shape[-2:])
    layouts = demo_layouts()
    losses = []
    task_losses: dict[str, list[float]] = {name: [] for name in layouts}
    model.train()
    bar = tqdm(range(cfg.train.steps), desc="train (flow matching)", unit="step")
    for step in bar:
        idx = torch.randint(0, n, (min(cfg.train.batch_size, n),), generator=generator)
        task = "text2image" if step % 2 == 0 else "depth"
        views = [{0: image_latents[i]} if task == "text2image" else {0: image_latents[i], 1: depth_latents[i]}
                 for i in idx.tolist()]
        batch = stack([build_sample(layouts[task], "", size=size, picture_latents=v) for v in views])
        text_states, text_mask = task_text[task]
        loss, _ = flow_matching_loss(model, batch.latents, text_states[idx], text_mask[idx], batch.target_mask,
                                     flow_cfg, generator, uncond_text_states=uncond_states,
                                     uncond_text_mask=uncond_mask, channel_mask=channel_mask,
                                     view_mask=batch.view_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        task_losses[task].append(losses[-1])
        if step % 20 == 19 or step == cfg.train.steps - 1:  # both tasks' running means (even steps t2i, odd depth)
            for name, values in task_losses.items():
                if values:
                    log_metric(f"train/loss_{name}", float(np.mean(values[-10:])), step)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------------------------------
# 4. Evaluate through the pipeline
# ---------------------------------------------------------------------------------------------------------------------

# Every depth number goes through model.depth.score_depth (scale+shift fit in inverse depth, AbsRel and δ1): the
# model's estimate and the baselines alike, so they compare like with like.
DEPTH_BASELINES = {"constant": constant_map, "ramp": vertical_ramp_map}


def depth_scores(estimated_map: np.ndarray, true_depth: np.ndarray) -> dict[str, float]:
    """Metric name -> value for one image: the estimate's AbsRel and δ1, and each baseline's."""
    scores = {"": score_depth(estimated_map, true_depth)}
    scores.update({f"_{name}": score_depth(make(true_depth.shape), true_depth)
                   for name, make in DEPTH_BASELINES.items()})
    return {f"eval/depth_{metric}{suffix}": getattr(score, metric)
            for suffix, score in scores.items() for metric in ("abs_rel", "delta1")}


def picture_grid(rows: list[list[np.ndarray]]):
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    grid = np.full((len(rows) * (h + 2), max(map(len, rows)) * (w + 2), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            tile = tile if tile.ndim == 3 else np.repeat(tile[..., None], 3, axis=2)
            grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = tile
    return Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST)


def _uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.round(unit * 255), 0, 255).astype(np.uint8)


def evaluate(cfg, pipeline, samples, captions, out_dir: Path):
    """Generate images for the first captions and estimate depth for the first images; returns (metrics, grid)."""
    demo = cfg.demo
    count = min(demo.eval_samples, len(samples))
    common = dict(num_inference_steps=demo.sample_steps, guidance_scale=demo.guidance_scale, seed=cfg.run.seed,
                  progress=False, output_type="np", height=cfg.data.image_size, width=cfg.data.image_size)
    rows, per_image = [], []  # images as floats in [0, 1]
    for i in range(count):
        s = samples[i]
        generated = pipeline("text2image", captions[i], **common).images[0]
        estimated = pipeline("depth2image", captions[i], images=[s.image], direction="estimate", **common)
        depth_map = estimated.depth[0]
        image_error = float(np.abs(generated.astype(np.float64) - s.image / 255.0).mean())  # "np": [0, 1]
        per_image.append({**depth_scores(depth_map, s.depth), "eval/t2i_mean_abs_error": image_error})
        rows.append([s.image, _uint8(generated), depth_map_to_uint8(depth_to_map(s.depth)), _uint8(depth_map)])
    grid = picture_grid(rows)
    grid_path = out_dir / "demo_grid.png"
    grid.save(grid_path)
    metrics = {name: float(np.mean([scores[name] for scores in per_image])) for name in per_image[0]}
    return metrics, grid_path


def depth_summary(metrics: dict) -> dict[str, str]:
    """The summary lines of the depth scores: the model against both baselines, same protocol."""
    def line(metric: str) -> str:
        return " / ".join(f"{metrics[f'eval/depth_{metric}{suffix}']:.3f}"
                          for suffix in ("", *(f"_{name}" for name in DEPTH_BASELINES)))

    label = "(trained model / constant / closer-at-the-bottom ramp; each scale+shift fitted)"
    return {f"depth AbsRel {label}": line("abs_rel"), f"depth delta1 {label}": line("delta1")}


# ---------------------------------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------------------------------

def run_demo(cfg) -> dict:
    from onegen.preflight import check_run_targets

    # Work dir, Ray address, MLflow and storage usable: refused before anything is written, and before the heavy
    # imports below (torch, mlflow: ~6 s), so a dead tracking server is reported in seconds.
    check_run_targets(cfg)

    import mlflow
    import torch

    from model.nextdit import NextDiT
    from model.pipeline import OneDiffusionPipeline
    from model.tokenizers import T5TextEncoder, build_tiny_t5, load_image_tokenizer
    from onegen.storage import Storage
    from onegen.tracking import start_run

    torch.manual_seed(cfg.run.seed)
    out_dir = Path(cfg.run.work_dir) / cfg.run.name
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = Storage.from_config(cfg)
    shards = storage.uri(f"{cfg.run.name}/synthetic")
    with errors.step("load the image tokenizer", input=f"data.tokenizer={cfg.data.tokenizer}"):
        tokenizer = load_image_tokenizer(cfg.data.tokenizer)  # "pixel" (exact, CPU-scale) or an AutoencoderKL
    # Config validation assumed 8 for a hub VAE; the loaded one may say otherwise.
    problem = image_size_problem(cfg, tokenizer.downsample_factor)
    if problem:
        raise ConfigError([f"data.image_size: {problem}"])
    started = time.perf_counter()

    with start_run(cfg, run_name=cfg.run.name) as active:
        with errors.step("render shards", input=shards):
            shard_paths = render_shards(cfg, storage, prefix=f"{cfg.run.name}/synthetic")
        with errors.step("read shards", input=shards):
            samples = read_samples(storage, shard_paths)
        mlflow.log_metric("data/samples", len(samples))
        with errors.step("encode views and captions", input=shards):
            images, depth_maps, captions = make_views(samples)
            model = NextDiT.from_preset(cfg.model.preset, attn_impl=cfg.model.attn_impl)
            flow_cfg = demo_flow_config(cfg)
            text_dir = build_tiny_t5(out_dir / "text", d_model=model.config.caption_channels, seed=cfg.run.seed)
            text_encoder = T5TextEncoder.from_pretrained(text_dir)
            with torch.no_grad():
                image_latents, depth_latents = tokenizer.encode(images), tokenizer.encode(depth_maps)
                task_text = encode_task_prompts(text_encoder, captions)
                uncond_states, uncond_mask = text_encoder.encode([""])
        mlflow.log_param("model.parameters", sum(p.numel() for p in model.parameters()))

        with errors.step("train", input=f"model.preset={cfg.model.preset}, train.steps={cfg.train.steps}"):
            losses = train(cfg, model, flow_cfg, image_latents, depth_latents, task_text, uncond_states, uncond_mask,
                           tokenizer.loss_channel_mask, lambda name, value, at: mlflow.log_metric(name, value, step=at))

        with errors.step("save and reload the pipeline", input=out_dir / "pipeline"):
            pipeline = OneDiffusionPipeline(model, tokenizer, text_encoder, flow_cfg.sampling_schedule)
            model_dir = pipeline.save_pretrained(out_dir / "pipeline")
            pipeline = OneDiffusionPipeline.from_pretrained(model_dir)  # what a user of the trained model loads
        with errors.step("evaluate", input=model_dir):
            metrics, grid_path = evaluate(cfg, pipeline, samples, captions, out_dir)
        first, last = float(np.mean(losses[:20])), float(np.mean(losses[-20:]))
        metrics.update({"train/loss_first20": first, "train/loss_last20": last})
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(grid_path), artifact_path="samples")
        run_id = active.info.run_id

    return {
        "samples": len(samples),
        "shards": shards,
        "loss (first 20 -> last 20 steps)": f"{first:.4f} -> {last:.4f}",
        **depth_summary(metrics),
        "pipeline folder": str(model_dir),
        "picture grid (image | generated | true depth | estimated depth)": str(grid_path),
        "mlflow": f"{mlflow.get_tracking_uri()} run {run_id}",
        "seconds": f"{time.perf_counter() - started:.0f}",
    }
