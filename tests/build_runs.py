"""Running `onegen build` as a user does (`python -m pipelines.build` in a subprocess, joined to the session's Ray
head from tests/conftest.py) and reading what it committed. Shared by the build tests and the shared synthetic
build fixture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from onegen.shards import read_entries, read_manifest
from onegen.storage import Storage

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 300


def write_config(path: Path, root: Path, sources: list[dict], **build) -> Path:
    config = {"run": {"name": "t", "work_dir": str(root / "work"), "seed": 0},
              "storage": {"root": str(root / "data")},
              "build": {"name": "b", "sources": sources, **build}}
    path.write_text(yaml.safe_dump(config))
    return path


def build_command(config: Path, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "pipelines.build", "--config", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def build_env(ray_head, extra_env: dict | None = None) -> dict:
    return dict(ray_head["env"], RAY_ADDRESS=ray_head["gcs"], **(extra_env or {}))


def run_build(ray_head, config: Path, *overrides: str, extra_env: dict | None = None,
              timeout: float = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(build_command(config, *overrides), cwd=REPO, env=build_env(ray_head, extra_env),
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result


def pixel_latent_picture(mean):
    """A pixel-tokenizer latent mean (C, h, w; numpy or torch) back to the (H, W, 3) uint8 picture it encodes. No
    clamping: an exact latent decodes into [-1, 1], anything else shows up as a mismatch."""
    import numpy as np
    import torch

    from model.tokenizers import PixelTokenizer

    mean = torch.as_tensor(np.array(mean, copy=True))
    decoded = PixelTokenizer().decode(mean[None])[0]
    return ((decoded + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def manifest_view(storage: Storage, name: str = "b") -> tuple[dict, dict]:
    """What two builds must agree on: the final manifest, and per shard its ids and file digests."""
    manifest = read_manifest(storage, name)
    entries = read_entries(storage, name)
    return manifest, {shard: (e["ids"], e["files"]["images"]["sha256"], e["files"]["latents"]["sha256"])
                      for shard, e in entries.items()}
