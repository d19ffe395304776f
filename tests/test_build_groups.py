"""`onegen build` over a folder with a multiview group (cameras.json), the same image under two names and a plain
photo, at two resolutions: a group is one row per resolution with its cameras per view, never split across shards
or buckets; both resolutions are built for every sample; the later copy is listed as an exact duplicate. The same
folder on S3 (moto), with the build written to S3, holds the same samples. (A kill between the shards and the final
pass is tests/test_build.py's `before_final` crash point.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from build_runs import ok, run_build, write_config
from onegen.dataset import open_build
from model.images import center_crop_box
from pipelines.bucket import bucket_for

pytestmark = pytest.mark.integration
RESOLUTIONS = [64, 128]


def write_group_folder(folder: Path) -> dict:
    """a.png (64x128), plain.png (96x96), scene/ (3 views + cameras.json with c2w and K; view 1 is 96x128, so the
    group's square bucket, taken from view 0, crops it), z_copy.png (a.png's bytes under another name, sorted into
    another partition of 2)."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(folder / "a.png")
    (folder / "z_copy.png").write_bytes((folder / "a.png").read_bytes())
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / "plain.png")
    (folder / "scene").mkdir()
    frames = []
    for v in range(3):
        shape = (96, 128, 3) if v == 1 else (96, 96, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / "scene" / f"{v:03d}.png")
        angle = 2 * np.pi * v / 3
        c2w = np.eye(4)
        c2w[:3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
        c2w[:3, 3] = [2 * np.sin(angle), 0.5, 2 * np.cos(angle)]
        frames.append({"file": f"{v:03d}.png", "c2w_opengl": c2w.tolist(),
                       "K": [[80.0, 0, shape[1] / 2], [0, 80.0, shape[0] / 2], [0, 0, 1]], "shape": shape[:2]})
    listed = [{key: value for key, value in frame.items() if key != "shape"} for frame in frames]
    (folder / "scene" / "cameras.json").write_text(json.dumps({"frames": listed, "caption": "a scene"}))
    return {"frames": frames}


def folder_config(where: Path, path: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    return write_config(where / "build.yaml", where, [
        {"name": "photos", "type": "folder", "path": path, "partition_size": 2}], resolutions=RESOLUTIONS,
        decode={"min_size": 32}, conditions={"kinds": ["canny"]})


@pytest.fixture(scope="module")
def groups(tmp_path_factory, ray_head):
    root = tmp_path_factory.mktemp("groups")
    expected = write_group_folder(root / "photos")
    ok(run_build(ray_head, folder_config(root / "reference", str(root / "photos"))))
    return {"root": root, "expected": expected,
            "build": open_build("b", storage_root=str(root / "reference" / "data"))}


def by_path(build) -> dict[str, list[dict]]:
    """{input file or folder name: its rows} over the whole build, duplicates included."""
    out: dict[str, list[dict]] = {}
    for row in build.rows(skip_duplicates=False):
        name = row["input_id"].split("#")[0].rstrip("/").rsplit("/", 1)[-1]
        out.setdefault(name, []).append(row)
    return out


def test_every_sample_is_built_at_both_resolutions_and_a_group_is_one_row_with_its_cameras(groups):
    build = groups["build"]
    rows = by_path(build)
    assert sorted(rows) == ["a.png", "plain.png", "scene", "z_copy.png"]
    for name, mine in rows.items():
        assert sorted(r["resolution"] for r in mine) == RESOLUTIONS, name
    a = {r["resolution"]: r for r in rows["a.png"]}
    for resolution in RESOLUTIONS:  # 64x128: a landscape bucket of each resolution's table
        assert (a[resolution]["bucket_h"], a[resolution]["bucket_w"]) == bucket_for((64, 128), resolution)
        assert a[resolution]["bucket_h"] < a[resolution]["bucket_w"]
    for row in rows["scene"]:
        size = row["bucket_h"]
        assert row["num_views"] == 3 and row["group_id"] and row["bucket_h"] == row["bucket_w"] == row["resolution"]
        assert [c["view"] for c in row["cameras"]] == [0, 1, 2]
        for camera, frame in zip(row["cameras"], groups["expected"]["frames"]):
            np.testing.assert_allclose(np.reshape(camera["c2w_opengl"], (4, 4)), frame["c2w_opengl"])
            top, left, crop_h, crop_w = center_crop_box(*frame["shape"], size, size)  # the release's centre crop
            k = np.array(frame["K"])
            expected = np.array([(k[0] - left * k[2]) * size / crop_w, (k[1] - top * k[2]) * size / crop_h])
            np.testing.assert_allclose(np.reshape(camera["K"], (3, 3))[:2], expected)
        assert row["cameras"][1]["K"][2] == pytest.approx(48 * size / 96)  # view 1: cx moved by the 16 px crop
        assert {(v, m) for v, m in row["latents"]} == {(v, m) for v in range(3) for m in ("image", "canny")}
    shards_of_scene = {shard for shard in build.shards() for row_id in build.entries()[shard]["ids"]
                       if row_id == rows["scene"][0]["id"]}
    assert len(shards_of_scene) == 1
    counts = [c for shard in build.entries().values() for c in shard["counts"] if c["views"] == 3]
    assert sorted(c["resolution"] for c in counts) == RESOLUTIONS


def test_the_same_image_under_two_names_keeps_the_first_and_lists_the_other(groups):
    build = groups["build"]
    rows = by_path(build)
    manifest = build.manifest()
    assert manifest["duplicates"] == [{"id": rows["z_copy.png"][0]["id"], "sha256": rows["a.png"][0]["sha256"],
                                       "kept": rows["a.png"][0]["id"]}]
    assert manifest["totals"]["duplicates"] == 1
    seen = {row["id"] for row in build.rows()}  # the reader skips the listed copy
    assert rows["a.png"][0]["id"] in seen and rows["z_copy.png"][0]["id"] not in seen


def test_the_folder_on_s3_built_to_s3_holds_the_same_samples(groups, ray_head, aws_env, moto_endpoint, make_bucket):
    import boto3

    aws_env.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    bucket = make_bucket()
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    photos = groups["root"] / "photos"
    for path in sorted(p for p in photos.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"in/photos/{path.relative_to(photos)}")
    config = folder_config(groups["root"] / "s3", f"s3://{bucket}/in/photos")
    ok(run_build(ray_head, config, f"storage.root=s3://{bucket}/out"))
    build = open_build(f"s3://{bucket}/out/builds/b")
    local = groups["build"]
    assert build.complete and build.manifest()["totals"] == local.manifest()["totals"]
    remote_rows, local_rows = by_path(build), by_path(local)
    assert sorted(remote_rows) == sorted(local_rows)
    for name, rows in remote_rows.items():
        assert rows[0]["input_id"].startswith(f"s3://{bucket}/in/photos/")
        assert [r["sha256"] for r in rows] == [r["sha256"] for r in local_rows[name]]
        for row, twin in zip(rows, local_rows[name]):
            assert row["cameras"] == twin["cameras"] and (row["bucket_h"], row["bucket_w"]) == \
                (twin["bucket_h"], twin["bucket_w"])
            np.testing.assert_array_equal(row["latents"][(0, "image")][0], twin["latents"][(0, "image")][0])
