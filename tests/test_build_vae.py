"""`onegen build` with diffusers' `AutoencoderKL` as the image tokenizer: a tiny random-weight VAE saved locally (the
release's f=8, 16-channel layout, tests/release_reference/tiny_release.py) encodes a small synthetic build; the
stored posterior mean and std are the VAE's own, after `scaling_factor`, and decode back through its decoder. A
missing or wrong VAE id fails the build at start-up, before anything is planned or written."""

from __future__ import annotations

import time

import pytest
import torch

from build_runs import ok, run_build, write_config
from onegen.dataset import open_build
from onegen.storage import Storage
from pipelines.record import samples_from_wds_tar
from release_reference.tiny_release import tiny_vae

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-vae") / "vae"
    tiny_vae().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vae_build(tmp_path_factory, vae_dir, ray_head):
    root = tmp_path_factory.mktemp("vae-build")
    config = write_config(root / "build.yaml", root, [
        {"name": "synth", "type": "synthetic", "scenes": 4, "views_per_scene": 2, "partition_size": 2, "size": 64}],
        resolutions=[64], decode={"min_size": 32}, conditions={"kinds": ["canny"]},
        encode={"image_tokenizer": str(vae_dir), "batch_size": 4})
    result = ok(run_build(ray_head, config))
    return {"root": root, "result": result, "build": open_build("b", storage_root=str(root / "data"))}


def test_the_vae_latents_are_its_posterior_after_scaling_and_decode_back(vae_build, vae_dir):
    from model.tokenizers import load_image_tokenizer

    build = vae_build["build"]
    vae = load_image_tokenizer(str(vae_dir))
    shard = build.shards()[0]
    rows = list(build.rows([shard]))
    pictures = {s.key: s.image for s in samples_from_wds_tar(build.read_file(shard, "images"))}
    assert len(rows) == 2 and build.complete and build.manifest()["totals"]["rows"] == 4
    for row in rows:
        assert row["image_tokenizer"] == str(vae_dir) and row["downsample_factor"] == 8
        assert len(row["image_tokenizer_sha"]) == 64
        for view in range(row["num_views"]):
            mean, std = row["latents"][(view, "image")]
            assert mean.shape == std.shape == (16, 8, 8) and mean.dtype == torch.float32
            assert float(std.min()) > 0
            picture = torch.from_numpy(pictures[f"{row['id']}-r64-v{view}"].copy())
            image = picture.permute(2, 0, 1)[None].float() / 127.5 - 1  # the [-1, 1] the tokenizers take
            with torch.no_grad():  # diffusers itself, not onegen's wrapper: the posterior, then scaling_factor
                posterior = vae.vae.encode(image).latent_dist
                expected = vae.vae.decode(posterior.mean).sample
            factor = vae.vae.config.scaling_factor
            torch.testing.assert_close(mean, posterior.mean[0] * factor, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(std, posterior.std[0] * factor, rtol=1e-4, atol=1e-5)
            decoded = vae.decode(mean[None])  # divides by scaling_factor: the decoder sees the raw posterior mean
            assert decoded.shape == (1, 3, 64, 64)
            torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)
        canny_mean, canny_std = row["latents"][(0, "canny")]
        assert canny_mean.shape == (16, 8, 8) and float(canny_std.min()) > 0


def test_a_missing_or_wrong_vae_fails_at_start_up_with_one_line(tmp_path, ray_head):
    not_a_vae = tmp_path / "not-a-vae"
    not_a_vae.mkdir()
    (not_a_vae / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    for spec in (str(tmp_path / "no-such-vae"), "nobody-here/no-such-vae", str(not_a_vae)):
        config = write_config(tmp_path / "build.yaml", tmp_path, [
            {"name": "synth", "type": "synthetic", "scenes": 2, "size": 64}], resolutions=[64],
            encode={"image_tokenizer": spec})
        start = time.perf_counter()
        result = run_build(ray_head, config, timeout=120, extra_env={"HF_HUB_OFFLINE": "1"})
        elapsed = time.perf_counter() - start
        assert result.returncode == 2, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "build.encode.image_tokenizer" in lines[0] and spec in lines[0], lines
        assert "'pixel'" in lines[0] and elapsed < 60
        assert not Storage(str(tmp_path / "data")).exists("builds/b/build.json")  # refused before anything


def test_inspect_decodes_the_rows_with_the_vae_they_name(vae_build, vae_dir, tmp_path):
    import json
    import shutil

    from model.tokenizers import load_image_tokenizer
    from pipelines.inspect_build import Tokenizers, decode_views, inspect_build

    build = vae_build["build"]
    inspection = inspect_build(build.uri, str(tmp_path / "sheet.png"), samples=2, cell=64)
    assert inspection.sheet and not inspection.warnings and len({c["id"] for c in inspection.cells}) == 2
    rows = {row["id"]: row for row in build.rows(as_tensors=False)}
    for row_id in {c["id"] for c in inspection.cells}:  # every view and modality of the row, each a whole picture
        cells = [c for c in inspection.cells if c["id"] == row_id]
        assert {(c["view"], c["modality"]) for c in cells} == set(rows[row_id]["latents"])
        assert all(c["box"][2] - c["box"][0] == c["box"][3] - c["box"][1] == 64 for c in cells)
    row = next(iter(rows.values()))
    pictures = decode_views(row, Tokenizers().get(row["image_tokenizer"], row["image_tokenizer_sha"]))
    mean = torch.from_numpy(row["latents"][(1, "image")][0].copy())
    with torch.no_grad():
        decoded = load_image_tokenizer(str(vae_dir)).decode(mean[None])
    expected = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert pictures[(1, "image")].shape == (64, 64, 3) and (pictures[(1, "image")] == expected).all()
    changed = tmp_path / "changed-vae"  # the folder the rows name was edited after the build
    shutil.copytree(vae_dir, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps(dict(config, scaling_factor=1.0)))
    tokenizers = Tokenizers()
    tokenizers.get(str(changed), row["image_tokenizer_sha"])
    assert len(tokenizers.warnings) == 1 and "another config" in tokenizers.warnings[0]


def test_a_hub_id_is_encoded_at_the_commit_the_driver_resolved(vae_dir, tmp_path, monkeypatch):
    """A hub id (here from a local Hugging Face cache, offline): the driver's check resolves it to a commit, the
    encoder actors load exactly that commit, and rows name it (`owner/name@commit`) with the config's sha256."""
    import hashlib
    import shutil

    import huggingface_hub.constants

    from onegen.build_config import BuildConfig
    from onegen.config import load_config
    from pipelines.process import ViewEncoder, check_image_tokenizer

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--onegen-test--tiny-vae"
    shutil.copytree(vae_dir, repo / "snapshots" / commit / "vae")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = write_config(tmp_path / "build.yaml", tmp_path, [{"name": "synth", "type": "synthetic"}],
                          encode={"image_tokenizer": "onegen-test/tiny-vae"})
    cfg = load_config(config, [], BuildConfig)
    assert check_image_tokenizer(cfg) == commit
    encoder = ViewEncoder(cfg, revision=commit)
    assert encoder.tokenizer.downsample_factor == 8
    sha = hashlib.sha256((vae_dir / "config.json").read_bytes()).hexdigest()
    assert encoder.identity == (f"onegen-test/tiny-vae@{commit}", sha)
    from pipelines.inspect_build import Tokenizers  # inspect loads what the rows name, offline, at that commit

    tokenizers = Tokenizers()
    assert tokenizers.get(encoder.identity[0], sha).downsample_factor == 8 and not tokenizers.warnings
