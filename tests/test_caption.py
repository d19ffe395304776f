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
from onegen.shards import read_entries
from onegen.storage import Storage
from tests.build_runs import REPO, ok, run_build, write_config
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


def narrow(records: list[dict]) -> list[dict]:
    """The third picture cut to 64 x 40: LLaVA-NeXT gives it fewer image tokens, so a batch pads its prompt."""
    sample = records[2]["outputs"][-1]["samples"][0]
    sample.image = sample.image[:, :40].copy()
    return records


def test_the_caption_stage_describes_each_sample_and_counts_what_it_fails_on(vlm_dir):
    from pipelines.caption import Stage, preflight
    from pipelines.process import conditions_record, pack_members

    cfg = caption_cfg(vlm_dir)
    assert preflight(cfg.build.caption) == {"revision": None, "files": None}
    stage = Stage(cfg, {"revision": None})
    assert INSTRUCTION in stage.prompt and "<image>" in stage.prompt
    records = bucketed_records(cfg)
    assert len(records) == 3
    narrow(records)
    records[1]["outputs"][-1]["samples"][0].image = np.zeros((0, 64, 3), np.uint8)  # the processor fails on it
    calls = []
    generate = stage.model.generate

    def spy(**inputs):
        out = generate(**inputs)
        calls.append((tuple(inputs["input_ids"].shape), tuple(inputs["pixel_values"].shape), tuple(out.shape)))
        return out

    stage.model.generate = spy
    stage.label_records(records)
    # The batch of three fails in the processor, then each record alone: two calls of one image, 6 new tokens each.
    assert [(ids[0], pixels[0], out[0], out[1] - ids[1]) for ids, pixels, out in calls] == [(1, 1, 1, 6)] * 2
    # The tiny model never writes its end-of-sequence token: every caption runs into the 6-token budget.
    assert [r["labels"]["caption"] for r in records] == ["truncated", "error", "truncated"]
    assert "error" not in [r["dropped"] for r in records] and not any(r["dropped"] for r in records)
    assert records[1]["label_errors"]["caption"] and "label_values" not in records[1]
    texts = [records[i]["label_values"]["caption"] for i in (0, 2)]
    assert all(1 <= len(text.split()) <= 6 for text in texts), texts
    calls.clear()
    again = narrow(bucketed_records(cfg))
    stage.label_records(again)  # one batch of three (left-padded prompts): the same greedy captions as alone
    assert [(ids[0], pixels[0], out[0], out[1] - ids[1]) for ids, pixels, out in calls] == [(3, 3, 3, 6)]
    assert [again[i]["label_values"]["caption"] for i in (0, 2)] == texts
    assert [r["labels"]["caption"] for r in again] == ["truncated"] * 3
    stage.model.generate = generate
    records[1]["outputs"][-1]["samples"][0].image = again[1]["outputs"][-1]["samples"][0].image
    for record in records[:2]:  # (the third, narrowed, no longer matches its labels)
        conditions_record(cfg, record)
        pack_members(cfg, record)
    row = records[0]["rows"][0]
    origins = {(c["name"], c["origin"]) for c in row["captions"]}
    assert ("vlm", "generated") in origins and any(origin == "source" for _, origin in origins)
    meta = json.loads(records[0]["members"][0]["json"])["meta"]["build"]
    assert meta["labels"] == {"caption": "truncated"} and {"name": "vlm", "text": texts[0],
                                                           "origin": "generated"} in meta["captions"]
    assert all(c["origin"] == "source" for c in records[1]["rows"][0]["captions"])  # failed: the source's only


def test_the_end_of_sequence_token_ends_a_caption_as_ok(vlm_dir, tmp_path):
    import shutil

    from pipelines.caption import Stage

    cfg = caption_cfg(vlm_dir)
    records = bucketed_records(cfg)[:1]
    Stage(cfg, {"revision": None}).label_records(records)
    words = records[0]["label_values"]["caption"].split()
    assert len(words) == 6  # the tiny model never writes its own end-of-sequence token
    stops = tmp_path / "stops"  # the same model, whose generation config also ends at the caption's third word
    shutil.copytree(vlm_dir, stops)
    config = json.loads((stops / "generation_config.json").read_text())
    stage = Stage(cfg, {"revision": None})
    config["eos_token_id"] = [config["eos_token_id"], stage.processor.tokenizer.convert_tokens_to_ids(words[2])]
    (stops / "generation_config.json").write_text(json.dumps(config))
    records = bucketed_records(cfg)[:1]
    Stage(caption_cfg(stops), {"revision": None}).label_records(records)
    assert records[0]["labels"] == {"caption": "ok"}
    assert records[0]["label_values"]["caption"].split() == words[:words.index(words[2]) + 1]


def test_a_model_that_cannot_run_stops_the_actor_with_one_line(vlm_dir, tmp_path):
    import shutil

    from pipelines.caption import Stage
    from pipelines.labelers import START_FAILED

    cut = tmp_path / "cut-short"
    shutil.copytree(vlm_dir, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="^build.caption: its model .*cut-short.* could not start on node .*"
                                           "SafetensorError") as err:
        Stage(caption_cfg(cut), {"revision": None})
    assert "\n" not in str(err.value) and START_FAILED.fullmatch(str(err.value))
    with pytest.raises(RuntimeError, match="num_gpus=1 but this worker sees no GPU"):
        Stage(caption_cfg(vlm_dir, "build.caption.num_gpus=1"), {"revision": None})


