"""The segmentation labeller (build.segmentation): a transformers universal-segmentation model finds the entities
of every picture without its own, for the semantic-map and bounding-box tasks.

The release's 350 K semantic/box triplets list <= 10 entities per image, segment each, take the boxes from the masks
and give each class a random colour from the prompt palette (ONEDIFFUSION_SPEC §6). Here one panoptic model does the
listing and the segmenting (Mask2Former by default; MaskFormer and OneFormer load the same way): each actor runs a
batch of same-sized pictures through the model and the processor's `post_process_panoptic_segmentation`, keeps the
build.segmentation.max_entities largest segments (those above min_area), and writes them as the picture's labels —
an instance map (entity ids 1..n), a semantic map over the classes found, entities with class, score, area and the
box of their mask (model.conditions.mask_box) — with one distinct palette colour per class, drawn per sample from a
generator seeded by (run.seed, sample id) (model.tasks.assign_class_colours: the synthetic world's recipe). The
conditions stage then draws the semantic map and the box map with the same renderers as the synthetic world's exact
labels, and the rows carry the entities the trainer writes the `<#RRGGBB name mask: label>` /
`<#RRGGBB name boundingbox: label>` prompts from. Every picture is labelled (each view, each resolution), except one
whose source gave it entities (outcome `source`).

Outcomes counted per sample: ok; no_entities (no segment passed the thresholds: no semantic or box map); source;
error (the model failed on it, the message in the shard's stats).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from onegen.build_config import SegmentationSection
from pipelines.labelers import OK, SOURCE, Label, LabelerStage, checked_model, pictures, preflight_result, \
    same_size_batches

NO_ENTITIES = "no_entities"
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

    folder, revision, config, weights = checked_model(section, MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES,
                                                      "AutoModelForUniversalSegmentation",
                                                      "a panoptic segmentation model such as Mask2Former")
    if not getattr(config, "id2label", None):
        raise ValueError(f"{folder}: its config names no classes (id2label), so segments could not be named")
    processor = AutoProcessor.from_pretrained(folder)
    if not hasattr(processor, "post_process_panoptic_segmentation"):
        raise ValueError(f"{folder}: its processor ({type(processor).__name__}) has no panoptic post-processing; "
                         "pick a Mask2Former / MaskFormer / OneFormer model")
    return preflight_result(revision, weights)


def has_entities(sample) -> bool:
    return sample.entities is not None and sample.instance is not None


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
        jobs = [(i, k, v, sample) for i, record in enumerate(records)
                for k, v, sample in pictures(record, has_entities)]
        found: dict[int, dict[tuple[int, int], tuple[np.ndarray, list]]] = {}
        for batch in same_size_batches(jobs, lambda job: job[3].image, self.section.batch_size):
            for (i, k, v, _), segments in zip(batch, self.segment([job[3].image for job in batch]), strict=True):
                found.setdefault(i, {})[(k, v)] = segments
        labels = []
        for i in range(len(records)):
            if i not in found:
                labels.append(Label(SOURCE))
            elif not any(entities for _, entities in found[i].values()):
                labels.append(Label(NO_ENTITIES, message="no segment passed build.segmentation.threshold / "
                                                         "min_area"))
            else:
                labels.append(Label(OK, value=found[i]))
        return labels

    def apply(self, record: dict, value: dict[tuple[int, int], tuple[np.ndarray, list]]) -> None:
        """The segments as the pictures' labels (instance, semantic, classes, entities) and one palette colour per
        class of the sample (the same in every view and resolution), as a source with exact labels gives them."""
        from model.tasks import PALETTE, assign_class_colours
        from pipelines.process import record_rng

        classes: list[str] = []
        for _, entities in value.values():
            classes += [e["class"] for e in entities if e["class"] not in classes]
        colours = assign_class_colours(classes[:len(PALETTE)], record_rng(self.cfg, record["id"], self.stage))
        prompts = {"class_colours": {c: {"name": name, "hex": PALETTE[name]} for c, name in colours.items()}}
        for (k, v), (instance, entities) in value.items():
            sample = record["outputs"][k]["samples"][v]
            names = [UNLABELLED, *dict.fromkeys(e["class"] for e in entities)]
            table = np.zeros(len(entities) + 1, dtype=np.int32)  # entity id -> its class's index in `names`
            for e in entities:
                table[e["id"]] = names.index(e["class"])
            sample.instance, sample.semantic, sample.classes = instance, table[instance], names
            sample.entities = entities
            sample.meta = {**sample.meta, "prompts": prompts}
