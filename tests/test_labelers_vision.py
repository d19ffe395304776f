"""The depth and segmentation labellers (pipelines/depth_estimation.py, pipelines/segmentation.py) on tiny
random-weight models of the real transformers classes saved locally (tests/tiny_vision.py), over real photographs
(scikit-image's) and the synthetic world: in process, and inside a build run as a user runs it. Also the renderers'
exactness on the synthetic world's labels (one drawing whatever made the label)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from model.conditions import box_condition, hex_to_rgb, inverse_depth_condition, mask_box
from onegen.build_config import BuildConfig
from onegen.config import load_config
from tests.tiny_vision import save_tiny_depth_anything, save_tiny_mask2former

PHOTOS = ("astronaut", "coffee", "chelsea")  # scikit-image's bundled photographs, no download


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory):
    return save_tiny_depth_anything(tmp_path_factory.mktemp("depth") / "tiny-depth-anything")


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory):
    return save_tiny_mask2former(tmp_path_factory.mktemp("seg") / "tiny-mask2former", seed=3)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    return folder


def vision_cfg(photos, *overrides: str) -> BuildConfig:
    sources = (f"build.sources=[{{name: photos, type: folder, path: '{photos}', partition_size: 3}}, "
               "{name: synth, type: synthetic, scenes: 2, size: 64, partition_size: 2}]")
    return load_config(None, ["run.name=b", "build.resolutions=[64]", "build.decode.min_size=32", sources,
                              "build.conditions.kinds=[canny]", *overrides], BuildConfig)


def bucketed(cfg: BuildConfig) -> list[dict]:
    """Every partition's records, decoded and bucketed: what a labeller actor receives."""
    from pipelines.ingest import plan_partitions, read_partition
    from pipelines.process import run_stages

    records = []
    for partition in plan_partitions(cfg):
        part, _ = read_partition(cfg, partition)
        records += run_stages(("decode", "bucket"), part, cfg)
    return records


def by_source(records: list[dict]) -> tuple[list[dict], list[dict]]:
    return [r for r in records if r["source"] == "photos"], [r for r in records if r["source"] == "synth"]


# --- depth -----------------------------------------------------------------------------------------------------


def test_depth_labels_every_photo_with_the_models_own_estimate_and_keeps_exact_depth(depth_dir, photo_dir):
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from model.conditions import depth_condition
    from pipelines.depth_estimation import Stage, preflight
    from pipelines.process import conditions_record, pack_members

    cfg = vision_cfg(photo_dir, "build.depth.enabled=true", f"build.depth.model={depth_dir}",
                     "build.depth.batch_size=2")
    resolved = preflight(cfg.build.depth)
    assert resolved == {"revision": None, "files": None, "output": "inverse"}
    stage = Stage(cfg, resolved)
    records = bucketed(cfg)
    photos, synth = by_source(records)
    assert len(photos) == 3 and len(synth) == 2
    stage.label_records(records)
    assert [r["labels"]["depth"] for r in photos] == ["ok"] * 3
    assert [r["labels"]["depth"] for r in synth] == ["source"] * 2  # the synthetic world's exact depth stays
    processor = AutoImageProcessor.from_pretrained(depth_dir)
    model = AutoModelForDepthEstimation.from_pretrained(depth_dir).eval()
    for record in photos:
        sample = record["outputs"][0]["samples"][0]
        estimate = record["outputs"][0]["inverse_depth"][0]
        assert estimate.shape == sample.image.shape[:2] and estimate.dtype == np.float32
        with torch.inference_mode():  # the same model on the picture alone, as its model card runs it
            alone = processor.post_process_depth_estimation(
                model(**processor(images=Image.fromarray(sample.image), return_tensors="pt")),
                target_sizes=[sample.image.shape[:2]])[0]["predicted_depth"].numpy()
        np.testing.assert_allclose(estimate, alone, rtol=1e-4, atol=1e-5)
        assert np.ptp(estimate) > 0
        record["estimate"] = estimate
    for record in records:
        conditions_record(cfg, record)
        pack_members(cfg, record)
        assert "inverse_depth" not in record["outputs"][0]  # drawn, then dropped
    for record in photos:
        depth_map = record["outputs"][0]["conditions"][0]["depth"]
        assert depth_map.shape == record["outputs"][0]["samples"][0].image.shape
        assert np.array_equal(depth_map, inverse_depth_condition(record["estimate"]))  # the one drawing
        order = np.argsort(record["estimate"], axis=None, kind="stable")
        assert (np.diff(depth_map[..., 0].ravel()[order].astype(int)) >= 0).all()  # nearer (larger) never darker
        assert depth_map.max() == 255 and depth_map.min() == round(0.1 * 255)  # min-max normalised, near = white
        meta = json.loads(record["members"][0]["json"])["meta"]["build"]
        assert meta["labels"] == {"depth": "ok"} and meta["labelled_by"] == {"depth": f"{depth_dir} float32"}
        assert "depth" in record["rows"][0]["modalities"]
    for record in synth:
        sample = record["outputs"][0]["samples"][0]
        assert np.array_equal(record["outputs"][0]["conditions"][0]["depth"], depth_condition(sample.depth))


