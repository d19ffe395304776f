"""`onegen synth render|sheet` (pipelines.sources.synthetic_cli): folders, WebDataset shards, contact sheets."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from pipelines.record import Sample, read_sample_files
from pipelines.sources import synthetic_cli


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
    assert [p.name for p in shards] == ["synthetic-1-000000.tar", "synthetic-1-000002.tar"]
    assert not list(out.glob(".*.tmp"))
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
