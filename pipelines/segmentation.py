"""The segmentation labeller (build.segmentation): a transformers universal-segmentation model finds the entities
of every picture without its own, for the semantic-map and bounding-box tasks.

The release's 350 K semantic/box triplets list <= 10 entities per image, segment each, take the boxes from the masks
and give each class a random colour from the prompt palette (ONEDIFFUSION_SPEC §6). Here one panoptic model does the
listing and the segmenting (Mask2Former by default; MaskFormer and OneFormer load the same way): each actor runs a
batch of same-sized pictures through the model and the processor's `post_process_panoptic_segmentation`, keeps the
build.segmentation.max_entities largest segments (those above min_area), and writes them as the picture's labels —
an instance map (entity ids from 1, largest first), a semantic map over the classes found, entities with class,
score, area and the box of their mask (model.conditions.mask_box) — with one distinct palette colour per class,
drawn per sample from a generator seeded by (run.seed, sample id) (model.tasks.assign_class_colours: the synthetic
world's recipe). A sample (all its views and resolutions) has at most 20 classes, the palette's size: beyond that the
classes with the least area are left out, masks and entities alike, so the maps, the entities and the prompts always
agree. The conditions stage then draws the semantic map and the box map with the same renderers as the synthetic
world's exact labels, and the rows carry the entities the trainer writes the `<#RRGGBB name mask: label>` /
`<#RRGGBB name boundingbox: label>` prompts from. Every picture is labelled (each view, each resolution), except one
whose source gave it entities (outcome `source`); a picture where no segment passes the thresholds gets no labels and
no map.

Outcomes counted per sample: ok; no_entities (no segment passed the thresholds on any picture); source; error (the
model failed on it, the message in the shard's stats).

Supported: Mask2Former, MaskFormer and OneFormer (their outputs are class and mask logits per query, which the
panoptic post-processing turns into segments). DETR and EoMT are in transformers' universal-segmentation table too,
but their outputs or post-processing differ: the preflight refuses them.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from onegen.build_config import SegmentationSection
from pipelines.labelers import OK, SOURCE, Label, LabelerStage, checked_model, preflight_result, run_on_pictures

NO_ENTITIES = "no_entities"
MODEL_TYPES = ("mask2former", "maskformer", "oneformer")  # query-based panoptic models (module docstring)
UNLABELLED = "unlabelled"  # semantic id 0: pixels outside every kept segment (drawn black)
# COCO-panoptic's stuff names carry how they were merged ("wall-other-merged"); the prompt names the thing ("wall").
_NAME_SUFFIXES = re.compile(r"(-(merged|other|stuff))+$")


def class_name(label: str) -> str:
    """The model's label as a prompt names it: merge suffixes off, '-' and '_' as spaces ('wall-other-merged' ->
    'wall', 'floor-wood' -> 'floor wood')."""
    return " ".join(_NAME_SUFFIXES.sub("", label).replace("_", " ").replace("-", " ").split()) or label


def preflight(section: SegmentationSection) -> dict[str, Any]:
    """Resolve the model, read its config (with its class names) and processor; the weights are only listed."""
    from transformers import AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES

    classes = {t: c for t, c in MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES.items() if t in MODEL_TYPES}
    folder, revision, config, weights = checked_model(section, classes, "the segmentation stage (Mask2Former, "
                                                      "MaskFormer or OneFormer)", "a panoptic Mask2Former, "
                                                      "MaskFormer or OneFormer model")
    if not getattr(config, "id2label", None):
        raise ValueError(f"{folder}: its config names no classes (id2label), so segments could not be named")
    processor = AutoProcessor.from_pretrained(folder)
    if not hasattr(processor, "post_process_panoptic_segmentation"):
        raise ValueError(f"{folder}: its processor ({type(processor).__name__}) has no panoptic post-processing; "
                         "pick a Mask2Former / MaskFormer / OneFormer model")
    return preflight_result(revision, weights)


def has_entities(sample) -> bool:
    """The source listed the picture's entities (with or without masks): its list is kept."""
    return sample.entities is not None


