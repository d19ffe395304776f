"""The shared synthetic build (tests/conftest.py `synthetic_build`: configs/build/synthetic_small.yaml on the session
Ray head) read back through the one reader (onegen/dataset.py), against the synthetic world regenerated here from
its seed: pictures and condition maps must be exactly what the renderers draw from the world's true labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from build_runs import pixel_latent_picture
from onegen.dataset import open_build
from onegen.shards import plan_path, read_entries

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(synthetic_build):
    """The config's scenes, regenerated from its seed and bucketed as the build buckets them: {scene: [Sample]}."""
    from pipelines.bucket import bucket_sample
    from pipelines.sources.synthetic import resolve_config, synthetic_samples

    source = yaml.safe_load(synthetic_build["config"].read_text())["build"]["sources"][0]
    config = resolve_config(views_per_scene=source["views_per_scene"], size=source["size"])
    scenes: dict[int, list] = {}
    for sample in synthetic_samples(0, source["scenes"], config=config):
        scenes.setdefault(sample.meta["scene_index"], []).append(bucket_sample(sample, 64, 64))
    return scenes


def test_the_reader_opens_the_build_by_name_uri_or_root_and_lists_the_manifest_shards(synthetic_build):
    by_name = open_build("synthetic_small", storage_root=synthetic_build["root"])
    by_uri = open_build(synthetic_build["uri"])
    by_root = open_build(synthetic_build["root"])
    assert by_name.uri == by_uri.uri == by_root.uri and by_name.complete
    manifest = by_name.manifest()
    assert by_name.shards() == [item["shard"] for item in manifest["shards"]] == ["synth-00000", "synth-00001",
                                                                                  "synth-00002"]
    rows = list(by_uri.rows())
    assert len(rows) == manifest["totals"]["rows"] == 24 and len({r["id"] for r in rows}) == 24
    for row in rows:
        assert row["num_views"] == 2 and (row["bucket_h"], row["bucket_w"]) == (64, 64)
        mean, std = row["latents"][(1, "image")]
        assert isinstance(mean, torch.Tensor) and mean.dtype == torch.float32 and mean.shape == (16, 32, 32)
        assert std is None
    with pytest.raises(FileNotFoundError, match="no build there .*synthetic_small"):
        open_build("nope", storage_root=synthetic_build["root"])


def test_every_picture_and_condition_view_is_what_the_renderers_draw_from_the_true_labels(synthetic_build, world):
    from model import conditions as render

    checked = set()
    for row in open_build(synthetic_build["uri"]).rows():
        scene = int(row["input_id"].split("scene=")[1].split(":")[0])
        colours = {name: value["hex"] for name, value in json.loads(row["class_colours"]).items()}
        params = json.loads(row["params"])
        for v, sample in enumerate(world[scene]):
            latents = {m: mean for (view, m), (mean, _) in row["latents"].items() if view == v}
            visible = [e for e in sample.entities if e.get("visible", True) and e.get("bbox_2d") is not None]
            expected = {
                "image": sample.image,
                "canny": render.canny_map(sample.image, *params[v]["canny"]),
                "depth": render.depth_condition(sample.depth),
                "semantic_map": render.semantic_condition(sample.semantic, sample.classes, colours),
                "bounding_boxes": render.box_condition((64, 64), [e["bbox_2d"] for e in visible],
                                                       [colours[e["class"]] for e in visible]),
            }
            if sample.keypoints is not None and len(sample.keypoints):
                expected["pose"] = render.pose_condition((64, 64), sample.keypoints)
            assert set(latents) == set(expected), (scene, v)
            for modality, picture in expected.items():
                np.testing.assert_array_equal(pixel_latent_picture(latents[modality]), picture,
                                              err_msg=f"{scene} v{v} {modality}")
                checked.add(modality)
    assert checked == {"image", "canny", "depth", "semantic_map", "bounding_boxes", "pose"}


def test_the_plan_is_frozen_and_every_shard_of_it_is_committed(synthetic_build):
    build = open_build(synthetic_build["uri"])
    plan = json.loads(build.storage.read_bytes(plan_path(build.name)))
    entries = read_entries(build.storage, build.name)
    assert [f"{p['source']}-{p['index']:05d}" for p in plan["partitions"]] == sorted(entries) == build.shards()
    assert plan["content_hash"] == build.manifest()["content_hash"]
    assert "manifest: 3 shards, 24 samples" in synthetic_build["stdout"]


