"""NextDiT denoiser on the CPU: ratios measured side by side in one process (interleaved A, B, A, B; medians).

    .venv/bin/python bench/bench_nextdit.py --threads 1                  # print only
    .venv/bin/python bench/bench_nextdit.py --threads 1 --write-results  # also rewrite "## NextDiT (CPU)" in RESULTS.md

For `nextdit-small` and `nextdit-tiny` at B=2 samples x T=2 views, 16x16 and 32x32 latents (2x64 and 2x256 tokens
per sample), text length 32 with padding (valid lengths 23 and 9), weights perturbed away from the zero init so every
branch computes something:

(a) forward of the fast path (`attn_impl="math"`, fp32, no grad) vs the plain float64 `reference_forward`;
(b) fast-path forward with per-element timesteps constant within each view (detected: adaLN once per view) vs
    per-element timesteps that vary within a view (adaLN once per token); both pass (B, T, 1, h, w) timesteps;
(c) a training step (`flow_matching_loss` forward + backward + AdamW step) in fp32 vs under bf16 autocast; the bf16
    step at nextdit-small 32x32 takes ~12 s on an AVX2 CPU and is skipped unless `--full`;
(d) `torch.compile(model)` forward vs eager (nextdit-small, 32x32, fp32, no grad), in a child process that is killed
    if compiling takes over `--compile-timeout` seconds (default 60); the ratio is still measured side by side there.

Each pair of callables is warmed up once, then timed alternately; the number of repetitions adapts to the cost of
one pair (at least 3). Reported: the median time of each side and the median of the per-repetition ratios.
Also prints the parameter count of every preset (onediffusion-2.8b built on the meta device).
"""

from __future__ import annotations

import os
import sys


