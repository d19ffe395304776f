"""From a build row and a task to the view sequence the model trains on.

    supported_directions(row, task)          which directions of a task a row can feed (its latents, cameras, views)
    make_sample(row, choice, ...)            the ViewSample (model/views.py, as the pipeline lays it out) and prompt

A row is a build's parquet row (onegen/shards.py): one sample or one multiview group, with per-view latents keyed by
(view, modality). The frames, their order, roles and target masks come from `model.views.view_layout`, the prompt from
the task's own builder (`model.views.full_prompt` / `Task.build_prompt`): the trainer and the inference pipeline share
both, so a model is trained on exactly the sequences and prompts it is later sampled with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from model.tasks import Task, get_task
from model.views import RAY_ROLE, ViewLayout, ViewSample, build_sample, full_prompt, view_layout
from onegen.dataset import prompt_kwargs
from onegen.shards import MODALITIES

MAX_CAMERAS = get_task("multiview").max_views // 2


@dataclass(frozen=True)
class Choice:
    """One sample of a global step, fixed by the plan: which row, which mixture item and direction, which picture
    view (single-view tasks; -1 for multiview, which takes the row's views) and which caption."""

    row: int
    item: int
    direction: str
    view: int
    caption: int


def supported_directions(task: Task, directions: tuple[str, ...], keys: frozenset, num_views: int,
                         has_cameras: bool) -> tuple[str, ...]:
    """The directions of `task` (among `directions`) a row can feed: every frame's modality among its latent keys
    {(view, modality)} for at least one picture view, cameras for every view for multiview."""
    if task.view_layout == "camera_pairs":
        ok = has_cameras and num_views >= 2 and all((v, "image") in keys for v in range(num_views))
        return directions if ok else ()
    if task.view_layout != "fixed" or any(role not in MODALITIES for role in task.view_roles):
        return ()  # reference tasks need identity sets, and some roles (hed, source_image) no build writes yet
    return directions if usable_views(task, keys, num_views) else ()


def sequence_frames(task: Task, num_views: int) -> int:
    """The frames of the sequence a row of `num_views` views gives a task: 2 per camera (up to MAX_CAMERAS) for
    multiview, the task's own count otherwise."""
    return 2 * min(num_views, MAX_CAMERAS) if task.view_layout == "camera_pairs" else task.num_views


def usable_views(task: Task, keys: frozenset, num_views: int) -> list[int]:
    """Picture views of a row that carry every modality a single-view task needs."""
    return [v for v in range(num_views) if all((v, role) in keys for role in task.view_roles)]


def _latent(row: Mapping, key: tuple[int, str], generator: torch.Generator | None, sample: bool) -> torch.Tensor:
    mean, std = row["latents"][key]
    if not sample or std is None:
        return mean
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


def caption_text(row: Mapping, choice: Choice) -> str:
    captions = row.get("captions") or []
    return captions[choice.caption]["text"] if captions else ""


def frame_keys(task: Task, choice: Choice, row: Mapping) -> tuple[ViewLayout, dict[int, tuple[int, str]], list]:
    """The layout of a planned choice, the latent key (view, modality) of each picture frame by frame index (ray
    frames have none) and, for multiview, the row's cameras in frame order ([] otherwise). The training sample and
    the sample grids (training/sample_grid.py) both read a row through it."""
    if task.view_layout == "camera_pairs":
        cameras = sorted(row["cameras"], key=lambda c: c["view"])[:MAX_CAMERAS]
        layout = view_layout(task, direction=choice.direction, num_cameras=len(cameras))
        return layout, {2 * i: (camera["view"], "image") for i, camera in enumerate(cameras)}, cameras
    layout = view_layout(task, direction=choice.direction)
    return layout, {i: (choice.view, role) for i, role in enumerate(layout.roles)}, []


def camera_to_world(cameras: list) -> torch.Tensor:
    """(V, 4, 4) float64 OpenGL camera-to-world matrices of the cameras."""
    return torch.tensor([camera["c2w_opengl"] for camera in cameras], dtype=torch.float64).reshape(-1, 4, 4)


def make_sample(row: Mapping, choice: Choice, task_name: str, generator: torch.Generator | None = None,
                sample_posterior: bool = True) -> ViewSample:
    """The ViewSample of `row` for a planned choice. Latents: the posterior mean, or mean + std·ε drawn from
    `generator` (sample_posterior); ray frames from the row's cameras (focal from K, in the release's unit-image
    convention)."""
    task = get_task(task_name)
    caption = caption_text(row, choice)
    size = (row["latents"][(max(choice.view, 0), "image")][0].shape[-2:])
    layout, keys, cameras = frame_keys(task, choice, row)
    pictures = {i: _latent(row, key, generator, sample_posterior) for i, key in keys.items()}
    if task.view_layout == "camera_pairs":
        focal = _unit_focal(cameras[0], row["bucket_w"])
        return build_sample(layout, full_prompt(task, caption), size=tuple(size), picture_latents=pictures,
                            cameras=camera_to_world(cameras),
                            ray_views=[i for i, role in enumerate(layout.roles) if role == RAY_ROLE],
                            **({} if focal is None else {"focal": focal}))
    prompt = full_prompt(task, caption, prompt_kwargs(task, row, choice.view))
    return build_sample(layout, prompt, size=tuple(size), picture_latents=pictures)


def _unit_focal(camera: Mapping, width: int) -> float | None:
    """K's fx over the image width: the release's unit-image focal (model.cameras.RELEASE_FOCAL); None without K."""
    K = camera.get("K")
    return None if not K else float(K[0]) / float(width)


__all__ = ["Choice", "MAX_CAMERAS", "camera_to_world", "caption_text", "frame_keys", "make_sample", "prompt_kwargs",
           "sequence_frames", "supported_directions", "usable_views"]
