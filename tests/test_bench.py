"""bench/gpu_bench.py's dry run: the GPU benchmark's own code (the trainer's step over a DeepSpeed engine, the EMA,
the build's VAE encode stage) on the CPU with nextdit-tiny, so the script that runs on a lent GPU is known to work
before the GPU minutes are spent. No GPU number is claimed or written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run_goes_through_the_trainer_step(tmp_path):
    out = tmp_path / "gpu.json"
    results = REPO / "bench" / "RESULTS.md"
    before = results.read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "bench/gpu_bench.py", "--dry-run-cpu", "--out", str(out),
                           "--write-results"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "nothing here is a GPU number" in proc.stdout
    result = json.loads(out.read_text())
    assert result["device"] == "cpu (dry run)" and result["preset"] == "nextdit-tiny"
    assert result["step"] == "training.step.StepRunner.step + EmaWeights.step"
    assert [run["workload"] for run in result["runs"]] == ["t2i-256", "t2i-512", "i2i-512-2view", "t2i-1024"]
    for run in result["runs"]:
        assert run["status"] == "ok", run
        assert run["mfu"] is None and run["peak_mem_gib"] is None  # no peak known for a CPU: no MFU claimed
        assert all(math.isfinite(x) and x > 0 for x in run["losses"]), run["losses"]
        assert run["lr"] > 0 and math.isfinite(run["grad_norm"])  # the engine's schedule and clipping ran
        assert run["tokens_per_sample"] == run["views"] * (run["px"] // 8 // 2) ** 2
    assert result["numerics"]["status"] == "ok" and result["numerics"]["flex_vs_math"] < 1e-4
    vae = result["vae_encode"]
    assert vae["status"] == "ok" and vae["device"] == "cpu" and vae["images_per_s"] > 0
    assert results.read_text() == before  # a dry run never writes RESULTS.md