def _early_threads(argv: list[str]) -> str:
    """The thread count must be in the environment before torch creates its pools."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return os.environ.get("OMP_NUM_THREADS", "1")


os.environ["OMP_NUM_THREADS"] = _early_threads(sys.argv[1:])

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the float64 reference is test code

import torch  # noqa: E402

from bench.results_file import RESULTS, cpu_name, replace_section  # noqa: E402
from model.flow import FlowConfig, flow_matching_loss  # noqa: E402
from model.nextdit import NextDiT  # noqa: E402
from model.presets import PRESETS  # noqa: E402
from reference_nextdit import reference_forward  # noqa: E402

SECTION = "## NextDiT (CPU)"
BATCH, VIEWS, TEXT_LEN, TEXT_VALID = 2, 2, 32, (23, 9)
PRESET_NAMES = ("nextdit-small", "nextdit-tiny")
LATENTS = (16, 32)


# ---------------------------------------------------------------------------------------------------------- timing


def interleaved(a: Callable, b: Callable, target_s: float = 4.0, min_reps: int = 3, max_reps: int = 15) -> dict:
    """Warm both up, then time A, B, A, B, ...; repetitions chosen so the timed part takes about `target_s`."""
    t0 = time.perf_counter()
    a()
    b()
    pair = time.perf_counter() - t0
    reps = max(min_reps, min(max_reps, int(target_s / max(pair, 1e-6))))
    ta, tb = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return {"a_s": statistics.median(ta), "b_s": statistics.median(tb),
            "b_over_a": statistics.median(y / x for x, y in zip(ta, tb)), "reps": reps}


def single(fn: Callable, target_s: float = 3.0, min_reps: int = 3, max_reps: int = 15) -> dict:
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    reps = max(min_reps, min(max_reps, int(target_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"a_s": statistics.median(times), "reps": reps}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------- setup


def build(name: str, seed: int = 0) -> NextDiT:
    """A preset with the fast CPU path and weights moved off the zero init (so adaLN, gates and output are live)."""
    torch.manual_seed(seed)
    model = NextDiT.from_preset(name, attn_impl="math")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.05)
    return model


def inputs(model: NextDiT, size: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, VIEWS, model.in_channels, size, size, generator=g)
    text = torch.randn(BATCH, TEXT_LEN, model.caption_channels, generator=g)
    mask = torch.zeros(BATCH, TEXT_LEN, dtype=torch.bool)
    for i, n in enumerate(TEXT_VALID):
        mask[i, :n] = True
    per_view = torch.rand(BATCH, VIEWS, generator=g) * 1000
    t_view = per_view[:, :, None, None, None].expand(BATCH, VIEWS, 1, size, size).contiguous()  # const per view
    t_token = torch.rand(BATCH, VIEWS, 1, size, size, generator=g) * 1000  # varies within each view
    return {"x": x, "text": text, "mask": mask, "t_view": t_view, "t_token": t_token}


def param_counts() -> list[dict]:
    rows = []
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            model = NextDiT.from_preset(name)
        rows.append({"preset": name, "params": sum(p.numel() for p in model.parameters()),
                     "hidden": cfg["hidden_size"], "depth": cfg["depth"], "heads": cfg["num_heads"],
                     "kv_heads": cfg["num_kv_heads"]})
    return rows


# ------------------------------------------------------------------------------------------------------- measurements


def measure_case(name: str, size: int, full: bool) -> dict:
    model = build(name)
    d = inputs(model, size)
    x, text, mask, t_view, t_token = d["x"], d["text"], d["mask"], d["t_view"], d["t_token"]
    tokens = VIEWS * (size // 2) ** 2
    out: dict = {"preset": name, "latent": size, "tokens_per_sample": tokens}

    with torch.no_grad():
        fast_out = model(x, t_view, text, mask)
        ref_out = reference_forward(model, x, t_view, text, mask)
        out["fast_vs_reference_rel_err"] = rel_err(fast_out, ref_out)
        token_out = model(x, t_token, text, mask)
        out["per_token_vs_reference_rel_err"] = rel_err(token_out, reference_forward(model, x, t_token, text, mask))

        # (a) fast fp32 vs float64 reference
        r = interleaved(lambda: model(x, t_view, text, mask), lambda: reference_forward(model, x, t_view, text, mask))
        out.update(fwd_fast_s=r["a_s"], fwd_ref_s=r["b_s"], ref_over_fast=r["b_over_a"], reps_a=r["reps"])
        # (b) per-view adaLN vs per-token adaLN
        r = interleaved(lambda: model(x, t_view, text, mask), lambda: model(x, t_token, text, mask))
        out.update(fwd_per_view_s=r["a_s"], fwd_per_token_s=r["b_s"], per_token_over_per_view=r["b_over_a"],
                   reps_b=r["reps"])

    # (c) training step fp32 vs bf16 autocast (one model and optimizer: the weights' values do not change the cost)
    train_model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(2)
    cfg = FlowConfig()

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = flow_matching_loss(train_model, x, text, mask, cfg=cfg, generator=gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    skip_bf16 = name == "nextdit-small" and size >= 32 and not full
    if skip_bf16:
        r = single(lambda: step(False))
        out.update(train_fp32_s=r["a_s"], train_bf16_s=None, bf16_over_fp32=None, reps_c=r["reps"])
    else:
        r = interleaved(lambda: step(False), lambda: step(True), target_s=5.0)
        out.update(train_fp32_s=r["a_s"], train_bf16_s=r["b_s"], bf16_over_fp32=r["b_over_a"], reps_c=r["reps"])
    out["samples_per_s_fp32"] = BATCH / out["train_fp32_s"]
    out["samples_per_s_bf16"] = BATCH / out["train_bf16_s"] if out["train_bf16_s"] else None
    return out


def compile_child(threads: int) -> int:
    """(d), run in a child process: prints {"event": "compiled", ...} after the first call, then the result."""
    torch.set_num_threads(threads)
    name, size = "nextdit-small", 32
    model = build(name).eval()
    d = inputs(model, size)
    args = (d["x"], d["t_view"], d["text"], d["mask"])
    compiled = torch.compile(model)
    print(json.dumps({"event": "ready"}), flush=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        got = compiled(*args)
        compile_s = time.perf_counter() - t0
        print(json.dumps({"event": "compiled", "compile_s": compile_s}), flush=True)
        err = rel_err(got, model(*args))
        r = interleaved(lambda: model(*args), lambda: compiled(*args))
    print(json.dumps({"event": "result", "preset": name, "latent": size, "compile_s": compile_s,
                      "eager_s": r["a_s"], "compiled_s": r["b_s"], "compiled_over_eager": r["b_over_a"],
                      "reps": r["reps"], "rel_err": err}), flush=True)
    return 0


def _inductor_cache_warm() -> bool:
    """Whether inductor's on-disk cache already holds entries (then a re-run compiles in seconds, not a minute)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        root = Path(cache_dir())
        return root.is_dir() and any(root.iterdir())
    except Exception:  # noqa: BLE001 - private API; unknown is reported as cold
        return False