def test_a_metric_depth_model_is_inverted_and_drawn_near_white(depth_dir, photo_dir, tmp_path):
    from pipelines.depth_estimation import Stage, preflight

    metric = save_tiny_depth_anything(tmp_path / "metric", depth_estimation_type="metric")
    cfg = vision_cfg(photo_dir, "build.depth.enabled=true", f"build.depth.model={metric}")
    resolved = preflight(cfg.build.depth)
    assert resolved["output"] == "metric"
    stage = Stage(cfg, resolved)
    image = bucketed(cfg)[0]["outputs"][0]["samples"][0].image
    stage.output = "inverse"
    raw = stage.estimate([image])[0]  # the model's metric depth, as it came
    stage.output = "metric"
    inverse = stage.estimate([image])[0]
    assert (raw > 0).all()
    np.testing.assert_allclose(inverse, 1.0 / raw, rtol=1e-6)
    drawn = inverse_depth_condition(inverse)[..., 0]
    near, far = np.unravel_index(raw.argmin(), raw.shape), np.unravel_index(raw.argmax(), raw.shape)
    assert drawn[near] == 255 and drawn[far] == round(0.1 * 255)


def test_depth_preflight_names_what_is_wrong(depth_dir, seg_dir, photo_dir, tmp_path):
    from pipelines.depth_estimation import preflight

    with pytest.raises(ValueError, match="mask2former.*AutoModelForDepthEstimation cannot load"):
        preflight(vision_cfg(photo_dir, f"build.depth.model={seg_dir}").build.depth)
    unknown = tmp_path / "glpn-like"
    unknown.mkdir()
    config = json.loads((depth_dir / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "glpn"}))
    from pipelines.depth_estimation import output_kind
    from transformers import AutoConfig

    section = vision_cfg(photo_dir, f"build.depth.model={depth_dir}").build.depth
    assert output_kind(section, AutoConfig.from_pretrained(depth_dir)) == "inverse"
    assert output_kind(section.model_copy(update={"output": "metric"}), AutoConfig.from_pretrained(depth_dir)) \
        == "metric"
    with pytest.raises(ValueError, match="set build.depth.output"):
        output_kind(section, type("Config", (), {"model_type": "chmv2"})())


# --- segmentation ----------------------------------------------------------------------------------------------


def seg_cfg(seg_dir, photo_dir, *overrides: str) -> BuildConfig:
    return vision_cfg(photo_dir, "build.segmentation.enabled=true", f"build.segmentation.model={seg_dir}",
                      "build.segmentation.threshold=0.0", "build.segmentation.min_area=0.0", *overrides)


