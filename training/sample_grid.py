"""Sample grids: what the EMA weights make of one fixed example per mixture task, logged to the stage's MLflow run
every `train.samples.every` steps and at the end of the stage, so a user sees a long run learn each task.

Each task's example is the first sample of its first epoch (fixed for the stage, the same on a resumed run): its
condition views decoded from the row's latents are the pipeline's input images, its caption (and colour entries)
the prompt, its cameras the multiview poses. The pipeline is the inference one (model.pipeline), built around the
average's own tensors (no copy). Each grid is one PNG, left to right: the conditions, what the model made, the ground
truth, at samples/STAGE/step_STEP/LABEL.png.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.tasks import get_task
from training.samples import camera_to_world, caption_text, frame_keys, prompt_kwargs

GAP = 4  # white pixels between tiles


@dataclass
class Example:
    label: str
    task: str
    direction: str
    caption: str
    prompt_kwargs: dict
    conditions: list[torch.Tensor]  # (3, H, W) in [-1, 1], in frame order of the condition pictures
    truth: list[np.ndarray]  # (H, W, 3) in [0, 1], in frame order of the target pictures
    cameras: torch.Tensor | None  # (V, 4, 4) camera-to-world, OpenGL
    height: int
    width: int


def pick_examples(plan, builds, image_tokenizer) -> list[Example]:
    """One example per mixture item the stage draws (plan.active)."""
    examples = []
    for item in plan.active:
        _, choices = plan.epoch(item, 0)[0]
        choice = choices[0]
        info = plan.rows[choice.row]
        row = builds[info.build].row(info.shard, info.index)
        examples.append(_example(plan.mixture[item].label, plan.mixture[item].task, choice, row, image_tokenizer))
    return examples


def _example(label: str, task_name: str, choice, row: dict, image_tokenizer) -> Example:
    task = get_task(task_name)
    layout, keys, ordered = frame_keys(task, choice, row)
    cameras = camera_to_world(ordered) if ordered else None
    pixels = {i: _decode(image_tokenizer, row["latents"][key][0]) for i, key in keys.items()}
    conditions = [pixels[i] for i, target in enumerate(layout.target_mask) if not target and i in pixels]
    truth = [_as_array(pixels[i]) for i, target in enumerate(layout.target_mask) if target and i in pixels]
    height, width = next(iter(pixels.values())).shape[-2:]
    return Example(label, task.name, choice.direction, caption_text(row, choice),
                   prompt_kwargs(task, row, max(choice.view, 0)),
                   conditions, truth, cameras, int(height), int(width))


def _decode(image_tokenizer, latent: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return image_tokenizer.decode(latent[None].float())[0].float().clamp(-1, 1).cpu()


def _as_array(pixels: torch.Tensor) -> np.ndarray:
    return (pixels / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()


def sample_grid(pipe, example: Example, *, steps: int, guidance_scale: float, seed: int):
    """The example's grid as a PIL image: conditions | generated | ground truth."""
    result = pipe(example.task, example.caption, images=example.conditions or None, direction=example.direction,
                  cameras=example.cameras, height=example.height, width=example.width, num_inference_steps=steps,
                  guidance_scale=guidance_scale, seed=seed, output_type="np", progress=False,
                  prompt_kwargs=example.prompt_kwargs or None)
    tiles = [_as_array(c) for c in example.conditions] + list(result.images) + example.truth
    return _strip(tiles)


def _strip(tiles: list[np.ndarray]):
    from PIL import Image

    height = max(t.shape[0] for t in tiles)
    width = sum(t.shape[1] for t in tiles) + GAP * (len(tiles) - 1)
    canvas = np.ones((height, width, 3), dtype=np.float32)
    x = 0
    for tile in tiles:
        canvas[:tile.shape[0], x:x + tile.shape[1]] = tile[..., :3]
        x += tile.shape[1] + GAP
    return Image.fromarray((canvas * 255).round().astype(np.uint8))


def artifact_path(stage: str, step: int, label: str) -> str:
    return f"samples/{stage}/step_{step:06d}/{label.replace(':', '_')}.png"


__all__ = ["Example", "artifact_path", "pick_examples", "sample_grid"]
