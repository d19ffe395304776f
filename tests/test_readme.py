"""README's examples run as written: the Commands block line by line, and the Python snippet on a model saved the way
`make demo` saves its own (nextdit-tiny, pixel tokenizer, tiny T5, release layout)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def fenced_block(after: str, language: str) -> str:
    """The first ```language block after the heading or text `after`."""
    return README.split(after, 1)[1].split(f"```{language}\n", 1)[1].split("```", 1)[0]


def command_lines() -> list[list[str]]:
    lines = [line.split("  #", 1)[0].strip() for line in fenced_block("## Commands", "bash").splitlines()]
    return [shlex.split(line) for line in lines if line]


def test_the_commands_block_runs_as_written(tmp_path: Path):
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the block runs from a checkout: configs/ relative
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ran = []
    for argv in command_lines():
        assert argv[0] == ".venv/bin/onegen", argv
        argv = [str(Path(sys.executable).with_name("onegen")), *argv[1:]]
        if argv[1] == "demo":  # run at a smaller scale by tests/test_demo.py; here: its arguments are valid
            argv = [argv[0], "config", "check", "configs/demo.yaml", *argv[2:]]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (argv, result.stderr[-2000:])
        ran.append(argv[1])
    assert ran == ["--help", "env", "config", "synth", "synth", "config"]
    assert len(list((tmp_path / "work" / "synth").glob("*.tar"))) == 1  # 100 scenes, 100 per shard
    assert Image.open(tmp_path / "work" / "sheet.png").size[0] > 0


@pytest.fixture(scope="module")
def demo_like_pipeline(tmp_path_factory) -> Path:
    """A pipeline folder as `onegen demo` writes it: nextdit-tiny (untrained), pixel tokenizer, tiny T5."""
    from model.nextdit import NextDiT
    from model.pipeline import OneDiffusionPipeline
    from model.tokenizers import PixelTokenizer, T5TextEncoder, build_tiny_t5

    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    model = NextDiT.from_preset("nextdit-tiny")
    text = T5TextEncoder.from_pretrained(build_tiny_t5(root / "text", d_model=model.config.caption_channels))
    return OneDiffusionPipeline(model, PixelTokenizer(), text).save_pretrained(root / "pipeline")


def test_the_python_snippet_runs_and_its_comments_are_true(demo_like_pipeline: Path):
    snippet = fenced_block("## The model", "python")
    assert snippet.count('"work/demo/pipeline"') == 1
    scope: dict = {}
    exec(compile(snippet.replace('"work/demo/pipeline"', repr(str(demo_like_pipeline))), "README.md", "exec"), scope)
    out, est, picture, depth = scope["out"], scope["est"], scope["picture"], scope["depth"]
    assert isinstance(picture, Image.Image) and picture.mode == "RGB" and picture.size == (32, 32)
    assert out.seed == 0
    assert out.latents.shape == torch.Size([1, 1, 16, 16, 16]) and out.latents.dtype == torch.float32
    assert isinstance(depth, np.ndarray) and depth.dtype == np.float32 and depth.shape == (32, 32)
    assert 0 <= depth.min() and depth.max() <= 1 and len(est.depth) == 1
    assert isinstance(est.images[0], Image.Image) and est.images[0].mode == "RGB"
    again = scope["pipe"]("text2image", "a red sphere and a blue cube on grey ground", **scope["settings"])
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(picture))  # "bit for bit"
    as_np = scope["pipe"]("text2image", "x", output_type="np", **scope["settings"]).images[0]
    assert as_np.dtype == np.float32 and as_np.shape == (32, 32, 3) and 0 <= as_np.min() and as_np.max() <= 1
