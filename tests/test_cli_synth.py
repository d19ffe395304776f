"""`onegen synth render|sheet` (onegen.cli.synth): folders, WebDataset shards, contact sheets."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
from PIL import Image
from tqdm import tqdm

from onegen.storage import Storage
from pipelines.record import Sample, read_sample_files, samples_from_wds_tar
from onegen.cli import synth as synthetic_cli
from pipelines.sources.synthetic import resolve_config, shard_name, shard_settings_digest, synthetic_samples


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments `synthetic_cli.run` takes (`main` also turns what `run` raises into messages and exit codes)."""
    parser = argparse.ArgumentParser(prog="onegen synth")
    synthetic_cli.add_arguments(parser)
    return parser.parse_args(argv)


def names(seed: int, counts_by_start: dict[int, int], **config) -> list[str]:
    """The shard names the CLI gives scenes [start, start + count) rendered with `config` (png)."""
    resolved = resolve_config(**config)
    return [shard_name(seed, start, shard_settings_digest(count, resolved)) for start, count in counts_by_start.items()]


def test_render_to_folder_writes_scenes_times_views_samples(tmp_path):
    out = tmp_path / "folder"
    assert synthetic_cli.main(["render", "--scenes", "2", "--views", "3", "--size", "32", "--seed", "4",
                               "--out", str(out)]) == 0
    keys = sorted(p.name[: -len(".json")] for p in out.glob("*.json"))
    assert len(keys) == 6
    for key in keys:
        s = read_sample_files(out, key).validate()
        assert s.image.shape == (32, 32, 3) and s.group == key.rsplit("-", 1)[0]


def test_render_to_webdataset_shards_reads_back_with_webdataset(tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    args = ["render", "--scenes", "3", "--views", "2", "--size", "32", "--seed", "1", "--out", str(out),
            "--format", "wds", "--scenes-per-shard", "2"]
    assert synthetic_cli.main(args) == 0
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == names(1, {0: 2, 2: 1}, views_per_scene=2, size=32)
    assert all(p.name.startswith(f"synthetic-1-{start:06d}-") for p, start in zip(shards, (0, 2)))
    assert not list(out.glob(".*.tmp"))
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    samples = [Sample.from_wds(d).validate() for d in wds.WebDataset([str(p) for p in shards], shardshuffle=False)]
    assert len(samples) == 6 and len({s.key for s in samples}) == 6
    groups = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s.meta["view_index"])
    assert sorted(groups.values()) == [[0, 1]] * 3  # the views of a scene stay together
    before = [p.read_bytes() for p in shards]
    assert synthetic_cli.main(args) == 0
    assert [p.read_bytes() for p in shards] == before  # same arguments, same shard bytes