def test_preflight_names_what_is_wrong_with_the_model(vlm_dir, tmp_path):
    import shutil

    from pipelines.caption import preflight

    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        preflight(caption_cfg(tmp_path / "no-such-folder").build.caption)
    not_a_vlm = tmp_path / "not-a-vlm"
    not_a_vlm.mkdir()
    (not_a_vlm / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="which AutoModelForImageTextToText cannot load"):
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
    entries = read_entries(storage, "b")
    assert [e["labelled_by"] for e in entries.values()] == [{"caption": [f"{vlm_dir} float32"]}] * 2
    assert json.loads(storage.read_bytes("builds/b/plan.json"))["labelers"] == {
        "caption": {"revision": None, "files": None}}
    rows = list(build.rows(as_tensors=False))
    assert len(rows) == 4
    for row in rows:
        generated = [c for c in row["captions"] if c["origin"] == "generated"]
        assert len(generated) == 1 and generated[0]["name"] == "vlm" and 1 <= len(generated[0]["text"].split()) <= 5
        assert any(c["origin"] == "source" for c in row["captions"])
        assert {(0, "image"), (0, "canny")} <= set(row["latents"])


def test_a_missing_caption_model_fails_the_build_in_seconds_with_one_line(tmp_path, ray_head):
    for model, fix in (("nobody-here/no-such-vlm", "`huggingface-cli download` or `git clone` of the repo) and pass "
                                                "its local path instead"),
                       (str(tmp_path / "no-such-vlm"), "neither a local folder nor a hub repo id")):
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
        assert fix in lines[0], lines


def test_a_stage_no_node_can_run_fails_at_start_up_naming_its_resources(vlm_dir, tmp_path, ray_head):
    config = write_config(tmp_path / "build.yaml", tmp_path, [
        {"name": "synth", "type": "synthetic", "scenes": 2, "size": 64}], resolutions=[64],
        caption={"enabled": True, "model": str(vlm_dir), "num_gpus": 64, "preflight_timeout_s": 3})
    result = run_build(ray_head, config, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and not RAY_LOG.match(line)]
    assert len(lines) == 1 and "build.caption" in lines[0] and "num_gpus=64" in lines[0], lines
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
    # A build config that never names the stage hashes as it did before the stage existed (commit 5403660).
    small = load_config(REPO / "configs/build/synthetic_small.yaml", schema=BuildConfig)
    assert content_hash(small) == "cae128c6955c7d2833336e28dc4e247a357bb03d5382522acd476e2b9a6d790d"


def test_the_readme_shows_the_caption_defaults():
    import yaml

    from onegen.build_config import CaptionSection
    from tests.test_readme import fenced_block

    shown = yaml.safe_load(fenced_block("### Captions from a vision-language model", "yaml"))["build"]["caption"]
    assert CaptionSection(**shown) == CaptionSection() and set(shown) == set(CaptionSection.model_fields) - {"backend"}


def test_a_hub_id_is_resolved_to_a_commit_that_every_actor_loads(vlm_dir, tmp_path, monkeypatch):
    """A hub id from a local Hugging Face cache, offline: the preflight resolves it to the commit (reading only the
    small files), the actors load that commit and name it; a cache without the weights is refused up front."""
    import shutil

    import huggingface_hub.constants

    from pipelines.caption import Stage, preflight

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--onegen-test--tiny-vlm"
    shutil.copytree(vlm_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = caption_cfg("onegen-test/tiny-vlm")
    resolved = preflight(cfg.build.caption)
    assert resolved["revision"] == commit and "model.safetensors" in resolved["files"]
    stage = Stage(cfg, resolved)
    assert stage.identity == f"onegen-test/tiny-vlm@{commit} float32"
    records = stage.label_records(bucketed_records(cfg)[:1])
    assert records[0]["labels"] == {"caption": "truncated"} and records[0]["labelled_by"] == {
        "caption": stage.identity}
    (repo / "snapshots" / commit / "model.safetensors").unlink()  # only the config files are cached
    with pytest.raises(FileNotFoundError, match="no weights"):
        preflight(cfg.build.caption)


def test_an_actor_start_failure_reaches_the_user_as_its_own_line():
    from onegen.errors import UsageError
    from pipelines.labelers import one_line_start_failures

    line = "build.caption: its model 'm' could not start on node n7 (OSError: gone); check the model folder there"
    wrapped = RuntimeError(f"The actor died because of an error raised in its creation task, \x1b[36mray::Map"
                           f"\x1b[39m\n  Traceback ...\nRuntimeError: {line}\n\nmore")

    def stream(err):
        yield 1
        raise err

    with pytest.raises(UsageError) as caught:
        list(one_line_start_failures(stream(wrapped)))
    assert str(caught.value) == line
    with pytest.raises(KeyError):  # anything else passes through as it was
        list(one_line_start_failures(stream(KeyError("x"))))
