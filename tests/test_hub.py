"""Loading from a hub id that cannot be fetched names the id and the fix (no bare connection error)."""

from __future__ import annotations

import pytest

from model.hub import resolve_pretrained_folder
from model.nextdit import NextDiT
from model.pipeline import OneDiffusionPipeline


def test_local_folder_is_used_as_is(tmp_path):
    assert resolve_pretrained_folder(tmp_path) == tmp_path


def test_a_name_that_is_neither_a_folder_nor_a_repo_id_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub repo id"):
        resolve_pretrained_folder(tmp_path / "missing" / "deeper" / "folder")


@pytest.mark.parametrize("load", [OneDiffusionPipeline.from_pretrained, NextDiT.from_pretrained])
def test_unreachable_hub_repo_names_the_id_and_the_fix(load, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here either way; offline mode answers at once
    with pytest.raises(FileNotFoundError, match=r"onegen-test/not-a-real-repo.*pass its local path"):
        load("onegen-test/not-a-real-repo", cache_dir=str(tmp_path))


def test_a_mistyped_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    (tmp_path / "work" / "pipeline").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"work/pipelin: no such folder \(in work: \['pipeline'\]\)"):
        resolve_pretrained_folder("work/pipelin")


@pytest.mark.parametrize("loader", ["vae", "t5"])
def test_tokenizer_loaders_report_unreachable_hub_repos_the_same_way(loader, tmp_path, monkeypatch):
    from model.tokenizers import T5TextEncoder, VAETokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load = VAETokenizer.from_pretrained if loader == "vae" else T5TextEncoder.from_pretrained
    with pytest.raises(FileNotFoundError, match=r"onegen-test/not-a-real-repo.*pass its local path"):
        load("onegen-test/not-a-real-repo")
