"""The `webdataset` source: tars found by file, folder, glob and brace range (local and on S3), samples grouped by
key with their captions, damaged tars counted instead of fatal, and an img2dataset WebDataset output built through
the whole pipeline (module fixture `wds_build`: one img2dataset run against tests/http_images.py, one build)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from build_runs import ok, pixel_latent_picture, run_build, write_config
from http_images import ImageServer, write_url_list
from onegen.dataset import Build
from onegen.shards import read_entries, read_manifest, row_latents
from onegen.storage import Storage
from pipelines.record import samples_from_wds_tar
from pipelines.sources.tars import plan_tar_partitions, read_tar_partition
from test_record import _tar as tar_bytes  # a tar of (name, bytes) members


def png(seed: int, size: int = 80) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_members(first: int, n: int) -> list[tuple[str, bytes]]:
    members = []
    for key in range(first, first + n):
        members += [(f"{key:06d}.png", png(key)), (f"{key:06d}.txt", f"caption {key}".encode()),
                    (f"{key:06d}.json", json.dumps({"url": f"http://x/{key}", "caption": f"json caption {key}",
                                                    "width": 80}).encode())]
    return members


def test_tars_are_found_by_file_folder_glob_and_brace_range(tmp_path: Path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    for i in range(3):
        (out / f"{i:05d}.tar").write_bytes(tar_bytes(shard_members(10 * i, 2)))
    (out / "sub" / "extra.tar").write_bytes(tar_bytes(shard_members(90, 1)))
    (out / "00000.parquet").write_bytes(b"not read")
    (out / "00000_stats.json").write_text("{}")

    def names(paths):
        return [spec["path"] for spec in plan_tar_partitions(paths)]

    assert names([str(out)]) == ["00000.tar", "00001.tar", "00002.tar", "sub/extra.tar"]
    assert names([str(out / "{00001..00002}.tar")]) == ["00001.tar", "00002.tar"]
    assert names([str(out / "0000[02].tar")]) == ["00000.tar", "00002.tar"]
    assert names([str(out / "00002.tar"), str(out / "*.tar")]) == ["00002.tar", "00000.tar", "00001.tar"]  # once each
    spec = plan_tar_partitions([str(out / "00001.tar")])[0]
    assert spec["size"] == (out / "00001.tar").stat().st_size
    with pytest.raises(FileNotFoundError, match="nothing-.*: no tar matches"):
        plan_tar_partitions([str(tmp_path / "nothing-*.tar")])
    with pytest.raises(FileNotFoundError, match="no tar there"):
        plan_tar_partitions([str(tmp_path / "missing")])

    records = read_tar_partition(spec)
    assert [r["meta"]["key"] for r in records] == ["000010", "000011"]
    first = records[0]
    assert first["captions"] == {"original": "json caption 10"}  # the .json caption wins over the .txt
    assert first["meta"]["sidecar"] == {"url": "http://x/10", "width": 80}
    assert first["views"][0]["data"] == png(10) and not first["dropped"]
    assert first["input_id"] == f"{Storage(str(out)).uri('00001.tar')}#{spec['size']}:{spec['version']}/000010"


def test_a_damaged_tar_keeps_what_came_before_and_counts_the_rest(tmp_path: Path):
    members = shard_members(0, 3) + [("000003.txt", b"no image here"), ("000004.png", png(4)),
                                     ("000004.json", b"{not json")]
    whole = tar_bytes(members)
    (tmp_path / "ok.tar").write_bytes(whole)
    records = read_tar_partition(plan_tar_partitions([str(tmp_path / "ok.tar")])[0])
    assert [(r["meta"]["key"], r["dropped"]) for r in records] == [
        ("000000", None), ("000001", None), ("000002", None), ("000003", "not_an_image"), ("000004", "bad_sidecar")]
    assert "no image member" in records[3]["error"] and "not valid JSON" in records[4]["error"]

    cut = tar_bytes(shard_members(0, 3))
    (tmp_path / "cut.tar").write_bytes(cut[: len(cut) // 2])  # a copy that stopped half-way
    spec = plan_tar_partitions([str(tmp_path / "cut.tar")])[0]
    records = read_tar_partition(spec)
    assert [r["dropped"] for r in records[:-1]] == [None] * (len(records) - 1) and len(records) <= 3
    assert records[-1]["dropped"] == "unreadable" and "damaged" in records[-1]["error"]
    assert "cut.tar" in records[-1]["error"]

    (tmp_path / "cut.tar").write_bytes(cut)  # rewritten after planning: one counted input, not a mix
    changed = read_tar_partition(spec)
    assert len(changed) == 1 and changed[0]["dropped"] == "unreadable" and "changed since" in changed[0]["error"]

    (tmp_path / "junk.tar").write_bytes(b"this is not a tar at all" * 40)
    junk = read_tar_partition(plan_tar_partitions([str(tmp_path / "junk.tar")])[0])
    assert [r["dropped"] for r in junk] == ["unreadable"] and "before its first sample" in junk[0]["error"]


def test_tars_on_s3_are_planned_from_a_listing_and_streamed(moto_endpoint, aws_env, make_bucket):
    bucket = make_bucket()
    aws_env.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    storage = Storage(f"s3://{bucket}/wds")
    for i in range(2):
        storage.write_bytes(f"{i:05d}.tar", tar_bytes(shard_members(10 * i, 2)))
    storage.write_bytes("00000_stats.json", b"{}")
    specs = plan_tar_partitions([f"s3://{bucket}/wds/"])
    assert [s["path"] for s in specs] == ["00000.tar", "00001.tar"]
    assert plan_tar_partitions([f"s3://{bucket}/wds/{{00000..00001}}.tar"]) == specs
    records = read_tar_partition(specs[1])
    assert [r["views"][0]["data"] for r in records] == [png(10), png(11)]
    assert records[0]["input_id"].startswith(f"s3://{bucket}/wds/00001.tar#")


# --- an img2dataset WebDataset output through the whole build ----------------------------------------------------

@pytest.fixture(scope="module")
def wds_build(tmp_path_factory, ray_head):
    """img2dataset downloads photographs (and faults) from the local server as WebDataset shards; a build reads
    them back as a `webdataset` source."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    root = tmp_path_factory.mktemp("wds")
    with ImageServer(slow_s=2) as server:
        paths = [p for p in server.manifest if p.startswith("/photo/")] + ["/status/404"]
        url_list = write_url_list(root / "list.parquet", [server.url(p) for p in paths], "parquet",
                                  captions=[f"a photo of {p}" for p in paths], extra={"license": ["cc0"] * len(paths)})
        img2dataset.download(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
                             save_additional_columns=["license"], output_folder=str(root / "i2d"),
                             output_format="webdataset", processes_count=1, thread_count=2, resize_mode="no",
                             number_sample_per_shard=3, enable_wandb=False, timeout=1, retries=0,
                             disable_all_reencoding=True,  # the tars hold the very bytes served
                             distributor="multiprocessing")
        served = {p: server.body(p) for p in paths if p.startswith("/photo/")}
    config = write_config(root / "build.yaml", root, [{"name": "old", "type": "webdataset",
                                                       "paths": [str(root / "i2d")]}], resolutions=[256])
    result = ok(run_build(ray_head, config))
    storage = Storage(str(root / "data"))
    return {"root": root, "served": served, "result": result, "storage": storage,
            "entries": read_entries(storage, "b"), "manifest": read_manifest(storage, "b")}


