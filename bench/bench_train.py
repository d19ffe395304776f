"""Trainer overhead: one step through the real trainer against the thinnest Ray Train + DeepSpeed loop and a bare
PyTorch loop on the same model and batch, side by side in one run; the reader's samples/s against what the trainer
consumes.

    .venv/bin/python bench/bench_train.py [--preset nextdit-small] [--steps 20] [--repeats 3] [--write-results]

Data: a synthetic build made first (64 px, the pixel tokenizer: 32x32 latents, 256 tokens per view), one
text2image batch shape. Three loops per repeat, interleaved so load changes hit them alike:

* trainer: `training.launch.run_train` exactly as `onegen train` runs it (Ray Train TorchTrainer, DeepSpeed ZeRO-2
  engine, every step reading its batch from the build's shards, T5-encoding its prompts, the EMA update, MLflow
  metrics every step); step time = the interval between consecutive steps' MLflow timestamps (wall clock, data
  wait and logging included; the one checkpoint at the end is not in it);
* thin: the thinnest version of the same stack, a TorchTrainer whose workers hold one DeepSpeed engine with the
  same DeepSpeed config and loop over one fixed batch (rank r's share of the trainer's first batch, its prompts
  encoded once) with the same objective (model.flow.flow_matching_loss): no reader, no T5 per step, no EMA, no
  logging;
* bare: that batch in this process, no Ray, no DeepSpeed: loss, backward, gradient clipping, torch AdamW; one thread,
  what one Ray worker gets (`train.cpus_per_worker` = 1).
Targets: trainer / thin <= 1.05; bare is reported (on 2 cores the thinnest wrapper alone is 1.3-2.0x bare).
Reader: the trainer's own batch assembly (DataPlan -> shard rows -> make_sample -> stack) for the global batch, in
one process, samples/s against the trainer's consumption (global batch / step time); target >= 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTION = "## Trainer overhead (CPU)"
RESOLUTION = 64


def build_data(root: Path, scenes: int) -> str:
    """A final synthetic build under root/data; returns its name."""
    from onegen.build_config import BuildConfig
    from onegen.config import load_config
    from pipelines.build import run_build

    cfg = load_config(None, [
        "run.name=bench-data", f"run.work_dir={root / 'work'}", f"storage.root={root / 'data'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"build.resolutions=[{RESOLUTION}]", "build.decode.min_size=32", "build.conditions.kinds=[canny]",
        f"build.sources=[{{name: synth, type: synthetic, scenes: {scenes}, views_per_scene: 1, partition_size: 8, "
        f"size: {RESOLUTION}}}]", "ray.num_cpus=2", f"ray.object_store_memory={1 << 30}",
    ], BuildConfig)
    run_build(cfg)
    return cfg.build_name


def train_config(root: Path, args, name: str):
    from onegen.config import load_config
    from onegen.train_config import TrainConfig

    steps = args.warmup + args.steps
    return load_config(None, [
        f"run.name={name}", f"run.work_dir={root / 'work'}", f"storage.root={root / 'data'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"model.preset={args.preset}",
        "train.data.builds=[{uri: bench-data}]",
        f"train.stages=[{{name: s1, steps: {steps}, resolution: {RESOLUTION}, mixture: [{{task: text2image}}]}}]",
        f"train.global_batch_size={args.per_rank * args.workers}", f"train.num_workers={args.workers}",
        "train.cpus_per_worker=1", "train.precision=fp32", "train.zero_stage=2",
        f"train.checkpoint_every={steps}", "train.samples.every=0", "train.log_every=1",
        "ray.num_cpus=2", f"ray.object_store_memory={1 << 30}",
    ], TrainConfig)


def fixed_batch(cfg, rank: int, world_size: int):
    """Rank `rank`'s share of the stage's first batch, as the trainer assembles it, with its prompts encoded by the
    run's T5 once: (batch, text states, text mask, uncond states, uncond mask, loss channel mask)."""
    import torch

    from model.presets import PRESETS
    from training.components import load_text_encoder, loss_channel_mask
    from training.loop import stage_data
    from training.reader import rank_share

    data = stage_data(cfg, 0)
    key, choices = data.plan.batch(data.plan.start())
    generator = torch.Generator().manual_seed(0)
    batch = data.batch(rank_share(choices, rank, world_size), generator, cfg.train.data.latents == "sample")
    encoder = load_text_encoder(cfg, PRESETS[cfg.model.preset]["caption_channels"], torch.device("cpu"))
    with torch.no_grad():
        states, mask = encoder.encode(batch.prompts)
        uncond_states, uncond_mask = encoder.encode([""])
    return batch, states, mask, uncond_states, uncond_mask, loss_channel_mask(data.image_tokenizer)


