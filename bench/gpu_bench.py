"""GPU benchmark: the trainer's own step for OneDiffusion 2.8B on one H100/H200, and the build's VAE encode stage.

    python3 bench/gpu_bench.py --out $OUT/gpu_results.json           # on the lent GPU machine, <= ~8 min
    python3 bench/gpu_bench.py --out ... --write-results              # + "## GPU bench" in bench/RESULTS.md
    python3 bench/gpu_bench.py --dry-run-cpu --out /tmp/gpu_dry.json  # the same code on the CPU, nextdit-tiny

Runs with `python3` where torch (CUDA), deepspeed, diffusers and this repository import (INTERFACES §5: the lent
machine has torch, transformers, peft and pyarrow; carry deepspeed, built here with DS_BUILD_OPS=0, and diffusers as
wheels). Without a CUDA device (and without --dry-run-cpu) it prints "no CUDA device: nothing measured" and exits 0.

What it measures (`onediffusion-2.8b`, random init moved off the zero init; nothing is read from disk):
* the trainer's step: `training.step.StepRunner.step` over the DeepSpeed engine of `training.engine.make_engine`
  (ZeRO-2, torch AdamW, bf16 weights with fp32 masters: train.precision bf16, what run_stage builds on a GPU) and the
  EMA update `training.ema.EmaWeights.step`, on `model.views.Batch`es of random latents: text->image at 256 px
  (latent 32x32, 256 tokens, batch 32), 512 px (1024 tokens, batch 8) and 1024 px (4096 tokens, batch 2) while the
  budget lasts, and a 2-view image->image at 512 px; the text states are a stand-in of T5-XXL's output (length 256,
  the frozen T5's forward is not in the step); warm-up steps (compilation included) excluded, median of the timed
  steps (CUDA events);
* samples/s, tokens/s, peak memory and MFU against the card's dense bf16 peak, with FLOPs per sample (forward +
  backward) counted as
      6 * P * N + 12 * depth * N^2 * hidden
  P = all parameters (2,800,389,184), N = image tokens per sample (all views), hidden = 3840, depth = 16; the text
  cross-attention (12 * depth * N * L * hidden, L = 256) is left out of the MFU and written to the JSON apart;
* flex vs math attention forward on one 256 px batch in the training dtype (relative L2 error);
* the build's encode stage (`pipelines.process.ViewEncoder`, bf16, torch.compile'd encoder) with a random-weight
  AutoencoderKL of the SD3/FLUX architecture: images/s at 256 px.
A batch that runs out of memory is halved (twice at most) and the batch used is recorded. Every configuration runs
under a SIGALRM time limit and the whole run under `--budget-s` (default 450 s); results are written to `--out`
after each configuration, so an interrupted run leaves what it measured.

Floors to beat on one H200 (docs STACK.md section 7, a bare compiled PyTorch 2.8B step): 111 samples/s at 256 px
(49.8% MFU) and 24.9 samples/s at 512 px (45%) with compiled FlexAttention and softcap; eager SDPA without softcap
76 samples/s at 256 px (34% MFU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

# Before torch is imported: less fragmentation when a batch that ran out of memory is retried at half the size.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_file import RESULTS, replace_section  # noqa: E402

SECTION_PREFIX = "## GPU bench"
COMMAND = "python3 bench/gpu_bench.py --out $OUT/gpu_results.json --write-results"
NO_CUDA = "no CUDA device: nothing measured"
TEXT_LEN = 256
LATENT_FACTOR = 8  # VAE: 256 px -> 32x32 latent; patch 2 -> 16x16 = 256 tokens per view
FLOORS_H200 = {
    "eager SDPA, no softcap, 256 px": {"samples_per_s": 76.0, "mfu": 0.34},
    "compiled FlexAttention softcap, 256 px": {"samples_per_s": 111.0, "mfu": 0.498},
    "compiled FlexAttention softcap, 512 px": {"samples_per_s": 24.9, "mfu": 0.45},
}
WORKLOADS = (
    {"name": "t2i-256", "px": 256, "views": 1, "batch": 32},
    {"name": "t2i-512", "px": 512, "views": 1, "batch": 8},
    {"name": "i2i-512-2view", "px": 512, "views": 2, "batch": 4},
    {"name": "t2i-1024", "px": 1024, "views": 1, "batch": 2},
)
VAE_BATCH = 64
FLOPS_FORMULA = "per sample, fwd+bwd: 6*P*N + 12*depth*N^2*hidden (N = image tokens of all views; text attention apart)"


class ConfigTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ConfigTimeout in the main thread after `seconds` (SIGALRM; a no-op where SIGALRM does not exist)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise ConfigTimeout(f"over the {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def peak_bf16_flops(device_name: str, override_tflops: float | None) -> float | None:
    """Dense bf16 tensor-core peak (no sparsity) of the card, from its name; None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    name = device_name.upper()
    if "H200" in name:
        return 989.4e12
    if "H100" in name:
        if "PCIE" in name:
            return 756.0e12
        if "NVL" in name:
            return 835.0e12
        return 989.4e12  # SXM / "H100 80GB HBM3"
    if "A100" in name:
        return 312.0e12
    return None


