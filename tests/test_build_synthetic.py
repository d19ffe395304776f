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
        for v, sample in enumerate(world[scene]):
            latents = {m: mean for (view, m), (mean, _) in row["latents"].items() if view == v}
            visible = [e for e in sample.entities if e.get("visible", True) and e.get("bbox_2d") is not None]
            expected = {
                "image": sample.image,
                "canny": render.canny_map(sample.image, 100, 200),
                "depth": render.depth_condition(sample.depth),
                "semantic": render.semantic_condition(sample.semantic, sample.classes, colours),
                "boxes": render.box_condition((64, 64), [e["bbox_2d"] for e in visible],
                                              [colours[e["class"]] for e in visible]),
            }
            if sample.keypoints is not None and len(sample.keypoints):
                expected["pose"] = render.pose_condition((64, 64), sample.keypoints)
            assert set(latents) == set(expected), (scene, v)
            for modality, picture in expected.items():
                np.testing.assert_array_equal(pixel_latent_picture(latents[modality]), picture,
                                              err_msg=f"{scene} v{v} {modality}")
                checked.add(modality)
    assert checked == {"image", "canny", "depth", "semantic", "boxes", "pose"}


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