def test_an_img2dataset_webdataset_output_round_trips_with_its_captions(wds_build):
    from pipelines.decode import decode_image, pixels_sha256

    storage, entries = wds_build["storage"], wds_build["entries"]
    tars = sorted((wds_build["root"] / "i2d").glob("*.tar"))
    assert len(tars) == 2 and sorted(entries) == ["old-00000", "old-00001"]  # one shard per tar
    served = wds_build["served"]  # {url path: the bytes served}: the photographs img2dataset got
    totals = wds_build["manifest"]["totals"]
    assert totals["samples"] == totals["inputs"] == len(served)  # img2dataset's tars hold its successes only
    build = Build(storage, "b")
    by_caption = {}
    for shard in entries:
        samples = {s.key: s for s in samples_from_wds_tar(build.read_file(shard, "images"))}
        for row in build.table(shard).to_pylist():
            by_caption[row["captions"][0]["text"]] = row["sha256"]
            mean, _ = row_latents(row)[(0, "image")]  # the pixels went through the bucket into the latents
            np.testing.assert_array_equal(pixel_latent_picture(mean), samples[f"{row['id']}-r256-v0"].image)
    expected = {f"a photo of {path}": pixels_sha256(decode_image(body, path)) for path, body in served.items()}
    assert by_caption == expected
    assert "shards: 2 committed" in wds_build["result"].stdout


def test_a_gap_in_a_range_is_an_error_and_dotted_keys_keep_their_members(tmp_path: Path):
    for i in (0, 1, 3):
        (tmp_path / f"{i:05d}.tar").write_bytes(tar_bytes(shard_members(i, 1)))
    with pytest.raises(FileNotFoundError, match=r"00002\.tar \(from .*\{00000\.\.00003\}\.tar\): no tar there"):
        plan_tar_partitions([str(tmp_path / "{00000..00003}.tar")])
    (tmp_path / "dots.tar").write_bytes(tar_bytes([("a/photo.v2.jpg", png(5)), ("a/photo.v2.txt", b"dotted"),
                                                   ("a/photo.v2.seg.json", b"{}")]))
    (record,) = read_tar_partition(plan_tar_partitions([str(tmp_path / "dots.tar")])[0])
    assert record["meta"]["key"] == "a/photo" and record["views"][0]["data"] == png(5)
    assert record["captions"] == {"original": "dotted"} and not record["dropped"]


def test_a_store_error_mid_tar_fails_the_partition_instead_of_cutting_the_tar(tmp_path: Path, monkeypatch):
    (tmp_path / "a.tar").write_bytes(tar_bytes(shard_members(0, 3)))
    spec = plan_tar_partitions([str(tmp_path / "a.tar")])[0]

    class Resetting(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 2048:
                raise ConnectionResetError(104, "Connection reset by peer")
            return super().read(size)

    monkeypatch.setattr(Storage, "open_input_stream", lambda self, rel: Resetting((tmp_path / rel).read_bytes()))
    with pytest.raises(ConnectionResetError):  # Ray retries the task; nothing is committed from half a tar
        read_tar_partition(spec)
