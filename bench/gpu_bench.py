"""Prepared GPU benchmark: OneDiffusion 2.8B NextDiT training step on one H100/H200 (FlexAttention vs math).

    .venv/bin/python bench/gpu_bench.py --out bench/gpu_results.json                  # on a GPU machine, <= ~8 min
    .venv/bin/python bench/gpu_bench.py --out bench/gpu_results.json --write-results  # + "## GPU bench" in RESULTS.md
    .venv/bin/python bench/gpu_bench.py --smoke-cpu --out /tmp/gpu_smoke.json         # plumbing check, nextdit-tiny
    .venv/bin/python bench/gpu_bench.py --write-prepared-section                      # the "not yet run" section

Needs a CUDA build of torch (the repository's CPU lock installs torch+cpu: on a GPU machine install a CUDA torch
first, then `make install CONSTRAINTS=`). Without a CUDA device it prints "no CUDA device: nothing measured" and
exits 0 without writing anything.

What it does (`onediffusion-2.8b`, random init moved off the zero init, fp32 master weights, bf16 autocast, fused
AdamW, text length 256 with padding):
* training steps (`flow_matching_loss` forward + backward + `AdamW(fused=True)` step) for three workloads:
  T2I 256 px (latent 32x32, 256 tokens, batch 32), T2I 512 px (latent 64x64, 1024 tokens, batch 8) and 2-view
  img2img 512 px (view 0 a clean condition, view 1 the target; 2048 tokens, batch 4), each with
  `attn_impl="flex"` (compiled FlexAttention with the softcap 30) and `"math"` (matmul, softcap, softmax, matmul);
  warm-up steps (compilation included) are timed apart and excluded; medians of the timed steps (CUDA events);
* samples/s, tokens/s, peak memory (`torch.cuda.max_memory_allocated`) and MFU against the card's dense bf16 peak,
  with FLOPs per sample (forward + backward) counted as
      6 * P * N + 12 * depth * N^2 * hidden
  P = all parameters (2,800,389,184), N = image tokens per sample (all views), hidden = 3840, depth = 16; the text
  cross-attention (12 * depth * N * L * hidden, L = 256) is left out of the MFU and written to the JSON apart;
* numerics on one 256 px batch: flex vs math forward in bf16 autocast (relative L2 error), each against an fp32
  math forward, and flex vs math in fp32;
* if time is left, `attn_impl="flex"` with every block compiled (`block.compile()`), the set-up of STACK.md's floor.
A batch that runs out of memory is halved (twice at most) and the batch used is recorded. Every configuration runs
under a SIGALRM time limit and the whole run under `--budget-s` (default 450 s); results are written to `--out`
after each configuration, so an interrupted run leaves what it measured.

Floors to beat on one H200 (docs STACK.md section 7, a bare PyTorch 2.8B step): eager SDPA without softcap
76 samples/s at 256 px (34% MFU); compiled FlexAttention with softcap 111 samples/s at 256 px (49.8% MFU), 24.9
samples/s at 512 px.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
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
COMMAND = ".venv/bin/python bench/gpu_bench.py --out bench/gpu_results.json"
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
)
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
    def __init__(self, args, device, torch):
        self.a, self.device, self.torch = args, device, torch
        self.started = time.perf_counter()
        self.cuda = device.type == "cuda"
        from model.flow import FlowConfig, flow_matching_loss
        from model.nextdit import NextDiT

        self.FlowConfig, self.loss_fn = FlowConfig, flow_matching_loss
        torch.manual_seed(0)
        with torch.device(device):
            self.model = NextDiT.from_preset(args.preset)
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():  # off the zero init (adaLN, gates, final layer), so outputs and numerics are real
            for p in self.model.parameters():
                p.add_(torch.randn(p.shape, generator=g, device=device), alpha=0.02)
        self.model.train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=self.cuda)
        self.autocast_device = device.type
        name = torch.cuda.get_device_name(device) if self.cuda else "cpu (smoke test)"
        self.peak = peak_bf16_flops(name, args.peak_tflops)
        self.result = {
            "status": "running",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([".venv/bin/python", "bench/gpu_bench.py", *sys.argv[1:]]),
            "device": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "preset": args.preset,
            "params": self.params,
            "hidden": self.model.hidden_size,
            "depth": len(self.model.layers),
            "text_len": TEXT_LEN,
            "precision": "fp32 master weights + bf16 autocast, AdamW(fused=True)",
            "peak_bf16_tflops": None if self.peak is None else self.peak / 1e12,
            "flops_formula": FLOPS_FORMULA,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "floors_h200": FLOORS_H200,
            "runs": [],
            "numerics": None,
        }

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
        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def batch(self, workload: dict, batch: int, seed: int = 0) -> dict:
        torch, dev = self.torch, self.device
        g = torch.Generator(device=dev).manual_seed(seed)
        lat = workload["px"] // LATENT_FACTOR
        views = workload["views"]
        x0 = torch.randn(batch, views, self.model.in_channels, lat, lat, generator=g, device=dev)
        text = torch.randn(batch, TEXT_LEN, self.model.caption_channels, generator=g, device=dev)
        lengths = torch.randint(TEXT_LEN // 4, TEXT_LEN + 1, (batch,), generator=g, device=dev)
        mask = torch.arange(TEXT_LEN, device=dev)[None] < lengths[:, None]
        target = None if views == 1 else torch.tensor([False] + [True] * (views - 1), device=dev)
        return {"x0": x0, "text": text, "mask": mask, "target": target, "gen": g,
                "tokens": views * (lat // self.model.patch_size[1]) * (lat // self.model.patch_size[2])}

    def train_step(self, b: dict, cfg) -> None:
        torch = self.torch
        with torch.autocast(self.autocast_device, dtype=torch.bfloat16):
            loss, _ = self.loss_fn(self.model, b["x0"], b["text"], b["mask"], b["target"], cfg, b["gen"])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    # -------------------------------------------------------------- measurements

    def run_train(self, workload: dict, impl: str, label: str | None = None) -> None:
        torch = self.torch
        entry = {"workload": workload["name"], "attn_impl": label or impl, "px": workload["px"],
                 "views": workload["views"], "requested_batch": workload["batch"]}
        self.result["runs"].append(entry)
        limit = min(self.a.config_timeout, self.remaining() - 15)
        if limit < 30:
            entry["status"] = "skipped: time budget spent"
            print(f"  {workload['name']} {entry['attn_impl']}: {entry['status']}", flush=True)
            self.save()
            return
        self.model.attn_impl = impl
        views = workload["views"]
        cfg = self.FlowConfig(clean_condition_prob=1.0 if views > 1 else 0.0,
                              loss_on="targets" if views > 1 else "all")
        batch = workload["batch"]
        t_start = time.perf_counter()
        for attempt in range(3):
            oom = False
            try:
                with time_limit(limit - (time.perf_counter() - t_start)):
                    if self.cuda:
                        torch.cuda.reset_peak_memory_stats()
                    b = self.batch(workload, batch)
                    self.sync()
                    t0 = time.perf_counter()
                    for _ in range(self.a.warmup):
                        self.train_step(b, cfg)
                    self.sync()
                    warm_s = time.perf_counter() - t0
                    times = []
                    for _ in range(self.a.steps):
                        if self.cuda:
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            self.train_step(b, cfg)
                            end.record()
                            end.synchronize()
                            times.append(start.elapsed_time(end) / 1e3)
                        else:
                            t1 = time.perf_counter()
                            self.train_step(b, cfg)
                            times.append(time.perf_counter() - t1)
                step_s = statistics.median(times)
                fl = flops_per_sample(self.params, b["tokens"], self.result["depth"], self.result["hidden"])
                sps = batch / step_s
                entry.update(
                    status="ok", batch=batch, tokens_per_sample=b["tokens"], warmup_s=round(warm_s, 2),
                    step_ms_median=round(step_s * 1e3, 2), step_ms_all=[round(t * 1e3, 2) for t in times],
                    samples_per_s=round(sps, 2), tokens_per_s=round(sps * b["tokens"]),
                    flops_per_sample=fl, text_attn_flops_per_sample=12.0 * self.result["depth"] * b["tokens"]
                    * TEXT_LEN * self.result["hidden"],
                    mfu=None if self.peak is None else round(fl * sps / self.peak, 4),
                    peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None,
                )
                break
            except torch.OutOfMemoryError:
                oom = True
            except Exception as exc:  # noqa: BLE001 - recorded, and the next configuration runs
                entry.update(status=f"error: {_first_line(exc)}", batch=batch,
                             traceback=traceback.format_exc(limit=6)[-3000:])
                break
            finally:
                b = None
                self.free()
            if oom:
                entry.setdefault("oom_batches", []).append(batch)
                if batch == 1 or attempt == 2:
                    entry.update(status="out of memory", batch=batch)
                    break
                batch //= 2
        s = entry["status"]
        if s == "ok":
            mfu = "-" if entry["mfu"] is None else f"{100 * entry['mfu']:.1f}%"
            print(f"  {workload['name']} {entry['attn_impl']}: batch {batch}, {entry['step_ms_median']:.1f} ms/step, "
                  f"{entry['samples_per_s']:.2f} samples/s, MFU {mfu}, peak {entry['peak_mem_gib']} GiB, "
                  f"warm-up {entry['warmup_s']:.1f} s", flush=True)
        else:
            print(f"  {workload['name']} {entry['attn_impl']}: {s}", flush=True)
        self.save()

    def run_numerics(self) -> None:
        torch = self.torch
        workload = WORKLOADS[0]
        n = {"workload": workload["name"], "batch": min(8, workload["batch"])}
        self.result["numerics"] = n
        limit = min(self.a.config_timeout, self.remaining() - 15)
        if limit < 30:
            n["status"] = "skipped: time budget spent"
            self.save()
            return
        try:
            with time_limit(limit), torch.no_grad():
                b = self.batch(workload, n["batch"], seed=1)
                sigmas = torch.rand(n["batch"], generator=b["gen"], device=self.device)
                x = (1 - sigmas[:, None, None, None, None]) * b["x0"] + sigmas[:, None, None, None, None] * \
                    torch.randn(b["x0"].shape, generator=b["gen"], device=self.device)
                args = (x, sigmas * 1000, b["text"], b["mask"])
                outs = {}
                for impl in ("flex", "math"):
                    self.model.attn_impl = impl
                    with torch.autocast(self.autocast_device, dtype=torch.bfloat16):
                        outs[f"{impl}_bf16"] = self.model(*args).float()
                    outs[f"{impl}_fp32"] = self.model(*args).float()
                n.update(
                    status="ok",
                    flex_vs_math_bf16=rel_err(outs["flex_bf16"], outs["math_bf16"]),
                    flex_bf16_vs_math_fp32=rel_err(outs["flex_bf16"], outs["math_fp32"]),
                    math_bf16_vs_math_fp32=rel_err(outs["math_bf16"], outs["math_fp32"]),
                    flex_vs_math_fp32=rel_err(outs["flex_fp32"], outs["math_fp32"]),
                    output_rms=float(outs["math_fp32"].pow(2).mean().sqrt()),
                )
        except Exception as exc:  # noqa: BLE001
            n.update(status=f"error: {_first_line(exc)}", traceback=traceback.format_exc(limit=6)[-3000:])
        finally:
            outs = b = None
            self.free()
        if n["status"] == "ok":
            print(f"  numerics ({workload['name']}, batch {n['batch']}): flex vs math rel. err bf16 "
                  f"{n['flex_vs_math_bf16']:.2e}, fp32 {n['flex_vs_math_fp32']:.2e}; vs fp32 math: flex bf16 "
                  f"{n['flex_bf16_vs_math_fp32']:.2e}, math bf16 {n['math_bf16_vs_math_fp32']:.2e}", flush=True)
        else:
            print(f"  numerics: {n['status']}", flush=True)
        self.save()

    def run_all(self) -> dict:
        w256, w512, wi2i = WORKLOADS
        self.run_train(w256, "flex")
        self.run_train(w256, "math")
        self.run_numerics()
        for workload in (w512, wi2i):
            self.run_train(workload, "flex")
            self.run_train(workload, "math")
        if self.cuda and not self.a.no_compile_blocks:
            if self.remaining() >= 150:
                self.model.attn_impl = "flex"
                for block in self.model.layers:
                    block.compile()
                self.run_train(w256, "flex", label="flex+compiled blocks")
            else:
                self.result["runs"].append({"workload": w256["name"], "attn_impl": "flex+compiled blocks",
                                            "status": "skipped: under 150 s of budget left"})
        statuses = [r.get("status") for r in self.result["runs"]]
        self.result["status"] = "ok" if all(s == "ok" for s in statuses) else "partial"
        self.save()
        return self.result


# ---------------------------------------------------------------------------------------------------------- report


def markdown(result: dict) -> list[str]:
    lines = ["| workload | attention | batch | tokens/sample | step ms (median) | samples/s | MFU | peak GiB | "
             "warm-up s | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if r.get("status") == "ok":
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            note = f"OOM at batch {r['oom_batches']}" if r.get("oom_batches") else ""
            mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
            lines.append(f"| {r['workload']} | {r['attn_impl']} | {r['batch']} | {r['tokens_per_sample']} | "
                         f"{r['step_ms_median']:.1f} | **{r['samples_per_s']:.2f}** | {mfu} | {mem} | "
                         f"{r['warmup_s']:.1f} | {note} |")
        else:
            status = str(r.get("status")).replace("|", "/")
            lines.append(f"| {r['workload']} | {r['attn_impl']} | {r.get('batch', r.get('requested_batch', '-'))} |"
                         f" - | - | - | - | - | - | {status} |")
    n = result.get("numerics") or {}
    lines.append("")
    if n.get("status") == "ok":
        lines.append(f"Numerics ({n['workload']}, batch {n['batch']}, relative L2 error of the forward): flex vs math "
                     f"{n['flex_vs_math_bf16']:.2e} in bf16 autocast, {n['flex_vs_math_fp32']:.2e} in fp32; against "
                     f"the fp32 math forward: flex bf16 {n['flex_bf16_vs_math_fp32']:.2e}, math bf16 "
                     f"{n['math_bf16_vs_math_fp32']:.2e}.")
    else:
        lines.append(f"Numerics: {n.get('status', 'not run')}.")
    peak = result.get("peak_bf16_tflops")
    lines.append(f"MFU: {result['flops_formula']}; P = {result['params']:,}, depth {result['depth']}, hidden "
                 f"{result['hidden']}, against a dense bf16 peak of {peak if peak else 'unknown (--peak-tflops)'} "
                 f"TFLOPS. Floors on one H200 (STACK.md section 7): eager SDPA without softcap 76 samples/s at 256 px "
                 f"(34% MFU); compiled FlexAttention softcap 111 samples/s at 256 px (49.8%), 24.9 at 512 px.")
    return lines


def prepared_section() -> list[str]:
    return [
        f"{SECTION_PREFIX} (prepared)",
        "",
        f"Prepared, not yet run: no GPU in the session that wrote `bench/gpu_bench.py` "
        f"({datetime.date.today().isoformat()}; only its CPU path, \"{NO_CUDA}\", and a `--smoke-cpu` run with "
        f"nextdit-tiny were checked). On one H100/H200, with a CUDA build of torch in .venv:",
        "",
        f"    {COMMAND}                   # add --write-results to replace this section with the table",
        "",
        "It trains `onediffusion-2.8b` (random init, fp32 master weights + bf16 autocast, fused AdamW, text length "
        f"{TEXT_LEN}) at T2I 256 px (batch 32), T2I 512 px (batch 8) and 2-view img2img 512 px (batch 4), "
        "`attn_impl=\"flex\"` (compiled FlexAttention, softcap 30) vs `\"math\"`, then flex with compiled blocks if "
        "time is left; reports step time, samples/s, MFU (FLOPs " + FLOPS_FORMULA + "), peak memory and flex-vs-math "
        "forward errors, within a 450 s budget (JSON written after every configuration). Floors to beat on one "
        "H200 (STACK.md section 7): 76 samples/s at 256 px eager SDPA without softcap (34% MFU); 111 samples/s at "
        "256 px (49.8% MFU) and 24.9 at 512 px with compiled FlexAttention softcap.",
        "",
    ]


def measured_section(result: dict) -> list[str]:
    return [
        f"{SECTION_PREFIX}",
        "",
        f"`{result['command']}` — {result['device']}, torch {result['torch']} (CUDA {result['cuda']}), "
        f"{result['date'][:10]}; `{result['preset']}` random init, {result['precision']}, text length "
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
    p.add_argument("--no-compile-blocks", action="store_true", help="skip the flex + compiled blocks run")
    p.add_argument("--write-results", action="store_true", help="replace the GPU section of bench/RESULTS.md")
    p.add_argument("--write-prepared-section", action="store_true",
                   help="only write the 'prepared, not yet run' section of bench/RESULTS.md")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="run the whole flow on the CPU with nextdit-tiny and tiny batches (checks the plumbing)")
    a = p.parse_args(argv)

    if a.write_prepared_section:
        replace_section(SECTION_PREFIX, prepared_section())
        print(f"updated {RESULTS}")
        return 0

    import torch

    if a.smoke_cpu:
        global WORKLOADS
        a.preset = "nextdit-tiny" if a.preset == "onediffusion-2.8b" else a.preset
        a.warmup, a.steps = min(a.warmup, 1), min(a.steps, 2)
        WORKLOADS = tuple({**w, "batch": 2 if w["views"] == 1 else 1} for w in WORKLOADS)
        device = torch.device("cpu")
        print("smoke test on the CPU (nextdit-tiny, tiny batches): FlexAttention has no CPU backward, so the flex "
              "training rows are expected to fail; nothing here is a GPU number")
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
    if a.write_results and not a.smoke_cpu:
        replace_section(SECTION_PREFIX, measured_section(result))
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
