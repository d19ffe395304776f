"""The caption labeler (pipelines/caption.py) on a tiny random-weight LLaVA-NeXT saved locally (tests/tiny_vlm.py):
in process, and inside a build run as a user runs it."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from onegen.build_config import BuildConfig
from onegen.config import load_config
from onegen.storage import Storage
from tests.build_runs import ok, run_build, write_config
from tests.tiny_vlm import save_tiny_llava_next

RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING) ")  # Ray's own start-up lines
INSTRUCTION = "Describe the contents of the photo in 150 words or fewer."


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return save_tiny_llava_next(tmp_path_factory.mktemp("vlm") / "tiny-llava-next")


def caption_cfg(model, *overrides: str) -> BuildConfig:
    return load_config(None, ["run.name=b", "build.resolutions=[64]", "build.decode.min_size=32",
                              "build.sources=[{name: synth, type: synthetic, scenes: 3, size: 64, partition_size: 3}]",
                              "build.caption.enabled=true", f"build.caption.model={model}",
                              "build.caption.max_new_tokens=6", *overrides], BuildConfig)


def bucketed_records(cfg: BuildConfig) -> list[dict]:
    from pipelines.ingest import plan_partitions, read_partition
    from pipelines.process import bucket_record, decode_record, timed_stage

    records, _ = read_partition(cfg, plan_partitions(cfg)[0])
    timed_stage("decode", records, lambda r: decode_record(cfg, r))
    timed_stage("bucket", records, lambda r: bucket_record(cfg, r))
    return records


def test_the_caption_stage_describes_each_sample_and_counts_what_it_fails_on(vlm_dir):
    from pipelines.caption import Stage, preflight
    from pipelines.process import conditions_record, pack_members

    cfg = caption_cfg(vlm_dir)
    assert preflight(cfg.build.caption) == {"revision": None}
    stage = Stage(cfg, {"revision": None})
    assert INSTRUCTION in stage.prompt and "<image>" in stage.prompt
    records = bucketed_records(cfg)
    assert len(records) == 3
    records[1]["outputs"][-1]["samples"][0].image = np.zeros((0, 64, 3), np.uint8)  # the processor fails on it
    stage.label_records(records)
    # The tiny model never writes its end-of-sequence token: every caption runs into the 6-token budget.
    assert [r["labels"]["caption"] for r in records] == ["truncated", "error", "truncated"]
    assert "error" not in [r["dropped"] for r in records] and not any(r["dropped"] for r in records)
    assert records[1]["label_errors"]["caption"] and "generated_captions" not in records[1]
    texts = [records[i]["generated_captions"]["vlm"] for i in (0, 2)]
    assert all(1 <= len(text.split()) <= 6 for text in texts), texts
    again = bucketed_records(cfg)
    stage.label_records(again[:1])  # alone, not in a batch of three (left padding): the same greedy caption
    assert again[0]["generated_captions"]["vlm"] == texts[0]
    records[1]["outputs"][-1]["samples"][0].image = again[1]["outputs"][-1]["samples"][0].image
    for record in records:
        conditions_record(cfg, record)
        pack_members(cfg, record)
    row = records[0]["rows"][0]
    origins = {(c["name"], c["origin"]) for c in row["captions"]}
    assert ("vlm", "generated") in origins and any(origin == "source" for _, origin in origins)
    meta = json.loads(records[0]["members"][0]["json"])["meta"]["build"]
    assert meta["labels"] == {"caption": "truncated"} and {"name": "vlm", "text": texts[0],
                                                           "origin": "generated"} in meta["captions"]
    assert all(c["origin"] == "source" for c in records[1]["rows"][0]["captions"])  # failed: the source's only


def test_an_eos_ends_a_caption_as_ok(vlm_dir):
    from pipelines.caption import Stage

    cfg = caption_cfg(vlm_dir)
    stage = Stage(cfg, {"revision": None})
    records = bucketed_records(cfg)[:1]
    stage.label_records(records)
    first_word = records[0]["generated_captions"]["vlm"].split()[0]
    stage.eos = {stage.processor.tokenizer.convert_tokens_to_ids(first_word)}  # its first word now ends it
    records = bucketed_records(cfg)[:1]
    stage.label_records(records)
    assert records[0]["labels"] == {"caption": "ok"}


def test_preflight_names_what_is_wrong_with_the_model(vlm_dir, tmp_path):
    import shutil

    from pipelines.caption import preflight

    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        preflight(caption_cfg(tmp_path / "no-such-folder").build.caption)
    not_a_vlm = tmp_path / "not-a-vlm"
    not_a_vlm.mkdir()
    (not_a_vlm / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not an image-text-to-text"):
        preflight(caption_cfg(not_a_vlm).build.caption)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(vlm_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        preflight(caption_cfg(no_weights).build.caption)
    no_template = tmp_path / "no-template"
    shutil.copytree(vlm_dir, no_template)
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        preflight(caption_cfg(no_template).build.caption)


def test_a_build_captions_every_kept_sample(vlm_dir, tmp_path, ray_head):
    from onegen.dataset import Build

    config = write_config(tmp_path / "build.yaml", tmp_path, [
        {"name": "synth", "type": "synthetic", "scenes": 4, "size": 64, "partition_size": 2}], resolutions=[64],
        decode={"min_size": 32}, conditions={"kinds": ["canny"]},
        caption={"enabled": True, "model": str(vlm_dir), "max_new_tokens": 5, "batch_size": 3, "num_cpus": 0.5})
    result = ok(run_build(ray_head, config))
    assert "caption labels: 4 truncated" in result.stdout, result.stdout
    storage = Storage(str(tmp_path / "data"))
    build = Build(storage, "b")
    manifest = build.manifest()
    assert manifest["totals"]["labels"] == {"caption": {"truncated": 4}} and manifest["totals"]["samples"] == 4
    rows = list(build.rows(as_tensors=False))
    assert len(rows) == 4
    for row in rows:
        generated = [c for c in row["captions"] if c["origin"] == "generated"]
        assert len(generated) == 1 and generated[0]["name"] == "vlm" and 1 <= len(generated[0]["text"].split()) <= 5
        assert any(c["origin"] == "source" for c in row["captions"])
        assert {(0, "image"), (0, "canny")} <= set(row["latents"])


def test_a_missing_caption_model_fails_the_build_in_seconds_with_one_line(tmp_path, ray_head):
    for model in ("nobody-here/no-such-vlm", str(tmp_path / "no-such-vlm")):
        config = write_config(tmp_path / "build.yaml", tmp_path, [
            {"name": "synth", "type": "synthetic", "scenes": 2, "size": 64}], resolutions=[64],
            caption={"enabled": True, "model": model, "num_cpus": 0.5})
        start = time.perf_counter()
        result = run_build(ray_head, config, timeout=120, extra_env={"HF_HUB_OFFLINE": "1"})
        elapsed = time.perf_counter() - start
        assert result.returncode == 2, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip() and not RAY_LOG.match(line)]
        assert len(lines) == 1 and "build.caption.model" in lines[0] and model in lines[0], lines
        assert "caption stage" in lines[0]
        assert elapsed < 60, elapsed
        assert not Storage(str(tmp_path / "data")).exists("builds/b/build.json")  # refused before anything
    assert "huggingface-cli download" in lines[0] or "local" in lines[0]


def test_a_stage_no_node_can_run_fails_at_start_up_naming_its_resources(vlm_dir, tmp_path, ray_head):
    config = write_config(tmp_path / "build.yaml", tmp_path, [
        {"name": "synth", "type": "synthetic", "scenes": 2, "size": 64}], resolutions=[64],
        caption={"enabled": True, "model": str(vlm_dir), "num_gpus": 1, "preflight_timeout_s": 3})
    result = run_build(ray_head, config, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and not RAY_LOG.match(line)]
    assert len(lines) == 1 and "build.caption" in lines[0] and "num_gpus=1" in lines[0], lines
    assert not Storage(str(tmp_path / "data")).exists("builds/b/build.json")


def test_caption_settings_change_the_content_hash_only_when_the_stage_runs(vlm_dir):
    from onegen.config import content_hash

    off = caption_cfg(vlm_dir, "build.caption.enabled=false")
    assert content_hash(off) == content_hash(caption_cfg("other/model", "build.caption.enabled=false",
                                                         "build.caption.max_new_tokens=9"))
    on = caption_cfg(vlm_dir)
    assert content_hash(on) != content_hash(off)
    assert content_hash(on) != content_hash(caption_cfg(vlm_dir, "build.caption.instruction=Name the objects."))
    assert content_hash(on) == content_hash(caption_cfg(vlm_dir, "build.caption.batch_size=16",
                                                        "build.caption.concurrency=2"))  # how it runs: runtime


def test_the_readme_shows_the_caption_defaults():
    import yaml

    from onegen.build_config import CaptionSection
    from tests.test_readme import fenced_block

    shown = yaml.safe_load(fenced_block("### Captions from a vision-language model", "yaml"))["build"]["caption"]
    assert CaptionSection(**shown) == CaptionSection() and set(shown) == set(CaptionSection.model_fields) - {"backend"}
