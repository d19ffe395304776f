"""One view-sequence and batch layer, used by the inference pipeline and the trainer alike, so both put the same
frames in the same order with the same roles, targets, prompts and ray frames.

    task + direction (or denoise mask) + counts  ->  ViewLayout   roles and target mask in frame order (model.tasks)
    layout + view latents / cameras + caption    ->  ViewSample   (T, 16, h, w) latents, ray frames from cameras
    samples                                      ->  collate() -> Batches grouped by (T, h, w)

Ray frames are computed here from cameras (model.cameras conventions, relative to the first camera whose rays are
given, as the release does with the poses it is handed); picture views carry latents the caller encoded (the
pipeline encodes condition images with its image tokenizer; the data build pre-encodes them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model import cameras as camera_utils
from model.tasks import Task, get_task, parse_prompt

RAY_ROLE = "rays"
DEPTH_ROLE = "depth"


@dataclass(frozen=True)
class ViewLayout:
    """The frames of one sample: roles and target mask (True = generated) in frame order."""

    task: Task
    roles: tuple[str, ...]
    target_mask: tuple[bool, ...]

    @property
    def num_views(self) -> int:
        return len(self.roles)

    @property
    def num_cameras(self) -> int:
        return self.roles.count(RAY_ROLE)

    def indices(self, *, target: bool, rays: bool) -> list[int]:
        """Frames that are (not) targets and (not) ray frames."""
        return [i for i, (role, is_target) in enumerate(zip(self.roles, self.target_mask))
                if is_target == target and (role == RAY_ROLE) == rays]

    @property
    def picture_conditions(self) -> list[int]:
        return self.indices(target=False, rays=False)

    @property
    def ray_conditions(self) -> list[int]:
        return self.indices(target=False, rays=True)

    @property
    def picture_targets(self) -> list[int]:
        return self.indices(target=True, rays=False)

    @property
    def ray_targets(self) -> list[int]:
        return self.indices(target=True, rays=True)

    def check_images(self, num_images: int) -> None:
        """The caller must hand one image per picture condition."""
        if num_images != len(self.picture_conditions):
            raise ValueError(
                f"task {self.task.name} with target mask {[int(t) for t in self.target_mask]} (roles "
                f"{list(self.roles)}) has {len(self.picture_conditions)} condition image view(s) (frames "
                f"{self.picture_conditions}); got {num_images} image(s)."
            )


def view_layout(task: Task | str, *, direction: str | None = None, denoise_mask: Sequence[int] | None = None,
                num_images: int = 0, num_cameras: int | None = None) -> ViewLayout:
    """The layout of `task` for a direction (default: the task's first) or an explicit 0/1 denoise mask.

    The number of views follows the task: fixed tasks their own count, reference tasks 1 + #images, multiview
    2 × #cameras (pose estimation without cameras: one camera per image)."""
    spec = get_task(task) if isinstance(task, str) else task
    if denoise_mask is not None:
        if direction is not None:
            raise ValueError("pass either direction= or denoise_mask=, not both.")
        target_mask = tuple(bool(int(b)) for b in denoise_mask)
        return ViewLayout(spec, spec.view_roles_for(len(target_mask)), target_mask)
    direction = direction or next(iter(spec.directions))
    if spec.view_layout == "fixed":
        num_views = spec.num_views
    elif spec.view_layout == "references":
        num_views = 1 + num_images  # frame 0 is the target, every image a reference
    else:
        if num_cameras is None:
            if direction != "pose_estimation":
                raise ValueError(f"task {spec.name} direction {direction!r} needs cameras= to know the number "
                                 "of cameras (and their ray frames).")
            num_cameras = num_images
        num_views = 2 * num_cameras
    return ViewLayout(spec, spec.view_roles_for(num_views), spec.target_mask(direction, num_views))


def full_prompt(task: Task, caption: str, prompt_kwargs: Mapping | None = None) -> str:
    """The prompt as the model reads it: the caption with the task token and syntax (Task.build_prompt), unless it
    already carries a task token (which must then be this task's)."""
    task_in_prompt, _ = parse_prompt(caption)
    if task_in_prompt is not None:
        if task_in_prompt.name != task.name:
            raise ValueError(f"prompt carries the token {task_in_prompt.token} but task={task.name!r}.")
        return caption
    return task.build_prompt(caption, **dict(prompt_kwargs or {}))


def ray_frames(cameras, num_cameras: int, indices: Sequence[int], h: int, w: int,
               focal: float = camera_utils.RELEASE_FOCAL) -> torch.Tensor:
    """(len(indices), 16, h, w) ray frames of the cameras `indices` (ascending), relative to the first of them.

    cameras: one entry per camera: (azimuth°, elevation°[, distance]) on the release's z-up sphere, or (V, 4, 4)
    OpenGL camera-to-world matrices; entries not in `indices` may be None."""
    indices = list(indices)
    if len(cameras) != num_cameras:
        raise ValueError(f"{len(cameras)} cameras for a sequence of {num_cameras} cameras (give None for cameras "
                         "whose rays are generated).")
    missing = [i for i in indices if cameras[i] is None]
    if missing:
        raise ValueError(f"the ray frames of camera {', '.join(map(str, missing))} are conditions but the camera is "
                         "None; give its pose or generate its rays.")
    if isinstance(cameras, (torch.Tensor, np.ndarray)) and tuple(np.shape(cameras))[-2:] == (4, 4):
        c2w_gl = torch.as_tensor(np.asarray(cameras), dtype=torch.float64)[indices]
        c2w = camera_utils.relative_to_first(camera_utils.opengl_to_opencv(c2w_gl))
        return camera_utils.rays_to_latent(camera_utils.plucker_rays(c2w, h, w, focal)).float()
    if all(np.shape(cameras[i]) == (4, 4) for i in indices):
        stacked = np.stack([np.asarray(c, dtype=np.float64) if c is not None else np.eye(4) for c in cameras])
        return ray_frames(stacked, num_cameras, indices, h, w, focal)
    params = [tuple(float(v) for v in cameras[i]) for i in indices]
    if any(len(p) not in (2, 3) for p in params):
        raise ValueError("cameras must be (azimuth°, elevation°[, distance]) per camera or (V, 4, 4) OpenGL c2w.")
    distances = [p[2] if len(p) == 3 else camera_utils.RELEASE_DISTANCE for p in params]
    return camera_utils.ray_latents_from_spherical([p[0] for p in params], [p[1] for p in params], distances,
                                                   height=h, width=w, focal=focal)


@dataclass
class ViewSample:
    """One sample's view sequence: clean latents (T, C, h, w) float32 (zeros where unknown: targets at inference),
    its layout and the prompt the text encoder reads."""

    latents: torch.Tensor
    layout: ViewLayout
    prompt: str

    @property
    def key(self) -> tuple[int, int, int]:
        """Samples batch together when they share (T, h, w)."""
        return (self.latents.shape[0], self.latents.shape[-2], self.latents.shape[-1])


def build_sample(layout: ViewLayout, prompt: str, *, size: tuple[int, int], channels: int = 16,
                 picture_latents: Mapping[int, torch.Tensor] | None = None, cameras=None,
                 ray_views: Sequence[int] | None = None, focal: float = camera_utils.RELEASE_FOCAL) -> ViewSample:
    """A ViewSample from per-frame picture latents and cameras.

    picture_latents: frame index -> (C, h, w) latent of a picture view (conditions at inference; every picture
        view in training). size: (h, w) of the latent grid.
    ray_views: the ray frames computed from `cameras` (default: the layout's ray conditions; training passes every
        ray frame); they are relative to the first of them."""
    h, w = size
    latents = torch.zeros(layout.num_views, channels, h, w, dtype=torch.float32)
    for index, latent in (picture_latents or {}).items():
        if layout.roles[index] == RAY_ROLE:
            raise ValueError(f"frame {index} is a ray frame; its latent comes from cameras=, not an image.")
        if tuple(latent.shape) != (channels, h, w):
            raise ValueError(f"frame {index}: latent of shape {tuple(latent.shape)}; expected {(channels, h, w)}.")
        latents[index] = latent.float()
    rays = layout.ray_conditions if ray_views is None else list(ray_views)
    if rays:
        if cameras is None:
            raise ValueError(f"task {layout.task.name}: ray frames {rays} are conditions, so pass cameras= "
                             "((azimuth, elevation[, distance]) per camera, or (V, 4, 4) OpenGL c2w).")
        latents[rays] = ray_frames(cameras, layout.num_cameras, [i // 2 for i in rays], h, w, focal)
    return ViewSample(latents=latents, layout=layout, prompt=prompt)


@dataclass
class Batch:
    """Samples with the same (T, h, w), stacked: what the sampler and the objective consume.

    latents (B, T, C, h, w) float32; target_mask (B, T) bool (True = generated / in the loss as a target);
    view_mask (B, T) bool (True = a real view; collate never pads today, so all True); roles and tasks per sample;
    prompts as the text encoder reads them."""

    latents: torch.Tensor
    target_mask: torch.Tensor
    view_mask: torch.Tensor
    prompts: list[str]
    roles: list[tuple[str, ...]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def condition_mask(self) -> torch.Tensor:
        return self.view_mask & ~self.target_mask

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = dict(device=device, non_blocking=non_blocking)
        return Batch(self.latents.to(**move), self.target_mask.to(**move), self.view_mask.to(**move),
                     list(self.prompts), list(self.roles), list(self.tasks))


def stack(samples: Sequence[ViewSample]) -> Batch:
    """One Batch from samples of one (T, h, w)."""
    keys = {s.key for s in samples}
    if len(keys) != 1:
        raise ValueError(f"samples of different (views, h, w) {sorted(keys)} cannot share a batch; use collate().")
    return Batch(
        latents=torch.stack([s.latents for s in samples]),
        target_mask=torch.tensor([s.layout.target_mask for s in samples], dtype=torch.bool),
        view_mask=torch.ones(len(samples), samples[0].latents.shape[0], dtype=torch.bool),
        prompts=[s.prompt for s in samples],
        roles=[s.layout.roles for s in samples],
        tasks=[s.layout.task.name for s in samples],
    )


def collate(samples: Sequence[ViewSample]) -> list[Batch]:
    """Batches grouped by (T, h, w), groups in order of first appearance, samples in input order within a group."""
    groups: dict[tuple[int, int, int], list[ViewSample]] = {}
    for sample in samples:
        groups.setdefault(sample.key, []).append(sample)
    return [stack(group) for group in groups.values()]


__all__ = [
    "Batch", "DEPTH_ROLE", "RAY_ROLE", "ViewLayout", "ViewSample", "build_sample", "collate", "full_prompt",
    "ray_frames", "stack", "view_layout",
]