def check_drawn_from_masks(sample, maps: dict) -> None:
    """The semantic map paints each prompted class exactly over its entities' masks in the prompt's colour, the
    box map outlines exactly the masks' boxes in the same colours, nothing else is coloured."""
    colours = {c: v["hex"] for c, v in sample.meta["prompts"]["class_colours"].items()}
    semantic = maps["semantic_map"]
    painted = np.zeros(semantic.shape[:2], dtype=bool)
    boxes, box_colours = [], []
    for name, hex_colour in colours.items():
        # (a class of the sample may be out of this view, or cropped away: then its colour is nowhere)
        region = np.isin(sample.instance, [e["id"] for e in sample.entities if e["class"] == name])
        assert (semantic[region] == hex_to_rgb(hex_colour)).all() and not \
            (semantic[~region] == hex_to_rgb(hex_colour)).all(axis=-1).any(), name
        painted |= region
    assert not semantic[~painted].any()
    for entity in sample.entities:
        if entity["class"] in colours and entity.get("visible", True) and entity["bbox_2d"] is not None:
            assert entity["bbox_2d"] == list(mask_box(sample.instance == entity["id"]))
            boxes.append(entity["bbox_2d"])
            box_colours.append(colours[entity["class"]])
    assert np.array_equal(maps["bounding_boxes"], box_condition(semantic.shape[:2], boxes, box_colours))


def test_segmentation_labels_photos_with_entities_colours_and_prompts(seg_dir, photo_dir):
    from model.tasks import PALETTE, TASKS
    from onegen.dataset import prompt_kwargs
    from pipelines.process import conditions_record, pack_members
    from pipelines.segmentation import Stage, preflight

    cfg = seg_cfg(seg_dir, photo_dir, "build.segmentation.max_entities=3")
    stage = Stage(cfg, preflight(cfg.build.segmentation))
    records = bucketed(cfg)
    photos, synth = by_source(records)
    synth_entities = [r["outputs"][0]["samples"][0].entities for r in synth]
    stage.label_records(records)
    assert [r["labels"]["segmentation"] for r in synth] == ["source"] * 2
    assert [r["outputs"][0]["samples"][0].entities for r in synth] == synth_entities
    assert [r["labels"]["segmentation"] for r in photos] == ["ok"] * 3
    for record in records:
        conditions_record(cfg, record)
        pack_members(cfg, record)
    for record in photos + synth:  # the model's segments and the synthetic world's labels, drawn alike
        sample = record["outputs"][0]["samples"][0]
        check_drawn_from_masks(sample, record["outputs"][0]["conditions"][0])
    for record in photos:
        sample = record["outputs"][0]["samples"][0]
        assert 1 <= len(sample.entities) <= 3 and sample.instance.max() == len(sample.entities)
        assert [e["id"] for e in sample.entities] == list(range(1, len(sample.entities) + 1))
        areas = [e["area"] for e in sample.entities]
        assert areas == sorted(areas, reverse=True) and areas == [int((sample.instance == e["id"]).sum())
                                                                  for e in sample.entities]
        assert {e["class"] for e in sample.entities} <= {"person", "car", "sky", "wall", "grass"}
        colours = sample.meta["prompts"]["class_colours"]
        names = [v["name"] for v in colours.values()]
        assert len(set(names)) == len(names) and all(PALETTE[v["name"]] == v["hex"] for v in colours.values())
        row = record["rows"][0]
        assert {"semantic_map", "bounding_boxes"} <= set(row["modalities"])
        task = TASKS["semanticmap2image"]
        prompt = task.build_prompt("", **prompt_kwargs(task, row, 0))
        for name, colour in colours.items():
            assert f"<{colour['hex']} {colour['name']} mask: {name}>" in prompt
        members = record["members"][0]
        assert "instance.png" in members and json.loads(members["json"])["entities"] == sample.entities
    again = bucketed(cfg)  # the colours are drawn per sample from (run.seed, id): the same on every rebuild
    stage.label_records(again)
    assert [r["outputs"][0]["samples"][0].meta for r in again] == [r["outputs"][0]["samples"][0].meta
                                                                   for r in bucketed_like(records)]


def bucketed_like(records: list[dict]) -> list[dict]:
    for record in records:  # pack_members added meta["build"]: compare the labeller's part only
        for sample in record["outputs"][0]["samples"]:
            sample.meta = {k: v for k, v in sample.meta.items() if k != "build"}
    return records


