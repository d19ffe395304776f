"""Incremental builds (`build.previous`): a build that names earlier builds holds only the inputs none of them holds,
drops a copy of an already-built picture as `duplicate`, follows a chain of builds, and refuses an earlier build that
is missing or unfinished. One folder grows between builds in one storage root; builds at 64 px keep it quick."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from build_runs import manifest_view, ok, run_build, write_config
from onegen.shards import read_entries, read_manifest
from onegen.storage import Storage
from pipelines.sources.urls import partition_rows, plan_url_partitions


def picture(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def kept_inputs(storage: Storage, name: str) -> list[str]:
    return sorted(i for entry in read_entries(storage, name).values() for i in entry["input_ids"])


def names_of(input_ids: list[str]) -> list[str]:
    return sorted(i.rsplit("/", 1)[-1].split("#")[0] for i in input_ids)


@pytest.fixture(scope="module")
def grown(tmp_path_factory, ray_head):
    """v1 over six pictures; then three new pictures and a renamed copy of an old one, built as v2 (previous: v1)."""
    root = tmp_path_factory.mktemp("incremental")
    photos = root / "photos"
    photos.mkdir()
    for i in range(6):
        picture(photos / f"old_{i}.png", i)
    config = write_config(root / "build.yaml", root, [{"name": "photos", "type": "folder", "path": str(photos),
                                                       "partition_size": 2}],
                          resolutions=[64], conditions={"kinds": ["canny"]})
    v1 = ok(run_build(ray_head, config, "build.name=v1"))
    for i in range(6, 9):
        picture(photos / f"new_{i}.png", i)
    shutil.copyfile(photos / "old_2.png", photos / "copy_of_old_2.png")
    v2 = ok(run_build(ray_head, config, "build.name=v2", "build.previous=[v1]"))
    return {"root": root, "photos": photos, "config": config, "storage": Storage(str(root / "data")), "v1": v1,
            "v2": v2}


def test_an_incremental_build_holds_exactly_the_new_inputs_and_drops_a_renamed_copy(grown):
    storage = grown["storage"]
    assert names_of(kept_inputs(storage, "v1")) == [f"old_{i}.png" for i in range(6)]
    assert names_of(kept_inputs(storage, "v2")) == ["new_6.png", "new_7.png", "new_8.png"]
    totals = read_manifest(storage, "v2")["totals"]
    assert totals["inputs"] == 4 and totals["samples"] == 3 and totals["dropped"] == {"duplicate": 1}
    (dropped,) = [pair for e in read_entries(storage, "v2").values() for pair in e["dropped_input_ids"]]
    assert names_of([dropped[0]]) == ["copy_of_old_2.png"] and dropped[1] == "duplicate"
    plan = json.loads(storage.read_bytes("builds/v2/plan.json"))
    assert [b["name"] for b in plan["previous"]] == ["v1"] and plan["already_built"] == {"photos": 6}
    assert len(plan["partitions"]) == 2  # the four new inputs, in full partitions of two
    assert "incremental: earlier builds v1" in grown["v2"].stdout and "duplicate" in grown["v2"].stdout


def test_a_rerun_of_an_incremental_build_changes_nothing(grown, ray_head):
    storage = grown["storage"]
    before = manifest_view(storage, "v2")
    again = ok(run_build(ray_head, grown["config"], "build.name=v2", "build.previous=[v1]"))
    assert manifest_view(storage, "v2") == before and "0 committed" in again.stdout


def test_a_chain_of_builds_names_only_its_last_link(grown, ray_head):
    picture(grown["photos"] / "newer_9.png", 9)
    ok(run_build(ray_head, grown["config"], "build.name=v3", "build.previous=[v2]"))
    storage = grown["storage"]
    assert names_of(kept_inputs(storage, "v3")) == ["newer_9.png"]  # v1's pictures too, through v2's plan
    plan = json.loads(storage.read_bytes("builds/v3/plan.json"))
    assert [b["name"] for b in plan["previous"]] == ["v2", "v1"]


def test_an_earlier_build_that_is_missing_or_unfinished_is_refused(grown, ray_head):
    missing = run_build(ray_head, grown["config"], "build.name=v9", "build.previous=[nope]")
    assert missing.returncode == 2 and "build.previous names 'nope'" in missing.stderr, missing.stderr[-2000:]
    storage = grown["storage"]
    storage.write_bytes("builds/half/build.json", storage.read_bytes("builds/v1/build.json"))
    unfinished = run_build(ray_head, grown["config"], "build.name=v9", "build.previous=[half]")
    assert unfinished.returncode == 2 and "has not finished" in unfinished.stderr, unfinished.stderr[-2000:]
    assert "Traceback" not in missing.stderr + unfinished.stderr
    assert not storage.exists("builds/v9/plan.json")


def test_an_incremental_url_plan_keeps_only_the_new_rows_in_full_partitions(tmp_path):
    from http_images import write_url_list

    urls = [f"http://127.0.0.1:9/{i}.png" for i in range(10)] + ["", "http://127.0.0.1:9/3.png"]
    url_list = write_url_list(tmp_path / "list.csv", urls, "csv", captions=[f"c{i}" for i in range(len(urls))])
    built = {urls[i] for i in (0, 1, 2, 5, 6)}
    specs = plan_url_partitions([str(url_list)], 3, skip=built.__contains__)
    rows = [partition_rows(spec)[2] for spec in specs]
    assert rows == [[3, 4, 7], [8, 9, 10], [11]]  # a blank URL is never "built": it is a row to report
    assert specs[0]["rows"] == [[3, 5], [7, 8]]
    assert plan_url_partitions([str(url_list)], 3) == [{"file": str(url_list), "start": s, "stop": min(s + 3, 12)}
                                                       for s in (0, 3, 6, 9)]
    from pipelines.sources.urls import read_url_partition

    records, stats = read_url_partition(specs[0], timeout_s=1, threads=2)  # nothing listens on port 9
    assert [r["input_id"] for r in records] == [urls[3], urls[4], urls[7]]
    assert [r["captions"]["original"] for r in records] == ["c3", "c4", "c7"]
    assert stats["count"] == 3 and stats["failed_to_download"] == 3


def test_a_build_cannot_be_its_own_earlier_build(grown, ray_head):
    result = run_build(ray_head, grown["config"], "build.name=v8", "build.previous=[v1, v8]")
    assert result.returncode == 2 and "the build being made" in result.stderr, result.stderr[-2000:]