def measure_compile(threads: int, timeout_s: float) -> dict:
    """Run `compile_child` in its own process group; kill that group if compiling exceeds `timeout_s`."""
    warm = _inductor_cache_warm()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_compile-child", "--threads", str(threads)]
    stderr = tempfile.TemporaryFile(mode="w+")  # a pipe could fill up with compiler warnings and block the child
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.perf_counter() + 60.0  # imports and model construction
    stage = "start-up"
    result = None
    try:
        while result is None:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not sel.select(timeout=remaining):
                limit = f" within {timeout_s:.0f} s" if stage == "compile" else ""
                cache = "warm" if warm else "cold"
                return {"skipped": f"{stage} did not finish{limit} (killed; inductor cache {cache})"}
            line = proc.stdout.readline()
            if not line:  # child exited
                break
            msg = json.loads(line) if line.startswith("{") else {}
            if msg.get("event") == "ready":
                stage, deadline = "compile", time.perf_counter() + timeout_s
            elif msg.get("event") == "compiled":
                stage, deadline = "timed calls", time.perf_counter() + 90.0
            elif msg.get("event") == "result":
                result = msg
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own group (inductor compile workers included)
            except ProcessLookupError:
                pass
        proc.wait()
        sel.close()
        stderr.seek(0)
        err_tail = stderr.read().strip().splitlines()[-3:]
        stderr.close()
    if result is None:
        return {"skipped": "torch.compile failed: " + " | ".join(err_tail)}
    return {**result, "cache_warm": warm}


# ---------------------------------------------------------------------------------------------------------- report


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f} ms"


def table(rows: list[dict], comp: dict) -> list[str]:
    lines = ["| preset | latent (tokens/sample) | A vs B | A | B | B/A |", "|---|---|---|---|---|---|"]
    for r in rows:
        where = f"{r['preset']} | {r['latent']}x{r['latent']} ({r['tokens_per_sample']})"
        lines.append(f"| {where} | (a) fwd: fast fp32 vs float64 `reference_forward` | {_ms(r['fwd_fast_s'])} | "
                     f"{_ms(r['fwd_ref_s'])} | **{r['ref_over_fast']:.2f}** |")
        lines.append(f"| {where} | (b) fwd: adaLN per view vs per token | {_ms(r['fwd_per_view_s'])} | "
                     f"{_ms(r['fwd_per_token_s'])} | **{r['per_token_over_per_view']:.2f}** |")
        if r["train_bf16_s"] is None:
            bf16, ratio = "skipped (~12 s/step; `--full`)", "-"
        else:
            bf16 = f"{_ms(r['train_bf16_s'])} ({r['samples_per_s_bf16']:.2f} samples/s)"
            ratio = f"**{r['bf16_over_fp32']:.2f}**"
        lines.append(f"| {where} | (c) train step: fp32 vs bf16 autocast | {_ms(r['train_fp32_s'])} "
                     f"({r['samples_per_s_fp32']:.2f} samples/s) | {bf16} | {ratio} |")
    if "skipped" in comp:
        lines.append(f"| nextdit-small | 32x32 (512) | (d) fwd: eager vs `torch.compile` | - | "
                     f"skipped: {comp['skipped']} | - |")
    else:
        lines.append(f"| {comp['preset']} | {comp['latent']}x{comp['latent']} ({VIEWS * (comp['latent'] // 2) ** 2})"
                     f" | (d) fwd: eager vs `torch.compile` (first call {comp['compile_s']:.0f} s, inductor cache "
                     f"{'warm' if comp['cache_warm'] else 'cold'}) | "
                     f"{_ms(comp['eager_s'])} | {_ms(comp['compiled_s'])} | **{comp['compiled_over_eager']:.2f}** |")
    return lines