def test_a_picture_without_segments_is_counted_and_gets_no_map(seg_dir, photo_dir):
    from pipelines.process import conditions_record
    from pipelines.segmentation import Stage, preflight

    cfg = seg_cfg(seg_dir, photo_dir, "build.segmentation.threshold=1.0")
    stage = Stage(cfg, preflight(cfg.build.segmentation))
    photos, _ = by_source(bucketed(cfg))
    stage.label_records(photos)
    assert [r["labels"]["segmentation"] for r in photos] == ["no_entities"] * 3
    assert all("threshold" in r["label_errors"]["segmentation"] for r in photos)
    for record in photos:
        conditions_record(cfg, record)
        assert set(record["outputs"][0]["conditions"][0]) == {"canny"}


def test_segment_names_and_the_preflight(seg_dir, depth_dir, photo_dir):
    from pipelines.segmentation import class_name, preflight

    assert [class_name(n) for n in ("wall-other-merged", "floor-wood", "sky-other-merged", "person", "tv_monitor",
                                    "grass-merged")] == ["wall", "floor wood", "sky", "person", "tv monitor", "grass"]
    assert preflight(seg_cfg(seg_dir, photo_dir).build.segmentation) == {"revision": None, "files": None}
    with pytest.raises(ValueError, match="depth_anything.*the segmentation stage .* cannot load"):
        preflight(seg_cfg(depth_dir, photo_dir).build.segmentation)


# --- the synthetic world's exact labels ------------------------------------------------------------------------


def test_renderers_are_exact_on_the_synthetic_world():
    """Semantic colours = the prompt's colours over exactly the class's instance masks; box maps = the masks' boxes
    (after the bucket resize too); the depth map orders pixels as the true depth does (near = white)."""
    from pipelines.process import conditions_record

    cfg = load_config(None, ["run.name=b", "build.resolutions=[64, 128]", "build.decode.min_size=32",
                             "build.sources=[{name: synth, type: synthetic, scenes: 3, views_per_scene: 2, size: 96, "
                             "partition_size: 3}]", "build.conditions.kinds=[]"], BuildConfig)
    checked = 0
    for record in bucketed(cfg):
        conditions_record(cfg, record)
        for output in record["outputs"]:
            for sample, maps in zip(output["samples"], output["conditions"], strict=True):
                if "semantic_map" not in maps:
                    continue
                check_drawn_from_masks(sample, maps)
                valid = sample.depth > 0
                depth, drawn = sample.depth[valid], maps["depth"][..., 0][valid].astype(int)
                order = np.argsort(depth, kind="stable")
                assert (np.diff(drawn[order]) <= 0).all()  # farther never brighter
                assert drawn.max() == 255 and (maps["depth"][~valid] == 0).all()
                checked += 1
    assert checked >= 6


# --- inside a build --------------------------------------------------------------------------------------------