def test_sheet_writes_a_png(tmp_path):
    out = tmp_path / "sheet.png"
    assert synthetic_cli.main(["sheet", "--out", str(out), "--scenes", "1", "--views", "2", "--size", "32"]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape[1] == 4 * 32 + 3 * 2 and img.shape[0] > 2 * 32  # RGB | depth | segmentation | pose
    assert img.std() > 10


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    assert synthetic_cli.main(["render", "--scenes", "0", "--out", str(tmp_path)]) == 2
    assert "--scenes must be >= 1" in capsys.readouterr().err


def test_add_arguments_plugs_into_a_parent_cli():
    parser = argparse.ArgumentParser(prog="onegen")
    synth = parser.add_subparsers(dest="command").add_parser("synth")
    synthetic_cli.add_arguments(synth)
    args = parser.parse_args(["synth", "sheet", "--scenes", "2"])
    assert args.synth_command == "sheet" and args.scenes == 2 and args.views == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", "render"])  # --out is required


def test_skip_existing_leaves_existing_shards_untouched(tmp_path):
    out = tmp_path / "wds"
    args = ["render", "--scenes", "2", "--views", "1", "--size", "16", "--seed", "2", "--out", str(out),
            "--format", "wds", "--scenes-per-shard", "1"]
    assert synthetic_cli.main(args) == 0
    first, second = (out / name for name in names(2, {0: 1, 1: 1}, views_per_scene=1, size=16))
    complete = second.read_bytes()
    first.write_bytes(b"left alone")
    second.unlink()
    assert synthetic_cli.main(args + ["--skip-existing"]) == 0
    assert first.read_bytes() == b"left alone" and second.read_bytes() == complete
    assert synthetic_cli.main(args) == 0  # without it, shards are rewritten
    assert samples_from_wds_tar(first.read_bytes())[0].key == "synthetic-2-000000-v00"


def test_skip_existing_renders_shards_of_other_settings_instead_of_keeping_stale_ones(tmp_path):
    out = tmp_path / "wds"
    base = ["render", "--scenes", "2", "--views", "1", "--seed", "3", "--out", str(out), "--format", "wds",
            "--scenes-per-shard", "1", "--skip-existing"]

    def image_sizes() -> dict[str, set[int]]:
        return {p.name: {s.image.shape[0] for s in samples_from_wds_tar(p.read_bytes())} for p in out.glob("*.tar")}

    assert synthetic_cli.main(base + ["--size", "32"]) == 0
    small = sorted(image_sizes())
    assert synthetic_cli.main(base + ["--size", "48"]) == 0
    sizes = image_sizes()
    large = sorted(set(sizes) - set(small))
    assert len(large) == 2 and all(sizes[name] == {48} for name in large)  # rendered, not the stale 32 px shards
    assert all(sizes[name] == {32} for name in small)  # shards of other settings are left as they are

    # identical settings: every shard skipped, bytes and mtimes untouched
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    assert synthetic_cli.main(base + ["--size", "48"]) == 0
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")} == before


@pytest.mark.parametrize("change", [
    dict(views_per_scene=2), dict(size=48), dict(with_figures=False), dict(num_scenes=3), dict(image_format="jpg"),
])
def test_every_setting_that_changes_a_shard_changes_its_name(change):
    settings = dict(views_per_scene=1, size=32, with_figures=True)
    num_scenes, image_format = change.pop("num_scenes", 2), change.pop("image_format", "png")
    reference = shard_settings_digest(2, resolve_config(**settings))
    digest = shard_settings_digest(num_scenes, resolve_config(**{**settings, **change}), image_format)
    assert digest != reference and len(digest) == 8
    assert shard_settings_digest(2, resolve_config(**settings)) == reference  # deterministic
    assert shard_name(0, 7, digest) == f"synthetic-0-000007-{digest}.tar"


def test_scale_below_one_is_a_value_error_naming_the_option(tmp_path, capsys):
    out = tmp_path / "sheet.png"
    with pytest.raises(ValueError, match="--scale"):  # `run` raises; `main` reports it (below, as `onegen` does)
        synthetic_cli.run(parse(["sheet", "--out", str(out), "--scenes", "1", "--views", "1", "--size", "16",
                                 "--scale", "0"]))
    from onegen.cli import main as onegen_main

    capsys.readouterr()
    assert onegen_main(["synth", "sheet", "--out", str(out), "--scale", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onegen synth: error: --scale must be") and "\n" not in err
    assert not out.exists()


def test_progress_bar_is_closed_when_rendering_fails(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("render failed")

    from pipelines.sources import synthetic

    monkeypatch.setattr(synthetic, "render_shard_bytes", fail)
    before = set(tqdm._instances)
    with pytest.raises(RuntimeError, match="render failed") as failure:
        synthetic_cli.run(parse(["render", "--scenes", "1", "--views", "1", "--size", "16", "--out", str(tmp_path),
                                 "--format", "wds"]))
    # the traceback (kept alive by `failure`) still references the bar: only an explicit close unregisters it
    assert failure.traceback and set(tqdm._instances) == before
    assert list(tmp_path.iterdir()) == []  # and no partial shard


def test_render_and_sheet_to_s3(moto_endpoint, aws_env, make_bucket, monkeypatch, tmp_path):
    aws_env.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    bucket = make_bucket()
    monkeypatch.chdir(tmp_path)  # a URI taken for a local path would show up here as a folder "s3:"

    root = f"s3://{bucket}/synth"
    args = ["render", "--scenes", "2", "--views", "2", "--size", "16", "--seed", "6", "--out", root,
            "--format", "wds", "--scenes-per-shard", "1"]
    assert synthetic_cli.main(args) == 0
    storage = Storage(root)
    shards = names(6, {0: 1, 1: 1}, views_per_scene=2, size=16)
    assert storage.list() == shards
    back = [s for name in storage.list() for s in samples_from_wds_tar(storage.read_bytes(name))]
    expected = list(synthetic_samples(6, 2, config=resolve_config(views_per_scene=2, size=16)))
    assert len(back) == 4 and all(b.differences(e) == [] for b, e in zip(back, expected))

    storage.write_bytes(shards[0], b"left alone")  # --skip-existing asks Storage.exists
    assert synthetic_cli.main(args + ["--skip-existing"]) == 0
    assert storage.read_bytes(shards[0]) == b"left alone"

    folder = f"s3://{bucket}/folder"
    assert synthetic_cli.main(["render", "--scenes", "1", "--views", "1", "--size", "16", "--seed", "6",
                               "--out", folder]) == 0
    one_view = next(synthetic_samples(6, 1, config=resolve_config(views_per_scene=1, size=16)))
    assert read_sample_files(folder, one_view.key).differences(one_view) == []

    assert synthetic_cli.main(["sheet", "--out", f"s3://{bucket}/sheets/sheet.png", "--scenes", "1", "--views",
                               "1", "--size", "16"]) == 0
    sheet = np.asarray(Image.open(io.BytesIO(Storage(f"s3://{bucket}").read_bytes("sheets/sheet.png"))))
    assert sheet.shape[1] == 4 * 16 + 3 * 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("s3")]  # nothing went to a local "s3:"
