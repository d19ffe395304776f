"""`onegen build` end to end, as a user runs it: `python -m pipelines.build` in a subprocess on the session's
`ray start --head` (tests/conftest.py), against a URL list served on 127.0.0.1 with real photographs and faults, a
folder of odd files and the synthetic world. Then what a reader sees: stats, shards, latents, manifest, duplicates;
reruns, refusals, crashes at every commit point, S3 on moto and `ray job submit`."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from build_runs import manifest_view, ok, pixel_latent_picture, run_build, write_config
from http_images import FAULTS, ImageServer, write_url_list
from odd_images import write_odd_folder
from onegen.dataset import Build
from onegen.shards import read_entries, read_manifest, row_latents, sha256_hex
from onegen.storage import Storage
from pipelines.record import samples_from_wds_tar
from pipelines.shard_writer import CRASH_POINTS

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def latent_rows(storage: Storage, entry: dict) -> list[dict]:
    """A shard's rows through the one reader (schema and sha256 checked)."""
    return Build(storage, entry["build"]).table(entry["shard"]).to_pylist()


def tar_samples(storage: Storage, entry: dict) -> dict:
    return {s.key: s for s in samples_from_wds_tar(Build(storage, entry["build"]).read_file(entry["shard"], "images"))}


# --- the mixed build -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with ImageServer(slow_s=4) as running:
        yield running


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, server, ray_head):
    root = tmp_path_factory.mktemp("mixed")
    paths = list(server.manifest)
    url_list = write_url_list(root / "urls.csv", [server.url(p) for p in paths], "csv",
                              captions=[f"caption of {p}" for p in paths], extra={"license": ["cc-by"] * len(paths)})
    expected_odd = write_odd_folder(root / "odd")
    config = write_config(root / "build.yaml", root, [
        {"name": "web", "type": "urls", "files": [str(url_list)], "timeout_s": 1.5, "retries": 0,
         "partition_size": 6},
        {"name": "odd", "type": "folder", "path": str(root / "odd"), "partition_size": 8},
        {"name": "synth", "type": "synthetic", "scenes": 3, "partition_size": 2, "size": 128},
    ], resolutions=[256])
    result = ok(run_build(ray_head, config))
    storage = Storage(str(root / "data"))
    return {"root": root, "config": config, "result": result, "storage": storage, "odd": expected_odd,
            "paths": paths, "entries": read_entries(storage, "b"), "manifest": read_manifest(storage, "b")}


def test_the_stats_match_what_was_served_and_what_the_folder_holds(mixed):
    entries = mixed["entries"]
    web = Counter()
    for entry in entries.values():
        if entry["source"] == "web":
            web.update(entry["dropped"])
    faults_failing_download = sum(1 for f in FAULTS.values() if f["status"] == "failed_to_download")
    assert web["failed_to_download"] == faults_failing_download
    assert web["not_an_image"] == 1 and web["truncated"] == 1
    photos = sum(1 for p in mixed["paths"] if p.startswith("/photo/"))
    assert sum(e["samples"] for e in entries.values() if e["source"] == "web") == photos
    stats = json.loads(mixed["storage"].read_bytes("builds/b/stats/web-00000.json"))
    assert stats["source_stats"]["failed_to_download"] + stats["source_stats"]["successes"] == stats["inputs"]
    assert any("HTTP Error 404" in message for message in stats["source_stats"]["errors"])
    # The closing table counts img2dataset's outcomes and its error messages, one line each, as README shows them.
    successes = photos + sum(1 for f in FAULTS.values() if f["status"] == "success")
    line = (f"web (img2dataset): {len(mixed['paths'])} urls: {successes} successes, {faults_failing_download} "
            "failed_to_download, 0 failed_to_resize")
    table = mixed["result"].stdout.split("\nbuild b -> ", 1)[1]  # the closing table, after Ray's log lines
    assert line in table and line in (REPO / "README.md").read_text()
    for message in ("HTTP Error 404: Not Found", "HTTP Error 500", "timed out", "X-Robots-Tag", "infinite loop"):
        assert sum(message in row for row in table.splitlines()) == 1, message
    for kind in ("canny", "blur", "inpaint", "labels"):  # each condition's share of the conditions stage
        assert re.search(rf"^ {{4}}{kind} +[0-9.]+ +[0-9.]+$", table, re.M), kind

    odd = Counter()
    for entry in entries.values():
        if entry["source"] == "odd":
            odd.update(entry["dropped"])
    expected_dropped = Counter(o["dropped"] for o in mixed["odd"].values() if o.get("dropped"))
    assert odd == expected_dropped
    synth = [e for e in entries.values() if e["source"] == "synth"]
    assert sum(e["samples"] for e in synth) == 3 and all(not e["dropped"] for e in synth)
    assert "dropped by reason" in mixed["result"].stdout and "samples/s" in mixed["result"].stdout


