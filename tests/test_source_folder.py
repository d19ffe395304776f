"""The folder source's plan: what counts as an input, read from one listing."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from pipelines.sources.folder import plan_folder_partitions


def test_a_symlink_loop_never_multiplies_an_input(tmp_path):
    Image.new("RGB", (80, 80), "red").save(tmp_path / "photo.jpg")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (80, 80), "blue").save(tmp_path / "sub" / "b.png")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")        # the tree again, until ELOOP
    os.symlink(tmp_path / "photo.jpg", tmp_path / "alias.jpg")  # one file under two names
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    entries = [e["path"] for spec in plan_folder_partitions(str(tmp_path), 100) for e in spec["entries"]]
    assert entries == ["alias.jpg", "sub/b.png"]  # one name per real file: the shortest, then the first in order


def test_a_wrong_path_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files there"):
        plan_folder_partitions(str(tmp_path / "nowhere"), 10)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        plan_folder_partitions(str(tmp_path), 10)