class Stage(LabelerStage):
    stage = "segmentation"

    def load(self, folder: str, device: str, dtype) -> None:
        from transformers import AutoModelForUniversalSegmentation, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = AutoModelForUniversalSegmentation.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.names = {int(i): class_name(label) for i, label in self.model.config.id2label.items()}
        # OneFormer is one model for three tasks: its processor is told which one to run.
        self.task_inputs = self.model.config.model_type == "oneformer"

    def smoke_test(self) -> None:
        self.segment([np.full((64, 64, 3), 128, dtype=np.uint8)])

    def segment(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, list[dict[str, Any]]]]:
        """(instance map, entities) of same-sized pictures: the kept segments as ids 1..n, largest first."""
        import torch
        from PIL import Image

        extra = {"task_inputs": ["panoptic"] * len(images)} if self.task_inputs else {}
        inputs = self.processor(images=[Image.fromarray(image) for image in images], return_tensors="pt", **extra)
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        for name in ("class_queries_logits", "masks_queries_logits"):  # post-processing in float32
            setattr(outputs, name, getattr(outputs, name).float())
        sizes = [image.shape[:2] for image in images]
        section = self.section
        results = self.processor.post_process_panoptic_segmentation(
            outputs, threshold=section.threshold, mask_threshold=section.mask_threshold,
            overlap_mask_area_threshold=section.overlap_threshold, label_ids_to_fuse=set(), target_sizes=sizes)
        return [self._entities(result, size) for result, size in zip(results, sizes, strict=True)]

    def _entities(self, result: dict, size: tuple[int, int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        from model.conditions import mask_box

        segmentation = result["segmentation"].cpu().numpy()
        if segmentation.shape != size:
            raise RuntimeError(f"the model's post-processing gave a {segmentation.shape} map for a {size} picture")
        least = self.section.min_area * size[0] * size[1]
        found = []
        for info in result["segments_info"]:  # ids outside segments_info (0, or -1 when none survived) are no segment
            mask = segmentation == info["id"]
            area = int(mask.sum())
            if area and area >= least:
                found.append((area, float(info["score"]), self.names.get(int(info["label_id"]), str(info["label_id"])),
                              mask))
        found.sort(key=lambda item: (-item[0], -item[1]))
        instance = np.zeros(size, dtype=np.int32)
        entities = []
        for entity_id, (area, score, name, mask) in enumerate(found[:self.section.max_entities], start=1):
            instance[mask] = entity_id
            entities.append({"id": entity_id, "class": name, "score": round(score, 4), "area": area,
                             "bbox_2d": list(mask_box(mask)), "visible": True})
        return instance, entities

    def label(self, records: list[dict]) -> list[Label]:
        found = run_on_pictures(records, has_entities, self.segment, self.section.batch_size)
        labels = []
        for i, record in enumerate(records):
            if i not in found:
                labels.append(Label(SOURCE))
                continue
            value = self.sample_labels(record, found[i])
            labels.append(Label(OK, value=value) if value["pictures"] else
                          Label(NO_ENTITIES, message="no segment passed build.segmentation.threshold / min_area"))
        return labels

    def sample_labels(self, record: dict, segments: dict[tuple[int, int], tuple[np.ndarray, list]]) -> dict:
        """{"pictures": {(k, v): a picture's labels (instance, semantic, classes, entities)}, "prompts": the
        sample's class colours}: at most 20 classes per sample (the largest by area), one palette colour each, the same
        in every view and resolution, as a source with exact labels gives them. Pictures go in (output, view) order,
        so how a batch grouped them changes nothing."""
        from collections import Counter

        from model.tasks import PALETTE, assign_class_colours
        from pipelines.process import record_rng

        keys = [key for key in sorted(segments) if segments[key][1]]
        area: Counter = Counter()
        for key in keys:
            for entity in segments[key][1]:
                area[entity["class"]] += entity["area"]
        classes = sorted(area, key=lambda name: (-area[name], name))[:len(PALETTE)]
        colours = assign_class_colours(classes, record_rng(self.cfg, record["id"], self.stage))
        pictures_labels = {}
        for key in keys:
            instance, entities = segments[key]
            left_out = [e["id"] for e in entities if e["class"] not in colours]
            if left_out:  # classes past the palette's 20: off the masks too, so maps and entities agree
                instance = np.where(np.isin(instance, left_out), 0, instance).astype(np.int32)
                entities = [e for e in entities if e["class"] in colours]
            if not entities:
                continue
            names = [UNLABELLED, *dict.fromkeys(e["class"] for e in entities)]
            table = np.zeros(max(e["id"] for e in entities) + 1, dtype=np.int32)  # entity id -> its class's index
            for e in entities:
                table[e["id"]] = names.index(e["class"])
            pictures_labels[key] = {"instance": instance, "semantic": table[instance], "classes": names,
                                    "entities": entities}
        return {"pictures": pictures_labels,
                "prompts": {"class_colours": {c: {"name": name, "hex": PALETTE[name]} for c, name in colours.items()}}}

    def apply(self, record: dict, value: dict) -> None:
        """The segments as the pictures' labels (sample_labels), as a source with exact labels gives them."""
        for (k, v), fields in value["pictures"].items():
            sample = record["outputs"][k]["samples"][v]
            sample.instance, sample.semantic = fields["instance"], fields["semantic"]
            sample.classes, sample.entities = fields["classes"], fields["entities"]
            sample.meta = {**sample.meta, "prompts": value["prompts"]}