def test_a_build_labels_depth_and_segments_and_inspect_shows_them(depth_dir, seg_dir, photo_dir, tmp_path,
                                                                   ray_head):
    from onegen.dataset import Build
    from onegen.storage import Storage
    from pipelines.inspect_build import format_summary, inspect_build
    from tests.build_runs import ok, run_build, write_config

    config = write_config(tmp_path / "build.yaml", tmp_path, [
        {"name": "photos", "type": "folder", "path": str(photo_dir), "partition_size": 3},
        {"name": "synth", "type": "synthetic", "scenes": 2, "size": 64, "partition_size": 2}],
        resolutions=[64], decode={"min_size": 32}, conditions={"kinds": ["canny"]},
        depth={"enabled": True, "model": str(depth_dir), "num_cpus": 0.5},
        segmentation={"enabled": True, "model": str(seg_dir), "threshold": 0.0, "min_area": 0.0, "num_cpus": 0.5})
    result = ok(run_build(ray_head, config))
    assert "depth labels: 3 ok, 2 source" in result.stdout, result.stdout
    assert "segmentation labels: 3 ok, 2 source" in result.stdout, result.stdout
    storage = Storage(str(tmp_path / "data"))
    build = Build(storage, "b")
    assert build.manifest()["totals"]["labels"] == {"depth": {"ok": 3, "source": 2},
                                                    "segmentation": {"ok": 3, "source": 2}}
    assert set(json.loads(storage.read_bytes("builds/b/plan.json"))["labelers"]) == {"depth", "segmentation"}
    from onegen.shards import read_entries

    by_shard = {e["labels"]["depth"].get("ok", 0): e["labelled_by"] for e in read_entries(storage, "b").values()}
    assert by_shard == {3: {"depth": [f"{depth_dir} float32"], "segmentation": [f"{seg_dir} float32"]},
                        0: {"depth": [], "segmentation": []}}  # the synthetic shard's labels are its own
    rows = list(build.rows(as_tensors=False))
    assert len(rows) == 5
    for row in rows:
        assert {(0, "image"), (0, "canny"), (0, "depth"), (0, "semantic_map"), (0, "bounding_boxes")} <= \
            set(row["latents"]), (row["source"], sorted(row["latents"]))
        assert row["entities"] and all(e["hex"] and e["colour"] for e in row["entities"])
    inspection = inspect_build(str(tmp_path / "data" / "builds" / "b"), out=str(tmp_path / "sheet.png"), samples=5)
    text = format_summary(inspection.summary)
    assert "depth labels (samples): ok 3, source 2" in text and "segmentation labels (samples): ok 3, source 2" in text
    modalities = {cell["modality"] for cell in inspection.cells}
    assert {"depth", "semantic_map", "bounding_boxes"} <= modalities
    assert Image.open(tmp_path / "sheet.png").size[0] > 0


def test_the_readme_shows_the_depth_and_segmentation_defaults():
    import yaml

    from onegen.build_config import DepthSection, SegmentationSection
    from tests.test_readme import fenced_block

    shown = yaml.safe_load(fenced_block("### Depth, semantic maps and boxes from vision models", "yaml"))["build"]
    for name, section in (("depth", DepthSection), ("segmentation", SegmentationSection)):
        assert section(**shown[name]) == section() and set(shown[name]) == set(section.model_fields), name


def test_segment_labels_do_not_depend_on_how_the_pictures_were_batched(seg_dir, photo_dir):
    from pipelines.segmentation import Stage, preflight

    def labelled(batch_size: int, reverse: bool) -> dict[str, list]:
        cfg = seg_cfg(seg_dir, photo_dir, "build.resolutions=[64, 96]", f"build.segmentation.batch_size={batch_size}")
        records, _ = by_source(bucketed(cfg))
        Stage(cfg, preflight(cfg.build.segmentation)).label_records(records[::-1] if reverse else records)
        return {r["id"]: [(s.meta["prompts"], s.entities, s.instance) for o in r["outputs"] for s in o["samples"]]
                for r in records}

    one, many = labelled(1, False), labelled(4, True)
    assert sorted(one) == sorted(many) and len(one) == 3
    for key, pictures in one.items():
        for (prompts, entities, instance), (prompts_b, entities_b, instance_b) in zip(pictures, many[key],
                                                                                     strict=True):
            assert prompts == prompts_b and entities == entities_b and np.array_equal(instance, instance_b)


