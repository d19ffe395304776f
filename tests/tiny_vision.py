"""Tiny random-weight vision checkpoints (depth estimation, universal segmentation), built fully offline for tests.

``save_tiny_depth_anything(folder)`` and ``save_tiny_mask2former(folder)`` write model + image processor with
``save_pretrained`` so the folder loads through ``AutoModelForDepthEstimation`` /
``AutoModelForUniversalSegmentation`` and ``AutoImageProcessor`` like a hub checkpoint (a few hundred KiB each).
The model classes are the real transformers ones; only the sizes are shrunk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTImageProcessorPil,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessorPil,
    SwinConfig,
)

# COCO-panoptic style names: "...-merged" / "-other" entries are "stuff" there, the rest "things".
MASK2FORMER_LABELS = ("person", "car", "sky", "wall-other-merged", "grass-merged")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _label_maps(labels: tuple[str, ...] | list[str]) -> tuple[dict[int, str], dict[str, int]]:
    id2label = dict(enumerate(labels))
    return id2label, {name: i for i, name in id2label.items()}


def save_tiny_depth_anything(
    folder: str | Path, seed: int = 0, depth_estimation_type: str = "relative", max_depth: int = 20,
) -> Path:
    """Build a tiny random DepthAnythingForDepthEstimation (Dinov2 backbone) + DPT image processor into ``folder``.

    ``max_depth`` only matters for ``depth_estimation_type="metric"`` (sigmoid head scaled by it); the "relative"
    head ends in a ReLU; with the head re-initialised below its depth is > 0 everywhere and not constant.
    """
    folder = Path(folder)
    torch.manual_seed(seed)  # random init is the only randomness -> identical weights for a fixed seed
    backbone = Dinov2Config(
        image_size=56, patch_size=14, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
        out_indices=[1, 2, 3, 4], reshape_hidden_states=False,  # as the real Depth-Anything configs
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, patch_size=14, reassemble_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16, head_hidden_size=8,
        depth_estimation_type=depth_estimation_type,
        max_depth=max_depth if depth_estimation_type == "metric" else 1,
    )
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():
        # With the std-0.02 init the neck/head shrink the signal to ~1e-7 and the ReLU'd depth is all zeros. PyTorch's
        # default conv init keeps it O(0.1); a last conv with weights >= 0 (its input is ReLU'd) and bias 0.1 then makes
        # the pre-activation > 0.1, so the depth is strictly positive and still varies over the image.
        for module in [*model.neck.modules(), *model.head.modules()]:
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                module.reset_parameters()
        model.head.conv3.weight.abs_().mul_(10)
        model.head.conv3.bias.fill_(0.1)
    model.save_pretrained(folder)
    # Same settings as the Depth-Anything-V2 hub repos (DPTImageProcessor), at 56 instead of 518 pixels. The PIL
    # backend, since DPTImageProcessor would need torchvision.
    processor = DPTImageProcessorPil(
        size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, do_pad=False,
        resample=3, do_rescale=True, do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )
    processor.save_pretrained(folder)
    return folder


def save_tiny_mask2former(
    folder: str | Path, seed: int = 0, labels: tuple[str, ...] | list[str] = MASK2FORMER_LABELS,
) -> Path:
    """Build a tiny random Mask2FormerForUniversalSegmentation (Swin backbone) + image processor into ``folder``."""
    folder = Path(folder)
    id2label, label2id = _label_maps(labels)
    torch.manual_seed(seed)
    backbone = SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=1, decoder_layers=3, num_attention_heads=2, num_queries=8,
        id2label=id2label, label2id=label2id,
    )
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        # Random init gives ~uniform class scores (~0.2) and mask logits ~0, so panoptic post-processing (masks must
        # reach sigmoid >= 0.5 after weighting by the score) finds no segment at all. Sharpen both: peaked class
        # logits, a "no object" class that never wins, and mask logits of std ~2-3.
        model.class_predictor.weight.mul_(50)
        model.class_predictor.bias[-1] = -10.0
        model.model.pixel_level_module.decoder.mask_projection.weight.mul_(50)
    model.save_pretrained(folder)
    processor = Mask2FormerImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32, ignore_index=255, do_reduce_labels=False,
        num_labels=len(labels),
    )
    processor.save_pretrained(folder)
    return folder
