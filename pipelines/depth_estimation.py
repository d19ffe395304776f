"""The depth labeller (build.depth): a transformers depth-estimation model estimates every picture without depth.

The release labelled its depth data with Depth Anything V2 (ONEDIFFUSION_SPEC §6), the default here; any model
AutoModelForDepthEstimation loads works (DPT, ZoeDepth, GLPN, Depth Pro, ...). Each actor loads the model once and
estimates a batch of same-sized pictures in one forward call; the processor's own `post_process_depth_estimation`
brings each prediction back to its picture's size. Every picture is labelled (each view, each resolution: the one
training sees), except one whose source gave it depth (the synthetic world's exact depth stays: outcome `source`).

What the model predicts decides how it becomes inverse depth: a relative model (Depth Anything's relative
checkpoints, DPT) predicts inverse depth of unknown scale and shift, kept as is; a metric one predicts depth, inverted
(<= 0: no surface). The conditions stage draws it with model.conditions.inverse_depth_condition, the same drawing as
exact depth (model/depth.py: min-max normalised per picture, near = white), so a map looks the same whatever made it.

Outcomes counted per sample: ok; source (every picture had depth of its own); no_depth (the model's estimate had no
valid pixel, or one value everywhere, on every picture: no map rather than a black or white one); error (the model
failed on it: no depth map, the message in the shard's stats).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from model.depth import inverse_depth
from onegen.build_config import DepthSection
from pipelines.labelers import OK, SOURCE, Label, LabelerStage, checked_model, preflight_result, run_on_pictures

INVERSE, METRIC = "inverse", "metric"
NO_DEPTH = "no_depth"
FLAT_TOLERANCE = 1e-4  # relative range below which an estimate counts as one value
INVERSE_MODELS = {"dpt"}  # MiDaS-style relative inverse depth
METRIC_MODELS = {"zoedepth", "glpn", "depth_pro", "prompt_depth_anything"}


def output_kind(section: DepthSection, config) -> str:
    """INVERSE or METRIC: section.output, or (auto) what the model's config says it predicts."""
    if section.output != "auto":
        return section.output
    if config.model_type == "depth_anything":
        return METRIC if getattr(config, "depth_estimation_type", "relative") == "metric" else INVERSE
    if config.model_type in INVERSE_MODELS:
        return INVERSE
    if config.model_type in METRIC_MODELS:
        return METRIC
    raise ValueError(f"cannot tell whether a {config.model_type!r} model predicts inverse (relative) or metric "
                     "depth; set build.depth.output to inverse or metric")


def preflight(section: DepthSection) -> dict[str, Any]:
    """Resolve the model, read its config and processor (small files only; the weights are only listed)."""
    from transformers import AutoImageProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES

    folder, revision, config, weights = checked_model(section, MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES,
                                                      "AutoModelForDepthEstimation",
                                                      "a depth-estimation model such as Depth Anything V2")
    processor = AutoImageProcessor.from_pretrained(folder)
    if not hasattr(processor, "post_process_depth_estimation"):
        raise ValueError(f"{folder}: its image processor ({type(processor).__name__}) cannot post-process depth; "
                         "pick a depth-estimation model whose processor can")
    return preflight_result(revision, weights, output=output_kind(section, config))


def has_depth(sample) -> bool:
    return sample.depth is not None


def usable(inverse: np.ndarray) -> bool:
    """An estimate worth drawing: some valid pixel (finite, > 0), and not one value on all of them (float noise
    around one value is one value: min-max normalisation would stretch the noise over the whole map)."""
    valid = inverse[np.isfinite(inverse) & (inverse > 0)]
    return bool(valid.size) and float(valid.max()) - float(valid.min()) > FLAT_TOLERANCE * float(valid.max())


class Stage(LabelerStage):
    stage = "depth"

    def load(self, folder: str, device: str, dtype) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.model = AutoModelForDepthEstimation.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.output = self.resolved.get("output") or output_kind(self.section, self.model.config)
        # ZoeDepth's processor pads, and must be told the pictures' own sizes to cut the padding off again.
        post = inspect.signature(self.processor.post_process_depth_estimation).parameters
        self.source_sizes = "source_sizes" in post

    def smoke_test(self) -> None:
        self.estimate([np.full((64, 64, 3), 128, dtype=np.uint8)])

    def estimate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Inverse depth (float32, each picture's size; <= 0 where there is no surface) of same-sized pictures."""
        import torch
        from PIL import Image

        inputs = self.processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")
        inputs = inputs.to(self.device).to(self.dtype)  # .to(dtype) casts the floating inputs (pixels) only
        with torch.inference_mode():
            outputs = self.model(**inputs)
        outputs.predicted_depth = outputs.predicted_depth.float()  # post-processing resizes in float32
        sizes = [image.shape[:2] for image in images]
        extra = {"source_sizes": sizes} if self.source_sizes else {}
        results = self.processor.post_process_depth_estimation(outputs, target_sizes=sizes, **extra)
        estimates = []
        for result, size in zip(results, sizes, strict=True):
            predicted = result["predicted_depth"].float().cpu().numpy()
            if predicted.shape != size:
                raise RuntimeError(f"the model's post-processing gave a {predicted.shape} map for a {size} picture")
            estimates.append((inverse_depth(predicted) if self.output == METRIC else predicted).astype(np.float32))
        return estimates

    def label(self, records: list[dict]) -> list[Label]:
        estimates = run_on_pictures(records, has_depth, self.estimate, self.section.batch_size)
        labels = []
        for i in range(len(records)):
            if i not in estimates:
                labels.append(Label(SOURCE))
                continue
            kept = {key: e for key, e in estimates[i].items() if usable(e)}  # an unusable one: no (black/white) map
            skipped = len(estimates[i]) - len(kept)
            if not kept:
                labels.append(Label(NO_DEPTH, message="the model's estimate has no valid (finite, > 0) pixel or "
                                                      "one value everywhere"))
            else:  # a group's picture without a usable estimate gets no map: said in the shard's stats
                labels.append(Label(OK, value=kept, message=f"{skipped} of {len(estimates[i])} pictures had no "
                                    "usable estimate" if skipped else None))
        return labels

    def apply(self, record: dict, value: dict[tuple[int, int], np.ndarray]) -> None:
        """Each estimate beside its picture: outputs[k]["inverse_depth"][v], drawn (then dropped) by the conditions
        stage."""
        for (k, v), estimate in value.items():
            record["outputs"][k].setdefault("inverse_depth", {})[v] = estimate