def test_a_sample_keeps_its_twenty_largest_classes_masks_and_entities_alike(seg_dir, photo_dir):
    """Past the palette's 20 colours the classes with the least area leave the masks and the entities together; a
    picture left without segments gets no labels and no map."""
    import copy

    from model.tasks import PALETTE
    from pipelines.process import conditions_record
    from pipelines.segmentation import Stage, preflight

    cfg = seg_cfg(seg_dir, photo_dir)
    stage = Stage(cfg, preflight(cfg.build.segmentation))
    record = by_source(bucketed(cfg))[0][0]
    size = record["outputs"][0]["samples"][0].image.shape[:2]
    classes = [f"thing {c}" for c in range(25)]
    segments = {}
    # three pictures of one sample, 25 classes: view 0 has classes 0-9 (16-34 pixels each) and two specks of
    # classes 20, 21; view 1 classes 10-19 (24-51 pixels); view 2 only specks of classes 20-24
    layout = {0: [(classes[n], 2, 8 + n) for n in range(10)] + [(classes[20], 1, 1), (classes[21], 1, 1)],
              1: [(classes[10 + n], 3, 8 + n) for n in range(10)],
              2: [(classes[20 + n], 1, 2) for n in range(5)]}
    for view, items in layout.items():
        instance = np.zeros(size, dtype=np.int32)
        entities = []
        for n, (name, height, width) in enumerate(items):
            instance[n * 3:n * 3 + height, :width] = n + 1
            mask = instance == n + 1
            entities.append({"id": n + 1, "class": name, "score": 0.9, "area": int(mask.sum()),
                             "bbox_2d": list(mask_box(mask)), "visible": True})
        segments[(0, view)] = (instance, entities)
    forward = stage.sample_labels(record, segments)
    assert list(forward["pictures"]) == [(0, 0), (0, 1)]  # view 2 lost all its segments: no labels
    coloured = forward["prompts"]["class_colours"]
    assert set(classes) - set(coloured) == set(classes[20:])  # the five with the least area
    assert len(coloured) == len(PALETTE) == 20
    assert len({v["name"] for v in coloured.values()}) == 20
    for key, fields in forward["pictures"].items():
        assert all(e["class"] in coloured for e in fields["entities"])
        assert set(np.unique(fields["instance"])) - {0} == {e["id"] for e in fields["entities"]}
        for entity in fields["entities"]:
            assert np.array_equal(segments[key][0] == entity["id"], fields["instance"] == entity["id"])
            index = fields["classes"].index(entity["class"])
            assert (fields["semantic"][fields["instance"] == entity["id"]] == index).all()
        assert (fields["semantic"][fields["instance"] == 0] == 0).all()
    assert [e["id"] for e in forward["pictures"][(0, 0)]["entities"]] == list(range(1, 11))  # ids 11, 12 left out
    assert not np.isin(forward["pictures"][(0, 0)]["instance"], [11, 12]).any()
    # drawn: the two pictures with segments agree with their masks, the empty one gets no semantic or box map
    record["outputs"][0]["samples"] = [copy.copy(record["outputs"][0]["samples"][0]) for _ in range(3)]
    record["labels"] = {"segmentation": "ok"}
    stage.apply(record, forward)
    conditions_record(cfg, record)
    for view in (0, 1):
        check_drawn_from_masks(record["outputs"][0]["samples"][view], record["outputs"][0]["conditions"][view])
    assert not {"semantic_map", "bounding_boxes"} & set(record["outputs"][0]["conditions"][2])


def test_unusable_depth_is_counted_and_drawn_nowhere(depth_dir, photo_dir):
    from pipelines.depth_estimation import Stage, preflight
    from pipelines.process import conditions_record

    cfg = vision_cfg(photo_dir, "build.depth.enabled=true", f"build.depth.model={depth_dir}")
    stage = Stage(cfg, preflight(cfg.build.depth))
    records, synth = by_source(bucketed(cfg))
    # no surface, one value everywhere (but for float noise), not a number
    flat = iter([np.zeros, lambda s: 3.0 + 1e-7 * np.random.default_rng(0).random(s), lambda s: np.full(s, np.nan)])
    stage.estimate = lambda images: [next(flat)(image.shape[:2]).astype(np.float32) for image in images]
    stage.label_records(records + synth)
    assert [r["labels"]["depth"] for r in records] == ["no_depth"] * 3
    assert all("no valid" in r["label_errors"]["depth"] for r in records)
    assert all("depth" in r["labelled_by"] for r in records) and not any("labelled_by" in r for r in synth)
    for record in records:
        conditions_record(cfg, record)
        assert "depth" not in record["outputs"][0]["conditions"][0]


def test_segmentation_preflight_refuses_query_less_models(tmp_path, photo_dir):
    from pipelines.segmentation import preflight

    detr = tmp_path / "detr"
    detr.mkdir()
    (detr / "config.json").write_text(json.dumps({"model_type": "detr", "use_timm_backbone": False}))
    with pytest.raises(ValueError, match="'detr' model.*Mask2Former, MaskFormer or OneFormer"):
        preflight(seg_cfg(detr, photo_dir).build.segmentation)