def timed_steps(step, count: int) -> list[float]:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def objective(model, fixed, cfg, generator, process_group=None):
    from model.flow import flow_matching_loss
    from training.components import flow_config

    batch, states, mask, uncond_states, uncond_mask, channel_mask = fixed
    loss, _ = flow_matching_loss(model, batch.latents, states, mask, batch.target_mask, flow_config(cfg.train.flow),
                                 generator,
                                 uncond_text_states=uncond_states, uncond_text_mask=uncond_mask,
                                 channel_mask=channel_mask, view_mask=batch.view_mask, process_group=process_group)
    return loss


def seeded_model(cfg):
    import torch

    from model.nextdit import NextDiT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return NextDiT.from_preset(cfg.model.preset, attn_impl=cfg.model.attn_impl)


def run_bare(cfg, count: int) -> tuple[list[float], int]:
    """The batch of one rank in this process: no Ray, no DeepSpeed."""
    import torch

    fixed = fixed_batch(cfg, 0, cfg.train.num_workers)
    model = seeded_model(cfg).train()
    opt = cfg.train.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    generator = torch.Generator().manual_seed(1)

    def step():
        loss = objective(model, fixed, cfg, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, count), torch.get_num_threads()


def thin_worker(config: dict) -> None:
    """The thinnest Ray Train + DeepSpeed loop: one engine, one fixed batch, the objective, backward, step."""
    import ray.train
    import torch
    import torch.distributed as dist

    from onegen.train_config import TrainConfig
    from training.engine import init_distributed, make_engine

    cfg = TrainConfig.model_validate(config["cfg"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    init_distributed()
    fixed = fixed_batch(cfg, rank, world_size)
    model = seeded_model(cfg)
    engine = make_engine(model, cfg.train, total_steps=config["count"], per_rank_batch=len(fixed[0]))
    engine.train()
    generator = torch.Generator().manual_seed(1 + rank)

    def step():
        loss = objective(engine, fixed, cfg, generator, dist.group.WORLD)
        engine.backward(loss)
        engine.step()

    times = timed_steps(step, config["count"])
    if rank == 0:  # a file, not ray.train.report: Ray Train v2 returns metrics only with a checkpoint
        Path(config["out"]).write_text(json.dumps({"step_times": times, "threads": torch.get_num_threads()}))


def run_thin(cfg, count: int) -> tuple[list[float], int]:
    out = Path(cfg.run.work_dir) / f"{cfg.run.name}-thin.json"
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        thin_worker, train_loop_config={"cfg": cfg.model_dump(mode="json"), "count": count, "out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=f"{cfg.run.name}-thin", storage_path=str(Path(cfg.run.work_dir) / "ray-thin")))
    trainer.fit()
    result = json.loads(out.read_text())
    return result["step_times"], int(result["threads"])


def run_trainer(cfg) -> tuple[list[float], dict[str, list[float]]]:
    """`onegen train`'s path; per-step wall times from the consecutive steps' MLflow timestamps, and the trainer's
    own per-step metrics of where a step's time goes (train/step_seconds: batch assembly + step + EMA, without
    logging and the loop's bookkeeping; train/data_wait_fraction: the batch assembly's share of it)."""
    from mlflow import MlflowClient

    from onegen.tracking import tracking_uri
    from training.launch import run_train

    run_train(cfg)
    client = MlflowClient(tracking_uri(cfg))
    stage_runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.mlflow.runName = '{cfg.run.name}/{cfg.train.stages[0].name}'")
    assert len(stage_runs) == 1, [r.info.run_id for r in stage_runs]
    run_id = stage_runs[0].info.run_id
    def history(key: str):
        return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)

    stamps = [m.timestamp / 1000 for m in history("train/loss")]
    inner = [m.value for m in history("train/step_seconds")]
    data = [f * s for f, s in zip((m.value for m in history("train/data_wait_fraction")), inner)]
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]  # interval i: the end of step i to the end of step i+1
    # outside the measured step: interval i minus step i+1's own seconds (logging, bookkeeping), step by step
    return intervals, {"inner": inner[1:], "data": data[1:],
                       "outside": [i - s for i, s in zip(intervals, inner[1:])]}


def reader_rate(cfg, batches: int) -> float:
    """Samples/s of the trainer's batch assembly (one process, the global batch each step)."""
    import torch

    from training.loop import stage_data

    data = stage_data(cfg, 0)
    plan = data.plan
    cursor, generator, samples = plan.start(), torch.Generator().manual_seed(0), 0
    start = time.perf_counter()
    for _ in range(batches):
        _, choices = plan.batch(cursor)
        data.batch(choices, generator, cfg.train.data.latents == "sample")
        samples += len(choices)
        cursor = plan.advance(cursor)
    return samples / (time.perf_counter() - start)


def fmt(times: list[float]) -> str:
    return " ".join(f"{t:.2f}" for t in times)


def summary(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nextdit-small")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=4, help="untimed first steps per loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-rank", type=int, default=2, help="samples per rank per step")
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--write-results", action="store_true", help=f"replace {SECTION!r} in bench/RESULTS.md")
    args = parser.parse_args()

    import ray
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
        started = time.perf_counter()
        build_data(root, args.scenes)
        count = args.warmup + args.steps
        for repeat in range(args.repeats):
            cfg = train_config(root, args, f"bench-{repeat}")
            bare, bare_threads = run_bare(cfg, count)
            thin, thin_threads = run_thin(cfg, count)
            real, parts = run_trainer(cfg)
            reader = reader_rate(cfg, 50)
            row = {"bare": summary(bare, args.warmup), "thin": summary(thin, args.warmup),
                   "trainer": summary(real, args.warmup - 1), "reader": reader,
                   "inner": summary(parts["inner"], args.warmup - 1), "data": summary(parts["data"], args.warmup - 1),
                   "outside": summary(parts["outside"], args.warmup - 1),
                   "threads": (bare_threads, thin_threads)}
            rows.append(row)
            print(f"repeat {repeat}: bare {row['bare']:.3f} s, thin {row['thin']:.3f} s, trainer "
                  f"{row['trainer']:.3f} s per step; reader {reader:.0f} samples/s; threads {row['threads']}; "
                  f"steps (s): bare {fmt(bare)}, thin {fmt(thin)}, trainer {fmt(real)}", flush=True)
        ray.shutdown()
    report = format_report(args, rows, time.perf_counter() - started)
    print("\n".join(report))
    if args.write_results:
        from bench.results_file import replace_section

        replace_section(SECTION, report)
    return 0


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def format_report(args, rows: list[dict], seconds: float) -> list[str]:
    from bench.results_file import cpu_name

    gb = args.per_rank * args.workers
    lines = [SECTION, "", f"`.venv/bin/python bench/bench_train.py --write-results` - {cpu_name()}, "
             f"{time.strftime('%Y-%m-%d')}; {args.preset}, text2image at {RESOLUTION} px (256 tokens), "
             f"{args.workers} workers x {args.per_rank} samples, 1 thread each, ZeRO-2 fp32; median step over "
             f"{args.steps} steps after {args.warmup} warm-up, {args.repeats} repeats (median, min-max); "
             f"whole run {seconds:.0f} s.", "",
             "| loop | s/step | samples/s |", "|---|---|---|"]
    for name in ("bare", "thin", "trainer"):
        values = [row[name] for row in rows]
        lines.append(f"| {name} | {spread(values)} | {gb / statistics.median(values):.2f} |")
    inner, data = statistics.median(r["inner"] for r in rows), statistics.median(r["data"] for r in rows)
    outside = statistics.median(r["outside"] for r in rows)
    lines += ["", f"Where the trainer's step goes (medians): {data * 1e3:.0f} ms assembling the batch from the shards "
              f"(reader), {(inner - data) * 1e3:.0f} ms in the step (T5 on the prompts, forward, backward, "
              f"DeepSpeed's step, the EMA), {outside * 1e3:.0f} ms outside it (MLflow logging, "
              "bookkeeping: each wall-clock interval between steps minus that step's train/step_seconds; MLflow "
              "timestamps are whole milliseconds)."]
    ratios = {"trainer / thin": [r["trainer"] / r["thin"] for r in rows],
              "thin / bare": [r["thin"] / r["bare"] for r in rows],
              "reader / trainer consumption": [r["reader"] / (gb / r["trainer"]) for r in rows]}
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    targets = {"trainer / thin": "<= 1.05", "thin / bare": "reported", "reader / trainer consumption": ">= 10"}
    for name, values in ratios.items():
        lines.append(f"| {name} | **{spread(values)}** | {targets[name]} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
