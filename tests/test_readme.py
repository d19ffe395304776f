"""README's examples run as written: the Commands block line by line, and the Python snippet on a model saved the way
`make demo` saves its own (nextdit-tiny, pixel tokenizer, tiny T5, release layout)."""

from __future__ import annotations

import json
import os
import re
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


CLUSTER_EXAMPLE = re.compile(r"`(ray job submit --address http://HEAD:8265 --working-dir \. -- python -m onegen demo [^`]*)`")
# The demo's own tiny scale (tests/test_demo.py): the example's chain, minutes shorter.
TINY = ["train.steps=60", "demo.scenes=3", "demo.scenes_per_shard=1", "demo.sample_steps=2", "demo.eval_samples=1"]


@pytest.mark.integration
def test_the_cluster_example_runs_against_local_stand_ins(ray_head, mlflow_server, moto_endpoint, aws_env,
                                                          make_bucket, tmp_path: Path):
    """README's `ray job submit ... python -m onegen demo --set storage.root=s3://... --set tracking.uri=http://...`
    with the cluster, S3 and MLflow server replaced by the session's Ray head, moto and mlflow server."""
    import boto3
    from mlflow.tracking import MlflowClient

    from conftest import AWS_TEST_ENV, VENV_BIN
    from onegen.config import load_config
    from onegen.raycluster import job_runtime_env

    [example] = CLUSTER_EXAMPLE.findall(" ".join(README.split()))
    bucket = make_bucket()
    work = tmp_path / "onegen"
    command = (example.replace("http://HEAD:8265", ray_head["dashboard"])
               .replace("s3://bucket/onegen", f"s3://{bucket}/onegen")
               .replace("http://mlflow:5000", mlflow_server["uri"])
               .replace("/tmp/onegen", str(work)))
    assert command != example and "HEAD" not in command and "mlflow:5000" not in command
    argv = shlex.split(command)
    argv[0] = str(VENV_BIN / "ray")
    argv += [arg for kv in [*TINY, "run.name=readme-cluster"] for arg in ("--set", kv)]
    # The nodes' environment on a real cluster: the code's runtime env, plus S3 credentials (never in a config).
    runtime_env = job_runtime_env(load_config(None, ["run.name=x"]))
    runtime_env.pop("working_dir")  # given as --working-dir
    runtime_env["env_vars"].update({**AWS_TEST_ENV, "AWS_ENDPOINT_URL": moto_endpoint})
    at = argv.index("--")
    argv[at:at] = ["--runtime-env-json", json.dumps(runtime_env)]
    result = subprocess.run(argv, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-4000:]
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                                           aws_access_key_id="testing", aws_secret_access_key="testing")
            .list_objects_v2(Bucket=bucket, Prefix="onegen/")["Contents"]]
    assert len([k for k in keys if k.endswith(".tar")]) == 3, keys
    runs = MlflowClient(mlflow_server["uri"]).search_runs(
        [MlflowClient(mlflow_server["uri"]).get_experiment_by_name("onegen").experiment_id],
        filter_string="attributes.run_name = 'readme-cluster'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert (work / "readme-cluster" / "pipeline" / "model_index.json").is_file()


@pytest.mark.integration
def test_the_build_section_runs_on_a_folder_of_images(ray_head, tmp_path: Path):
    """README's data-build block on a folder of odd files (tests/odd_images.py), then its reader snippet: what the
    section says the build printed and wrote is what it prints and writes."""
    from odd_images import write_odd_folder

    folder = tmp_path / "my images"
    expected = write_odd_folder(folder)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["gcs"])
    section = README.split("## Building a data set", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in fenced_block("## Building a data set", "bash").splitlines() if line.strip()]
    assert [shlex.split(line)[1:3] for line in lines] == [["build", "--config"], ["build", "inspect"]]
    outputs = []
    for line in lines:
        argv = [str(Path(sys.executable).with_name("onegen")), *shlex.split(line)[1:]]
        argv = [f"sources[0].path={folder}" if arg == "sources[0].path=/path/to/your/images" else arg for arg in argv]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (argv, result.stderr[-3000:])
        outputs.append(result.stdout)
    build = tmp_path / "work/data/builds/folder"
    for rel in ("build.json", "plan.json", "images/photos-00000.tar", "latents/photos-00000.parquet",
                "stats/photos-00000.json", "manifest/photos-00000.json", "manifest/_final.json"):
        assert (build / rel).is_file(), rel
        assert f"`builds/folder/{rel}`" in section, rel
    kept = sum(1 for item in expected.values() if not item.get("dropped"))
    assert f"inputs {len(expected)}: kept {kept}" in outputs[0]
    for reason in {item["dropped"] for item in expected.values() if item.get("dropped")}:
        assert reason in outputs[0] and reason in section, reason
    assert (tmp_path / "work/folder_sheet.png").is_file()
    printed = section.split("and `inspect` printed", 1)[1].split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    assert printed[0].endswith(": final (manifest/_final.json)") and outputs[1].splitlines()[0].endswith(
        ": final (manifest/_final.json)")
    assert outputs[1].splitlines()[1:] == printed[1:]  # the summary as README shows it, line for line

    snippet = fenced_block("Read it back with the one reader", "python")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(snippet, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    assert scope["build"].complete and scope["row"]["latents"][(0, "image")][0].dtype == torch.float32