def reading(rows: list[dict], comp: dict) -> str:
    ref = [r["ref_over_fast"] for r in rows]
    tok = [r["per_token_over_per_view"] for r in rows]
    bf = [r["bf16_over_fp32"] for r in rows if r["bf16_over_fp32"] is not None]
    parts = [f"the fast path is {min(ref):.1f}-{max(ref):.1f}x faster than the float64 reference",
             f"per-token adaLN costs {min(tok):.2f}-{max(tok):.2f}x the per-view forward"]
    if bf:
        parts.append(f"bf16 autocast makes a CPU training step {min(bf):.1f}-{max(bf):.1f}x slower than fp32 "
                     f"(no native bf16 matmul on this CPU: train in fp32 here)")
    if "skipped" in comp:
        parts.append("torch.compile skipped")
    else:
        c = comp["compiled_over_eager"]
        cache = "warm" if comp["cache_warm"] else "cold"
        parts.append(f"torch.compile takes {c:.2f}x the eager forward time ({1 / c:.2f}x speed-up) after a "
                     f"{comp['compile_s']:.0f} s first call ({cache} inductor cache)")
    return "Reading: " + "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]), help="torch threads (1)")
    p.add_argument("--write-results", action="store_true", help=f"replace '{SECTION}' in bench/RESULTS.md")
    p.add_argument("--full", action="store_true", help="also time the bf16 step at nextdit-small 32x32 (~1 min)")
    p.add_argument("--no-compile", action="store_true", help="skip (d), the torch.compile comparison")
    p.add_argument("--compile-timeout", type=float, default=60.0, help="seconds allowed for compiling in (d)")
    p.add_argument("--_compile-child", dest="compile_child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.compile_child:
        return compile_child(a.threads)
    torch.set_num_threads(a.threads)
    started = time.perf_counter()

    counts = param_counts()
    print("| preset | parameters | hidden | depth | heads / kv heads |\n|---|---|---|---|---|")
    for c in counts:
        print(f"| {c['preset']} | {c['params']:,} | {c['hidden']} | {c['depth']} | {c['heads']} / {c['kv_heads']} |")
    print()

    rows = []
    for name in PRESET_NAMES:
        for size in LATENTS:
            rows.append(measure_case(name, size, a.full))
            r = rows[-1]
            print(f"  {name} {size}x{size}: fast vs reference rel. err {r['fast_vs_reference_rel_err']:.1e} "
                  f"(per-token {r['per_token_vs_reference_rel_err']:.1e})", flush=True)
    comp = {"skipped": "--no-compile"} if a.no_compile else measure_compile(a.threads, a.compile_timeout)
    if "rel_err" in comp:
        print(f"  torch.compile vs eager rel. err {comp['rel_err']:.1e}")
    elapsed = time.perf_counter() - started

    lines = table(rows, comp)
    read = reading(rows, comp)
    print()
    print("\n".join(lines))
    print()
    print(read)
    print(f"(wall {elapsed:.0f} s)")

    if a.write_results:
        errs = [r["fast_vs_reference_rel_err"] for r in rows]
        section = [
            SECTION,
            "",
            f"`.venv/bin/python bench/bench_nextdit.py --threads {a.threads} --write-results` — {cpu_name()}, "
            f"{a.threads} thread(s), torch {torch.__version__}, {datetime.date.today().isoformat()}; 1-min load "
            f"average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (shared machine: absolute times vary, the "
            f"ratios are measured side by side, A and B interleaved, medians). B={BATCH} samples x T={VIEWS} views, "
            f"text length {TEXT_LEN} (valid {TEXT_VALID[0]} and {TEXT_VALID[1]}), weights perturbed off the zero "
            f"init; fast path = `attn_impl=\"math\"`, fp32, no grad; train step = `flow_matching_loss` forward + "
            f"backward + AdamW; fast vs float64 reference rel. err {min(errs):.0e}-{max(errs):.0e}. Whole run "
            f"{elapsed:.0f} s.",
            "",
            *lines,
            "",
            read,
            "",
            "| preset | parameters |",
            "|---|---|",
            *[f"| {c['preset']} | {c['params']:,} |" for c in counts],
            "",
        ]
        replace_section(SECTION, section)
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