def flops_per_sample(params: int, tokens: int, depth: int, hidden: int) -> float:
    return 6.0 * params * tokens + 12.0 * depth * tokens**2 * hidden


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------- runner


class Bench:
    """The trainer's step (training.step.StepRunner over training.engine.make_engine's DeepSpeed engine, the EMA
    update of training.ema) on one device, one workload after another."""

    def __init__(self, args, device, torch):
        self.a, self.device, self.torch = args, device, torch
        self.started = time.perf_counter()
        self.cuda = device.type == "cuda"
        import torch.distributed as dist

        from model.nextdit import NextDiT
        from onegen.train_config import TrainSection
        from training.components import flow_config
        from training.ema import EmaWeights
        from training.engine import init_distributed, make_engine
        from training.step import StepRunner, TextEncoding

        precision = "bf16" if self.cuda else "fp32"  # the trainer's choice per device (train.precision)
        self.train = TrainSection.model_validate({
            "data": {"builds": [{"uri": "bench"}]},
            "stages": [{"name": "bench", "steps": 1000, "resolution": 256, "mixture": [{"task": "text2image"}]}],
            "precision": precision, "zero_stage": args.zero_stage,
            "activation_checkpointing": args.activation_checkpointing})
        torch.manual_seed(0)
        with torch.device(device):
            model = NextDiT.from_preset(args.preset, attn_impl=args.attn)
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():  # off the zero init (adaLN, gates, final layer), so outputs and numerics are real
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, device=device), alpha=0.02)
        if self.train.activation_checkpointing:
            model.enable_gradient_checkpointing()
        self.params = sum(p.numel() for p in model.parameters())
        self.hidden, self.depth = model.hidden_size, len(model.layers)
        self.in_channels, self.patch = model.in_channels, model.patch_size
        self.caption_channels = model.caption_channels
        bf16 = precision == "bf16"
        self.ema = EmaWeights(model, self.train.ema, keep=True, masters=self.train.zero_stage == 3 or bf16).to(device) \
            if args.ema else None
        init_distributed()
        self.group = dist.group.WORLD
        self.engine = make_engine(model, self.train, total_steps=1000, per_rank_batch=WORKLOADS[0]["batch"])
        self.engine.train()
        text = TextEncoding(self.encode_text, *self.encode_text([""]))
        self.runner = StepRunner(self.engine, text, flow_config(self.train.flow), device=device,
                                 model_dtype=torch.bfloat16 if bf16 else None)
        import deepspeed

        name = torch.cuda.get_device_name(device) if self.cuda else "cpu (dry run)"
        self.peak = peak_bf16_flops(name, args.peak_tflops)
        self.result = {
            "status": "running",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python3", "bench/gpu_bench.py", *sys.argv[1:]]),
            "device": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "deepspeed": deepspeed.__version__,
            "preset": args.preset,
            "params": self.params,
            "hidden": self.hidden,
            "depth": self.depth,
            "text_len": TEXT_LEN,
            "attn_impl": model.attn_impl,
            "precision": f"{precision} (DeepSpeed ZeRO-{args.zero_stage}, torch AdamW; bf16 weights and fp32 "
                         "masters on the GPU)" if bf16 else f"{precision} (DeepSpeed ZeRO-{args.zero_stage})",
            "step": "training.step.StepRunner.step" + (" + EmaWeights.step" if args.ema else "")
                    + (", activation checkpointing" if args.activation_checkpointing else ""),
            "peak_bf16_tflops": None if self.peak is None else self.peak / 1e12,
            "flops_formula": FLOPS_FORMULA,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "floors_h200": FLOORS_H200,
            "runs": [],
            "numerics": None,
            "vae_encode": None,
        }

    def encode_text(self, prompts: list[str]):
        """The frozen T5's output stand-in: random states of the release's text length, valid lengths from a quarter
        to all of it (T5-XXL's forward is not part of the step's cost here: the trainer runs it frozen, no grad)."""
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(len(prompts))
        states = torch.randn(len(prompts), TEXT_LEN, self.caption_channels, generator=g, device=self.device)
        lengths = torch.randint(TEXT_LEN // 4, TEXT_LEN + 1, (len(prompts),), generator=g, device=self.device)
        return states, torch.arange(TEXT_LEN, device=self.device)[None] < lengths[:, None]

    # -------------------------------------------------------------- helpers

    def remaining(self) -> float:
        return self.a.budget_s - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        if self.a.out:
            out = Path(self.a.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(self.result, indent=2) + "\n")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def free(self) -> None:
        self.engine.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def batch(self, workload: dict, batch: int, seed: int = 0):
        """A views.Batch as the reader stacks it: random latents of the workload's size, view 0 a condition when
        there are several views."""
        from model.views import Batch

        torch, dev = self.torch, self.device
        g = torch.Generator(device=dev).manual_seed(seed)
        lat = workload["px"] // LATENT_FACTOR
        views = workload["views"]
        latents = torch.randn(batch, views, self.in_channels, lat, lat, generator=g, device=dev)
        target = torch.tensor([[views == 1] + [True] * (views - 1)] * batch, device=dev)
        tokens = views * (lat // self.patch[1]) * (lat // self.patch[2])
        return Batch(latents, target, torch.ones_like(target), [f"prompt {i}" for i in range(batch)]), tokens

    def train_step(self, batch, generator) -> dict:
        metrics = self.runner.step(batch, generator, self.group)
        if self.ema is not None:
            self.ema.step(self.engine.module)
        return metrics

    # -------------------------------------------------------------- measurements

    def run_train(self, workload: dict) -> None:
        torch = self.torch
        entry = {"workload": workload["name"], "px": workload["px"], "views": workload["views"],
                 "requested_batch": workload["batch"]}
        self.result["runs"].append(entry)
        limit = min(self.a.config_timeout, self.remaining() - 15)
        if limit < 30:
            entry["status"] = "skipped: time budget spent"
            print(f"  {workload['name']}: {entry['status']}", flush=True)
            self.save()
            return
        batch_size = workload["batch"]
        t_start = time.perf_counter()
        for attempt in range(3):
            oom = False
            try:
                with time_limit(limit - (time.perf_counter() - t_start)):
                    if self.cuda:
                        torch.cuda.reset_peak_memory_stats()
                    batch, tokens = self.batch(workload, batch_size)
                    generator = torch.Generator(device=self.device).manual_seed(1)
                    self.sync()
                    t0 = time.perf_counter()
                    for _ in range(self.a.warmup):
                        self.train_step(batch, generator)
                    self.sync()
                    warm_s = time.perf_counter() - t0
                    times, losses = [], []
                    for _ in range(self.a.steps):
                        if self.cuda:
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            metrics = self.train_step(batch, generator)
                            end.record()
                            end.synchronize()
                            times.append(start.elapsed_time(end) / 1e3)
                        else:
                            t1 = time.perf_counter()
                            metrics = self.train_step(batch, generator)
                            times.append(time.perf_counter() - t1)
                        losses.append(metrics["loss"])
                step_s = statistics.median(times)
                fl = flops_per_sample(self.params, tokens, self.depth, self.hidden)
                sps = batch_size / step_s
                entry.update(
                    status="ok", batch=batch_size, tokens_per_sample=tokens, warmup_s=round(warm_s, 2),
                    step_ms_median=round(step_s * 1e3, 2), step_ms_all=[round(t * 1e3, 2) for t in times],
                    losses=[round(x, 5) for x in losses], lr=metrics["lr"], grad_norm=metrics["grad_norm"],
                    samples_per_s=round(sps, 2), tokens_per_s=round(sps * tokens),
                    flops_per_sample=fl, text_attn_flops_per_sample=12.0 * self.depth * tokens * TEXT_LEN
                    * self.hidden,
                    mfu=None if self.peak is None else round(fl * sps / self.peak, 4),
                    peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None,
                )
                break
            except torch.OutOfMemoryError:
                oom = True
            except Exception as exc:  # noqa: BLE001 - recorded, and the next configuration runs
                entry.update(status=f"error: {_first_line(exc)}", batch=batch_size,
                             traceback=traceback.format_exc(limit=6)[-3000:])
                break
            finally:
                batch = None
                self.free()
            if oom:
                entry.setdefault("oom_batches", []).append(batch_size)
                if batch_size == 1 or attempt == 2:
                    entry.update(status="out of memory", batch=batch_size)
                    break
                batch_size //= 2
        s = entry["status"]
        if s == "ok":
            mfu = "-" if entry["mfu"] is None else f"{100 * entry['mfu']:.1f}%"
            print(f"  {workload['name']}: batch {batch_size}, {entry['step_ms_median']:.1f} ms/step, "
                  f"{entry['samples_per_s']:.2f} samples/s, MFU {mfu}, peak {entry['peak_mem_gib']} GiB, "
                  f"warm-up {entry['warmup_s']:.1f} s", flush=True)
        else:
            print(f"  {workload['name']}: {s}", flush=True)
        self.save()

    def run_numerics(self) -> None:
        """flex vs math forward of the engine's model (its training dtype) on one 256 px batch."""
        torch = self.torch
        workload = WORKLOADS[0]
        n = {"workload": workload["name"], "batch": min(8, workload["batch"])}
        self.result["numerics"] = n
        limit = min(self.a.config_timeout, self.remaining() - 15)
        if limit < 30:
            n["status"] = "skipped: time budget spent"
            self.save()
            return
        model = self.engine.module
        impl = model.attn_impl
        outs = batch = None
        try:
            with time_limit(limit), torch.no_grad():
                batch, _ = self.batch(workload, n["batch"], seed=1)
                dtype = next(model.parameters()).dtype
                g = torch.Generator(device=self.device).manual_seed(2)
                sigmas = torch.rand(n["batch"], generator=g, device=self.device)
                x = batch.latents * (1 - sigmas[:, None, None, None, None]) + sigmas[:, None, None, None, None] * \
                    torch.randn(batch.latents.shape, generator=g, device=self.device)
                states, mask = self.encode_text(batch.prompts)
                args = (x.to(dtype), (sigmas * 1000).to(dtype), states.to(dtype), mask)
                outs = {}
                for name in ("flex", "math"):
                    model.attn_impl = name
                    outs[name] = model(*args).float()
                n.update(status="ok", dtype=str(dtype).replace("torch.", ""),
                         flex_vs_math=rel_err(outs["flex"], outs["math"]),
                         output_rms=float(outs["math"].pow(2).mean().sqrt()))
        except Exception as exc:  # noqa: BLE001
            n.update(status=f"error: {_first_line(exc)}", traceback=traceback.format_exc(limit=6)[-3000:])
        finally:
            model.attn_impl = impl
            outs = batch = None
            self.free()
        if n["status"] == "ok":
            print(f"  numerics ({workload['name']}, batch {n['batch']}, {n['dtype']}): flex vs math rel. err "
                  f"{n['flex_vs_math']:.2e}", flush=True)
        else:
            print(f"  numerics: {n['status']}", flush=True)
        self.save()

    def run_vae_encode(self) -> None:
        """The build's encode stage (pipelines.process.ViewEncoder: bf16 on the GPU, `build.encode.compile`) with a
        16-channel f=8 AutoencoderKL of the SD3/FLUX architecture, random weights (speed does not depend on them):
        images/s of its `encode_posterior` at 256 px."""
        import tempfile

        torch = self.torch
        v = {"px": 256, "batch": VAE_BATCH if self.cuda else 2, "weights": "random (the architecture's speed)"}
        self.result["vae_encode"] = v
        if self.remaining() < 60:
            v["status"] = "skipped: time budget spent"
            self.save()
            return
        try:
            with tempfile.TemporaryDirectory(prefix="gpu-bench-vae-") as folder, \
                    time_limit(min(self.a.config_timeout, self.remaining() - 15)):
                from diffusers import AutoencoderKL

                from onegen.build_config import BuildConfig
                from onegen.config import load_config
                from pipelines.process import ViewEncoder

                channels = (128, 256, 512, 512) if self.cuda else (8, 8, 16, 16)
                AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              block_out_channels=channels, layers_per_block=2 if self.cuda else 1,
                              norm_num_groups=32 if self.cuda else 4).save_pretrained(folder)
                cfg = load_config(None, ["run.name=gpu-bench",
                                         f"build.sources=[{{name: s, type: folder, path: {folder}}}]",
                                         f"build.encode.image_tokenizer={folder}",
                                         f"build.encode.num_gpus={1 if self.cuda else 0}",
                                         f"build.encode.compile={str(self.cuda).lower()}"], BuildConfig)
                encoder = ViewEncoder(cfg)
                g = torch.Generator().manual_seed(0)
                images = (torch.rand(v["batch"], 3, 256, 256, generator=g) * 2 - 1).to(encoder.device)
                with torch.inference_mode():
                    for _ in range(3 if self.cuda else 1):
                        encoder.tokenizer.encode_posterior(images)
                    self.sync()
                    start, steps = time.perf_counter(), 10 if self.cuda else 2
                    for _ in range(steps):
                        encoder.tokenizer.encode_posterior(images)
                    self.sync()
                v.update(status="ok", device=encoder.device, compiled=cfg.build.encode.compile,
                         block_out_channels=list(channels),
                         images_per_s=round(steps * v["batch"] / (time.perf_counter() - start), 1))
                encoder = None
        except Exception as exc:  # noqa: BLE001
            v.update(status=f"error: {_first_line(exc)}", traceback=traceback.format_exc(limit=6)[-3000:])
        finally:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        print(f"  VAE encode stage, 256 px: {v.get('images_per_s', v['status'])} images/s", flush=True)
        self.save()

    def run_all(self) -> dict:
        for index, workload in enumerate(WORKLOADS):
            self.run_train(workload)
            if index == 0:
                self.run_numerics()
        self.run_vae_encode()
        statuses = [r.get("status") for r in self.result["runs"]] + [self.result["vae_encode"].get("status")]
        self.result["status"] = "ok" if all(s == "ok" for s in statuses) else "partial"
        self.save()
        return self.result


# ---------------------------------------------------------------------------------------------------------- report


def markdown(result: dict) -> list[str]:
    lines = ["| workload | batch | tokens/sample | step ms (median) | samples/s | MFU | peak GiB | warm-up s | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if r.get("status") == "ok":
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            note = f"OOM at batch {r['oom_batches']}" if r.get("oom_batches") else ""
            mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
            lines.append(f"| {r['workload']} | {r['batch']} | {r['tokens_per_sample']} | {r['step_ms_median']:.1f} | "
                         f"**{r['samples_per_s']:.2f}** | {mfu} | {mem} | {r['warmup_s']:.1f} | {note} |")
        else:
            status = str(r.get("status")).replace("|", "/")
            lines.append(f"| {r['workload']} | {r.get('batch', r.get('requested_batch', '-'))} | - | - | - | - | - | - "
                         f"| {status} |")
    n = result.get("numerics") or {}
    v = result.get("vae_encode") or {}
    lines.append("")
    if n.get("status") == "ok":
        lines.append(f"Numerics ({n['workload']}, batch {n['batch']}, {n['dtype']} weights): flex vs math attention "
                     f"forward, relative L2 error {n['flex_vs_math']:.2e}.")
    else:
        lines.append(f"Numerics: {n.get('status', 'not run')}.")
    if v.get("status") == "ok":
        lines.append(f"VAE encode stage (pipelines.process.ViewEncoder on {v['device']}, compiled {v['compiled']}, "
                     f"AutoencoderKL {v['block_out_channels']}, {v['weights']} weights): **{v['images_per_s']} "
                     f"images/s** at {v['px']} px, batch {v['batch']}.")
    else:
        lines.append(f"VAE encode stage: {v.get('status', 'not run')}.")
    peak = result.get("peak_bf16_tflops")
    lines.append(f"Step: {result['step']}, {result['precision']}, attention {result['attn_impl']}. MFU: "
                 f"{result['flops_formula']}; P = {result['params']:,}, depth {result['depth']}, hidden "
                 f"{result['hidden']}, against a dense bf16 peak of {peak if peak else 'unknown (--peak-tflops)'} "
                 f"TFLOPS. Floors on one H200 (STACK.md section 7, a bare compiled PyTorch step): 111 samples/s at "
                 "256 px (49.8% MFU), 24.9 at 512 px (45%).")
    return lines


def prepared_section() -> list[str]:
    return [
        f"{SECTION_PREFIX} (prepared)",
        "",
        f"Prepared, not yet run on a GPU ({datetime.date.today().isoformat()}: no device machine was lent to the "
        "sessions that wrote it; its `--dry-run-cpu` path, the same code with nextdit-tiny, runs in the test suite). "
        "On one H100/H200 with deepspeed and diffusers importable (INTERFACES §5: carried as wheels):",
        "",
        f"    {COMMAND}",
        "",
        "It runs the trainer's own step (`training.step.StepRunner` over `training.engine.make_engine`'s DeepSpeed "
        "ZeRO-2 engine, bf16 weights with fp32 masters, plus the EMA update) for `onediffusion-2.8b` (random init) "
        "at text->image 256 px (batch 32), 512 px (batch 8), 2-view image->image 512 px (batch 4) and 1024 px "
        "(batch 2) while its 450 s budget lasts, and reports step time, samples/s, MFU (FLOPs " + FLOPS_FORMULA
        + "), peak memory, the flex-vs-math forward error and the build's VAE encode stage's images/s at 256 px "
        "(bf16, compiled, random weights); JSON written after every configuration. Floors to beat on one H200 "
        "(STACK.md section 7, a bare compiled PyTorch step): 111 samples/s at 256 px (49.8% MFU), 24.9 at 512 px "
        "(45%).",
        "",
    ]


def measured_section(result: dict) -> list[str]:
    return [
        f"{SECTION_PREFIX}",
        "",
        f"`{result['command']}` — {result['device']}, torch {result['torch']} (CUDA {result['cuda']}), deepspeed "
        f"{result['deepspeed']}, {result['date'][:10]}; `{result['preset']}` random init, text length "
        f"{result['text_len']}; {result['warmup_steps']} warm-up steps (compilation included) excluded, median of "
        f"{result['timed_steps']} timed steps; whole run {result['elapsed_s']:.0f} s, status {result['status']}.",
        "",
        *markdown(result),
        "",
    ]


def configure_torch(torch) -> None:
    """fp32 stays fp32 (the numerics reference); one static compile per shape (no dynamic-shape kernels)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    import torch._dynamo

    cfg = torch._dynamo.config
    if hasattr(cfg, "automatic_dynamic_shapes"):
        cfg.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):  # flex: 3 shapes x (train, no-grad bf16, no-grad fp32)
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 32))
            break


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON results file (written after every configuration)")
    p.add_argument("--preset", default="onediffusion-2.8b")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration (compilation included)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    p.add_argument("--config-timeout", type=float, default=180.0, help="limit per configuration (SIGALRM)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card, if not recognised by name")
    p.add_argument("--attn", default="auto", choices=("auto", "flex", "math"),
                   help="model.attn_impl (auto: flex on CUDA, as the trainer runs)")
    p.add_argument("--zero-stage", type=int, default=2, choices=(1, 2, 3), help="train.zero_stage")
    p.add_argument("--activation-checkpointing", action="store_true", help="train.activation_checkpointing")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="leave the EMA update out of the step")
    p.add_argument("--write-results", action="store_true", help="replace the GPU section of bench/RESULTS.md")
    p.add_argument("--write-prepared-section", action="store_true",
                   help="only write the 'prepared, not yet run' section of bench/RESULTS.md")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="the same code on the CPU with nextdit-tiny and tiny batches (no GPU number is claimed)")
    a = p.parse_args(argv)

    if a.write_prepared_section:
        replace_section(SECTION_PREFIX, prepared_section())
        print(f"updated {RESULTS}")
        return 0

    import torch

    if a.dry_run_cpu:
        global WORKLOADS
        a.preset = "nextdit-tiny" if a.preset == "onediffusion-2.8b" else a.preset
        a.warmup, a.steps = min(a.warmup, 1), min(a.steps, 2)
        WORKLOADS = tuple({**w, "px": w["px"] // 4, "batch": 2 if w["views"] == 1 else 1} for w in WORKLOADS)
        device = torch.device("cpu")
        print("dry run on the CPU (nextdit-tiny, fp32, a quarter of the sizes, tiny batches): the code path of the "
              "GPU run; nothing here is a GPU number")
    elif not torch.cuda.is_available():
        hint = ""
        if torch.version.cuda is None and shutil.which("nvidia-smi"):
            hint = f" (torch {torch.__version__} is a CPU build although nvidia-smi exists: install a CUDA torch)"
        print(f"{NO_CUDA}{hint}")
        return 0
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    configure_torch(torch)

    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}"
          f"; budget {a.budget_s:.0f} s", flush=True)
    bench = Bench(a, device, torch)
    print(f"{a.preset}: {bench.params:,} parameters; built in {time.perf_counter() - bench.started:.1f} s", flush=True)
    result = bench.run_all()
    print()
    print("\n".join(markdown(result)))
    if a.out:
        print(f"wrote {a.out}")
    if a.write_results and not a.dry_run_cpu:
        replace_section(SECTION_PREFIX, measured_section(result))
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