def test_ray_job_submit_of_the_build_equals_the_local_run(synthetic_build, ray_head, tmp_path):
    """`ray job submit --working-dir . -- python -m pipelines.build ...` (what a cluster runs) writes the very build
    the driver run wrote: same manifest, same shard bytes."""
    import subprocess

    from build_runs import REPO, manifest_view
    from conftest import VENV_BIN
    from onegen.build_config import BuildConfig
    from onegen.config import load_config
    from onegen.raycluster import job_runtime_env
    from onegen.storage import Storage

    overrides = [f"run.work_dir={tmp_path / 'work'}", f"storage.root={tmp_path / 'data'}"]
    runtime_env = job_runtime_env(load_config(synthetic_build["config"], overrides, BuildConfig))
    runtime_env.pop("working_dir")
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "pipelines.build",
           "--config", "configs/build/synthetic_small.yaml"]
    for item in overrides:
        cmd += ["--set", item]
    result = subprocess.run(cmd, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-4000:]
    assert "manifest: 3 shards, 24 samples" in output
    assert manifest_view(Storage(str(tmp_path / "data")), "synthetic_small") == \
        manifest_view(Storage(synthetic_build["root"]), "synthetic_small")


def test_the_same_config_written_to_s3_gives_the_same_manifest(synthetic_build, ray_head, aws_env, moto_endpoint,
                                                               make_bucket, tmp_path):
    """storage.root on s3:// (moto on 127.0.0.1) is the same code path: the same manifest and shard bytes as the
    local build, written with the credentials of the standard chain (here the test environment's)."""
    from build_runs import REPO, manifest_view, ok, run_build
    from onegen.storage import Storage

    aws_env.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    root = f"s3://{make_bucket()}/onegen"
    ok(run_build(ray_head, REPO / "configs/build/synthetic_small.yaml", f"run.work_dir={tmp_path / 'work'}",
                 f"storage.root={root}"))
    assert manifest_view(Storage(root), "synthetic_small") == manifest_view(Storage(synthetic_build["root"]),
                                                                             "synthetic_small")
    assert open_build(f"{root}/builds/synthetic_small").complete


def test_the_build_is_an_mlflow_run_with_its_config_counts_and_manifest(synthetic_build):
    """What a user sees in MLflow (through the client, as the UI reads it): the resolved config as params, kept /
    dropped / shard / byte counts and samples/s per stage as metrics, the manifest and closing table as artifacts,
    and the build as the run's dataset input."""
    from pathlib import Path

    from mlflow import MlflowClient

    from onegen.shards import canonical_json, sha256_hex

    work = Path(synthetic_build["root"]).parent / "work"
    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("onegen")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`onegen.build` = 'synthetic_small'")
    assert run.info.status == "FINISHED" and run.info.run_name == "build-synthetic_small"
    params = run.data.params
    assert params["build.resolutions"] == "[64]" and params["build.encode.image_tokenizer"] == "pixel"
    metrics = run.data.metrics
    build = open_build(synthetic_build["uri"])
    manifest = build.manifest()
    assert metrics["kept"] == manifest["totals"]["samples"] == 24 and metrics["rows"] == manifest["totals"]["rows"]
    assert metrics["shards_committed"] == 3 and metrics["shards_skipped"] == 0 and metrics["inputs"] == 24
    entries = build.entries().values()
    assert metrics["bytes_written"] == sum(e["files"][k]["bytes"] for e in entries for k in ("images", "latents"))
    assert {"samples_per_s.ingest", "samples_per_s.encode", "samples_per_s.pack", "samples_per_s.conditions.canny",
            "samples_per_s.conditions.labels"} <= set(metrics)
    local = client.download_artifacts(run.info.run_id, "build/manifest.json", str(work / "artifacts-check"))
    assert json.loads(Path(local).read_text()) == manifest
    summary = Path(client.download_artifacts(run.info.run_id, "build/summary.txt", str(work / "artifacts-check")))
    assert "manifest: 3 shards, 24 samples" in summary.read_text()
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "synthetic_small"
    assert dataset_input.dataset.digest == sha256_hex(canonical_json(manifest))[:16]