def test_every_shard_decodes_and_pixel_latents_give_back_the_bucketed_images(mixed):
    storage = mixed["storage"]
    rows_seen = 0
    for entry in mixed["entries"].values():
        files = entry["files"]
        for kind in ("images", "latents"):
            assert sha256_hex(storage.read_bytes(files[kind]["path"])) == files[kind]["sha256"]
        samples = tar_samples(storage, entry)
        rows = latent_rows(storage, entry)
        assert [r["id"] for r in rows] == entry["ids"]  # one resolution: one row per sample, in input order
        for row in rows:
            sample = samples[f"{row['id']}-r256-v0"]
            assert sample.image.shape[:2] == (row["bucket_h"], row["bucket_w"])
            latents = row_latents(row)
            mean, std = latents[(0, "image")]
            assert std is None and mean.shape == (16, row["bucket_h"] // 2, row["bucket_w"] // 2)
            np.testing.assert_array_equal(pixel_latent_picture(mean), sample.image)
            assert set(row["modalities"]) >= {"image", "canny", "blurred_image", "masked_image"}
            rows_seen += 1
    assert rows_seen == mixed["manifest"]["totals"]["rows"]


def rebuilt_folder_members(config: Path, *overrides: str) -> dict[str, dict]:
    """The odd folder's partition through the build's stages again, in this process, from the same config (plus
    `overrides`): a second build of the same inputs, as tar members by key."""
    from onegen.build_config import BuildConfig
    from onegen.config import load_config
    from pipelines.ingest import plan_partitions, read_partition
    from pipelines.process import ViewEncoder, process_records

    cfg = load_config(config, list(overrides), BuildConfig)
    partition = next(p for p in plan_partitions(cfg) if p.source == "odd")
    records, _ = read_partition(cfg, partition)
    process_records(cfg, records, ViewEncoder(cfg))
    return {m["__key__"]: m for r in records if not r["dropped"] for m in r["members"]}


def test_weight_free_conditions_are_byte_identical_on_a_rebuild_and_differ_with_another_seed(mixed):
    from pipelines.record import decode_png

    entry = mixed["entries"]["odd-00000"]
    with tarfile.open(fileobj=io.BytesIO(Build(mixed["storage"], "b").read_file("odd-00000", "images"))) as tar:
        built = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    names = ("cond_canny.png", "cond_blurred_image.png", "cond_masked_image.png", "inpaint_mask.png")
    again = rebuilt_folder_members(mixed["config"])
    other = rebuilt_folder_members(mixed["config"], "run.seed=1")
    keys = sorted(again)
    assert keys == sorted({name.split(".", 1)[0] for name in built})  # every picture view of the shard
    differs = {name: 0 for name in names}
    for key in keys:
        for name in names:
            assert again[key][name] == built[f"{key}.{name}"], (key, name)  # byte-identical
            differs[name] += other[key][name] != again[key][name]
        image = decode_png(built[f"{key}.png"])
        hole = decode_png(built[f"{key}.inpaint_mask.png"]) == 255
        masked = decode_png(built[f"{key}.cond_masked_image.png"])
        assert 0.1 <= hole.mean() <= 0.5
        assert (masked[hole] == 128).all() and np.array_equal(masked[~hole], image[~hole])
    assert all(count == len(keys) for count in differs.values()), differs  # another seed: other draws for all
    rows = {r["id"]: r for r in latent_rows(mixed["storage"], entry)}
    for key in keys:  # the latent the trainer reads holds that exact grey hole too (pixel tokenizer: lossless)
        row = rows[key.split("-r256-v")[0]]
        view = int(key.rsplit("-v", 1)[1])
        picture = pixel_latent_picture(row_latents(row)[(view, "masked_image")][0])
        np.testing.assert_array_equal(picture, decode_png(built[f"{key}.cond_masked_image.png"]))


def test_the_trainer_draws_the_condition_tasks_from_a_folder_row(mixed):
    """A folder row feeds deblurring, inpainting and canny2image: the trainer reads each condition frame from the
    latent named by the task's view role."""
    import torch

    from model.tasks import get_task
    from training.samples import Choice, make_sample, supported_directions

    row = next(Build(mixed["storage"], "b").rows(["odd-00000"]))
    for name, role in (("deblurring", "blurred_image"), ("image_inpainting", "masked_image"), ("canny2image", "canny")):
        task = get_task(name)
        directions = tuple(task.directions)
        assert supported_directions(task, directions, frozenset(row["latents"]), row["num_views"],
                                    bool(row["cameras"])) == directions, name
        sample = make_sample(row, Choice(row=0, item=0, direction="generate", view=0, caption=0), name,
                             sample_posterior=False)
        assert sample.layout.roles == ("image", role) and sample.prompt.startswith(task.token)
        assert torch.equal(sample.latents[1], row["latents"][(0, role)][0])


def test_the_synthetic_rows_carry_their_exact_maps_and_labels(mixed):
    storage = mixed["storage"]
    entry = mixed["entries"]["synth-00000"]
    samples = tar_samples(storage, entry)
    row = latent_rows(storage, entry)[0]
    assert set(row["modalities"]) >= {"depth", "semantic_map", "bounding_boxes"}
    assert json.loads(row["class_colours"]) and row["entities"] and row["cameras"][0]["K"] is not None
    sample = samples[f"{row['id']}-r256-v0"]
    assert sample.depth is not None and sample.depth.shape == (256, 256) and sample.semantic is not None
    assert row["captions"] and row["captions"][0]["origin"] == "source"


def test_exact_duplicates_are_listed_in_the_manifest_first_one_kept(mixed):
    duplicates = mixed["manifest"]["duplicates"]
    expected = sum(1 for o in mixed["odd"].values() if o.get("duplicate_of"))
    assert len(duplicates) == expected >= 1
    kept_ids = {i for e in mixed["entries"].values() for i in e["ids"]}
    assert all(d["kept"] in kept_ids and d["id"] in kept_ids for d in duplicates)


def test_a_rerun_skips_every_committed_shard_and_changes_nothing(mixed, ray_head):
    storage = mixed["storage"]
    before = storage.read_bytes("builds/b/manifest/_final.json")
    result = ok(run_build(ray_head, mixed["config"]))
    assert "0 committed" in result.stdout and f"{len(mixed['entries'])} skipped" in result.stdout
    assert storage.read_bytes("builds/b/manifest/_final.json") == before


def test_a_changed_config_under_the_same_name_is_refused_with_the_way_out(mixed, ray_head):
    result = run_build(ray_head, mixed["config"], "build.decode.min_size=32")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "build.decode.min_size" in result.stderr and "--set build.name=b-v2" in result.stderr


def inspect_command(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onegen", "build", "inspect", target, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_inspect_prints_the_summary_and_draws_what_the_trainer_reads(mixed, tmp_path):
    from PIL import Image

    from pipelines.inspect_build import inspect_build
    from pipelines.record import decode_png

    target = str(mixed["root"] / "data/builds/b")
    result = inspect_command(target, "--out", str(tmp_path / "sheet.png"), "--samples", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    entries = mixed["entries"].values()
    inputs, dropped = sum(e["inputs"] for e in entries), sum(sum(e["dropped"].values()) for e in entries)
    uri = Storage(str(mixed["root"] / "data")).uri("builds/b")
    assert lines[0] == f"build b at {uri}: final (manifest/_final.json)"
    assert f"{inputs} inputs: kept {inputs - dropped}, dropped {dropped}" in lines[1]
    assert f"{mixed['manifest']['totals']['rows']} rows" in lines[1]
    assert lines[2].startswith("  splits (rows): ") and "masked_image" in lines[3] and "semantic_map" in lines[3]
    assert "dropped by reason: " in result.stdout and "failed_to_download" in result.stdout
    assert Image.open(tmp_path / "sheet.png").size[1] >= 4 * 128 and "contact sheet: " in lines[-1]

    # Cells as large as the buckets show the decoded latents 1:1: each equals the picture the shard's tar holds.
    inspection = inspect_build(target, str(tmp_path / "full.png"), samples=6, seed=1, cell=320)
    sheet = np.asarray(Image.open(tmp_path / "full.png").convert("RGB"))
    members = {}
    for entry in entries:
        with tarfile.open(fileobj=io.BytesIO(Build(mixed["storage"], "b").read_file(entry["shard"], "images"))) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
    for cell in inspection.cells:
        x0, y0, x1, y1 = cell["box"]
        name = "png" if cell["modality"] == "image" else f"cond_{cell['modality']}.png"
        expected = decode_png(members[f"{cell['id']}-r{cell['resolution']}-v{cell['view']}.{name}"])
        np.testing.assert_array_equal(sheet[y0:y1, x0:x1], expected, err_msg=str(cell))
    assert inspection.rows == len({c["id"] for c in inspection.cells}) == 6
    assert {c["modality"] for c in inspection.cells} >= {"image", "canny", "blurred_image", "masked_image"}


def test_the_sheets_prompts_are_the_trainers_for_every_task_the_row_feeds(mixed):
    from pipelines.inspect_build import row_prompts

    row = Build(mixed["storage"], "b").row("synth-00000", 0, as_tensors=False)
    prompts = row_prompts(row)
    caption = row["captions"][0]["text"]
    assert prompts[0] == f"[[text2image]] {caption}"
    by_token = {p.split("]]")[0] + "]]": p for p in prompts}
    assert {"[[canny2image]]", "[[deblurring]]", "[[image_inpainting]]", "[[depth2image]]", "[[semanticmap2image]]",
            "[[boundingbox2image]]"} <= set(by_token)
    colours = json.loads(row["class_colours"])
    tags = re.findall(r"<(#[0-9A-F]{6}) (\w+) mask: (\w+)>", by_token["[[semanticmap2image]]"])
    assert tags and all(colours[label]["hex"] == hex_ and colours[label]["name"] == name for hex_, name, label in tags)
    assert "boundingbox: " in by_token["[[boundingbox2image]]"] and by_token["[[deblurring]]"].endswith(caption)
    # the sheet shows them with a stand-in for the caption: the same prompts, the caption's text swapped only
    assert row_prompts(row, "<caption>") == [p.replace(caption, "<caption>") for p in prompts]


def test_inspect_says_in_one_line_when_a_build_is_not_final_or_not_there(mixed, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(mixed["root"] / "data", copy)
    (copy / "builds/b/manifest/_final.json").unlink()
    (copy / "builds/b/manifest/web-00001.json").unlink()  # one shard not committed yet
    result = inspect_command(str(copy / "builds/b"), "--samples", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exact duplicates: n/a until final" in result.stdout and "no contact sheet: --samples 0" in result.stdout
    planned = len(mixed["entries"])
    assert result.stdout.splitlines()[0].endswith(
        f"NOT FINAL, {planned - 1} of {planned} planned shards committed; the trainer refuses it until the same "
        "`onegen build --config ...` is rerun to finish it")
    missing = inspect_command(str(tmp_path / "nothing"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "0 builds" in missing.stderr and str(tmp_path / "nothing") in missing.stderr


# --- exactly-once: crashes at every commit point ---------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory, ray_head):
    """A two-source build small enough to run many times, and its uninterrupted result."""
    root = tmp_path_factory.mktemp("small")
    photos = root / "photos"
    write_odd_folder(photos)
    sources = [{"name": "synth", "type": "synthetic", "scenes": 4, "partition_size": 2, "size": 64},
               {"name": "odd", "type": "folder", "path": str(photos), "partition_size": 6}]

    def config(where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        return write_config(where / "build.yaml", where, sources, conditions={"kinds": ["canny"]})

    reference = root / "reference"
    ok(run_build(ray_head, config(reference)))
    return {"config": config, "root": root, "reference": Storage(str(reference / "data"))}


# The default suite keeps the quick pair (a crash inside the manifest put, and after every shard but before the
# final manifest, with its MLflow run); the other points are the `slow` drill (INTERFACES §6, suite time).
QUICK_CRASH_POINTS = ("in_manifest_put", "before_final")


@pytest.mark.parametrize("point", [point if point in QUICK_CRASH_POINTS else pytest.param(point, marks=pytest.mark.slow)
                                   for point in CRASH_POINTS])
def test_a_crash_at_any_commit_point_then_a_rerun_equals_an_uninterrupted_build(small, ray_head, point):
    where = small["root"] / f"crash-{point}"
    config = small["config"](where)
    crashed = run_build(ray_head, config, extra_env={"ONEGEN_CRASH_AT": point})
    assert crashed.returncode == -9, (crashed.stdout + crashed.stderr)[-3000:]  # SIGKILLed at the point
    storage = Storage(str(where / "data"))
    whole_and_unique(storage)  # what a reader sees after the crash
    assert not storage.exists("builds/b/manifest/_final.json")
    rerun = ok(run_build(ray_head, config))
    assert manifest_view(storage) == manifest_view(small["reference"])
    if point == "before_final":  # every shard was committed: the rerun only runs the duplicate pass and the final
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{where / 'work' / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("onegen").experiment_id])
        totals = read_manifest(small["reference"], "b")["totals"]
        metrics = run.data.metrics  # the killed attempt's run, continued: the whole build's counts
        assert run.info.status == "FINISHED" and f"mlflow: run {run.info.run_id} " in rerun.stdout
        assert metrics["kept"] == totals["samples"] and metrics["duplicates"] == totals["duplicates"] >= 1
        assert metrics["shards_committed"] == 0 and metrics["shards_skipped"] == totals["shards"]


def whole_and_unique(storage: Storage) -> None:
    """What a reader can see of a build at any moment: committed shards whose files match their entries, no sample
    in two shards."""
    entries = read_entries(storage, "b")
    for entry in entries.values():
        for kind in ("images", "latents"):
            assert sha256_hex(storage.read_bytes(entry["files"][kind]["path"])) == entry["files"][kind]["sha256"]
    ids = [i for entry in entries.values() for i in entry["ids"]]
    assert len(ids) == len(set(ids))


def test_a_rerun_finishes_its_frozen_plan_whatever_the_source_lists_now(tmp_path, ray_head):
    photos = tmp_path / "photos"
    write_odd_folder(photos)
    sources = [{"name": "odd", "type": "folder", "path": str(photos), "partition_size": 4}]

    def config(name: str) -> Path:
        (tmp_path / name).mkdir()
        return write_config(tmp_path / name / "build.yaml", tmp_path / name, sources, conditions={"kinds": ["canny"]})

    ok(run_build(ray_head, config("reference")))
    crashed = config("crashed")
    assert run_build(ray_head, crashed, extra_env={"ONEGEN_CRASH_AT": "before_manifest"}).returncode == -9
    storage = Storage(str(tmp_path / "crashed/data"))
    plan = storage.read_bytes("builds/b/plan.json")

    gone = run_build(ray_head, crashed, f"build.sources[0].path={tmp_path / 'nowhere'}")
    assert gone.returncode == 2, gone.stderr[-3000:]
    assert "source 'odd'" in gone.stderr and "point the source where its inputs are" in gone.stderr

    from PIL import Image
    Image.new("RGB", (96, 96), "teal").save(photos / "zz_added_later.png")
    result = ok(run_build(ray_head, crashed))
    assert "lists other inputs than when this build's plan was frozen" in result.stderr
    assert "build.name=b-v2" in result.stdout  # the note is in the closing table too
    assert storage.read_bytes("builds/b/plan.json") == plan
    assert manifest_view(storage) == manifest_view(Storage(str(tmp_path / "reference/data")))
    assert not any("zz_added_later" in i for e in read_entries(storage, "b").values() for i in e["input_ids"])


def test_an_unknown_crash_point_is_refused(small, ray_head):
    result = run_build(ray_head, small["config"](small["root"] / "unknown-point"),
                       extra_env={"ONEGEN_CRASH_AT": "before_lunch"})
    assert result.returncode == 2 and "ONEGEN_CRASH_AT" in result.stderr and "mid_tar" in result.stderr


def test_a_source_that_is_not_there_is_refused_naming_it(tmp_path, ray_head):
    config = write_config(tmp_path / "build.yaml", tmp_path,
                          [{"name": "mine", "type": "folder", "path": str(tmp_path / "nowhere")}])
    result = run_build(ray_head, config)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "source 'mine'" in result.stderr and "check the folder source's path" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigkills_of_the_driver_group_at_random_moments_then_a_rerun_equals_an_uninterrupted_build(small, ray_head):
    """The driver's whole process group SIGKILLed at random moments (seeded: ONEGEN_KILL_SEED), again and again;
    after every kill what a reader sees is whole, and the run that finally finishes equals an uninterrupted build."""
    import random
    import signal

    from build_runs import REPO, build_command, build_env

    seed = int(os.environ.get("ONEGEN_KILL_SEED", "0"))
    rng = random.Random(seed)
    where = small["root"] / f"killed-{seed}"
    config = small["config"](where)
    storage = Storage(str(where / "data"))
    kills, seen = 0, []  # shards committed when each kill landed
    for attempt in range(8):
        with open(where / f"attempt-{attempt}.log", "wb") as log:
            proc = subprocess.Popen(build_command(config), cwd=REPO, env=build_env(ray_head), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                # A run here: ~4 s to start and join Ray, ~6 s of stages and commits, then shutdown.
                returncode = proc.wait(timeout=rng.uniform(2.0, 9.0))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                kills += 1
                whole_and_unique(storage)
                seen.append(len(read_entries(storage, "b")))
                continue
        assert returncode == 0, (where / f"attempt-{attempt}.log").read_text()[-4000:]
        break
    assert kills >= 2, f"seed {seed}: only {kills} kills landed before a run finished (shards then: {seen})"
    ok(run_build(ray_head, config))  # finishes what the last kill left (or changes nothing)
    whole_and_unique(storage)
    assert manifest_view(storage) == manifest_view(small["reference"])
