"""Registry of the OneDiffusion tasks (ONEDIFFUSION_SPEC.md §2.2, §5.1): task token, views in frame order, which
views are generated in each direction, and the prompt syntax.

A task is selected only by its token at the start of the prompt and by the choice of views to denoise. Frame orders:

* image ↔ condition tasks: frame 0 = RGB image, frame 1 = condition; "generate" denoises frame 0 from the condition
  (`denoise_mask=[1, 0]`), "estimate" denoises the condition from the image (`[0, 1]`, depth/pose/... estimation).
* ID customization / subject-driven: frame 0 = target, frames 1..k = reference images.
* multiview: [img_0, ray_0, img_1, ray_1, …]; camera 0 is the reference (identity pose). Directions:
  "novel_view_synthesis" (image 0 and every ray frame known, other images generated), "pose_estimation" (every image
  known, every ray frame generated, as spec §2.3 describes), "text_to_multiview" (rays known, every image generated).
  `multiview_target_mask` builds any other split (several known images, known or unknown poses).

Target masks are tuples of bools in frame order, True = the view is denoised (a target), False = a clean condition.

Prompt strings follow the release's PROMPT_GUIDE, gradio_demo.py and inference.py: the token, one space, then the
task syntax (`[[img0]] … [[img1]] …`, `<item: …>`, `<#00FFFF cyan mask: class>`) and the caption, whitespace collapsed
(T5's tokenizer collapses it anyway). The release's own semantic-map example writes `<#00ffff Cyan mask: dragon>`
(and `<#ff0000 yellow mask: bird>`); the guide's upper-case hex with the lower-case colour name is used here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

# The 20 colours the prompt guide allows for semantic-map and bounding-box prompts (spec §5.1), name -> hex.
PALETTE: Mapping[str, str] = MappingProxyType({
    "red": "#FF0000",
    "lime": "#00FF00",
    "blue": "#0000FF",
    "yellow": "#FFFF00",
    "magenta": "#FF00FF",
    "cyan": "#00FFFF",
    "orange": "#FFA500",
    "purple": "#800080",
    "brown": "#A52A2A",
    "green": "#008000",
    "pink": "#FFC0CB",
    "teal": "#008080",
    "darkorange": "#FF8C00",
    "blueviolet": "#8A2BE2",
    "darkgreen": "#006400",
    "orangered": "#FF4500",
    "navy": "#000080",
    "gold": "#FFD700",
    "turquoise": "#40E0D0",
    "orchid": "#DA70D6",
})


def assign_class_colours(class_names: Sequence[str], rng) -> dict[str, str]:
    """A random distinct PALETTE colour name per class, from one `rng.permutation` draw (a numpy Generator seeded
    per sample): the One-Gen recipe of random class-to-colour assignment, shared by the synthetic world and the
    segmentation labeller."""
    if len(class_names) > len(PALETTE):
        raise ValueError(f"at most {len(PALETTE)} classes can get distinct palette colours, got {len(class_names)}")
    names = list(PALETTE)
    order = rng.permutation(len(names))
    return {c: names[int(order[i])] for i, c in enumerate(class_names)}

# How a task's prompt is assembled (see Task.build_prompt).
PROMPT_STYLES = ("caption", "colour_mask", "colour_box", "faceid", "subject_driven", "multiview")
# How a task's views extend beyond its default count (see Task.target_mask).
VIEW_LAYOUTS = ("fixed", "references", "camera_pairs")

_IMAGE_TAG = "[[img{}]]"
_TOKEN_RE = re.compile(r"\[\[[a-z0-9_]+\]\]")


def _mask(*bits: int) -> tuple[bool, ...]:
    return tuple(bool(b) for b in bits)


@dataclass(frozen=True)
class Task:
    """One task: token, default views in frame order, view-count range, directions → target masks, prompt style.

    `view_roles`/`directions` describe the default view count (`len(view_roles)`); `view_roles_for(n)` and
    `target_mask(direction, n)` extend them to any allowed count according to `view_layout`:
    "fixed" (exactly the default), "references" (extra trailing reference views, always conditions) or
    "camera_pairs" (multiview: (image, rays) per camera; cameras ≥ 1 repeat camera 1's pattern)."""

    name: str
    token: str
    view_roles: tuple[str, ...]
    min_views: int
    max_views: int
    directions: Mapping[str, tuple[bool, ...]] = field(hash=False)
    prompt_style: str = "caption"
    view_layout: str = "fixed"
    description: str = ""

    def __post_init__(self):
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"task {self.name}: prompt_style {self.prompt_style!r} not in {PROMPT_STYLES}")
        if self.view_layout not in VIEW_LAYOUTS:
            raise ValueError(f"task {self.name}: view_layout {self.view_layout!r} not in {VIEW_LAYOUTS}")
        for direction, mask in self.directions.items():
            if len(mask) != len(self.view_roles):
                raise ValueError(f"task {self.name}: direction {direction!r} has {len(mask)} entries for "
                                 f"{len(self.view_roles)} views")
        if self.view_layout == "fixed" and not self.min_views == self.max_views == len(self.view_roles):
            raise ValueError(f"task {self.name}: a fixed layout needs min_views = max_views = len(view_roles)")
        if self.min_views < len(self.view_roles) or self.max_views < self.min_views:
            raise ValueError(f"task {self.name}: view_roles describe the smallest allowed sequence; need "
                             f"len(view_roles) <= min_views <= max_views")
        object.__setattr__(self, "directions", MappingProxyType(dict(self.directions)))

    @property
    def num_views(self) -> int:
        """The default number of views (frames)."""
        return len(self.view_roles)

    def check_num_views(self, num_views: int) -> int:
        if not self.min_views <= num_views <= self.max_views:
            raise ValueError(f"task {self.name} takes {self.min_views}..{self.max_views} views; got {num_views}.")
        if self.view_layout == "camera_pairs" and num_views % 2:
            raise ValueError(f"task {self.name} takes (image, rays) pairs: the number of views must be even, "
                             f"got {num_views}.")
        return num_views

    def view_roles_for(self, num_views: int | None = None) -> tuple[str, ...]:
        """View roles in frame order for `num_views` views (default: the task's default count)."""
        n = self.check_num_views(num_views or self.num_views)
        if n == self.num_views:
            return self.view_roles
        if self.view_layout == "references":
            return self.view_roles + (self.view_roles[-1],) * (n - self.num_views)
        return multiview_roles(n // 2)

    def target_mask(self, direction: str, num_views: int | None = None) -> tuple[bool, ...]:
        """Target views (True = denoised) of `direction` for `num_views` views, in frame order."""
        if direction not in self.directions:
            raise ValueError(f"task {self.name} has no direction {direction!r}; valid: {sorted(self.directions)}")
        base = self.directions[direction]
        n = self.check_num_views(num_views or self.num_views)
        if n == self.num_views:
            return base
        if self.view_layout == "references":
            return base + (base[-1],) * (n - len(base))
        return base[:2] + base[2:4] * (n // 2 - 1)

    def build_prompt(self, caption: str = "", **kwargs) -> str:
        """The prompt with the task token and the task's extra syntax.

        caption: the target caption (the instruction for editing). Per style, keyword arguments:
        * colour_mask / colour_box: `entries` = sequence of (class name, colour name) with colour names from PALETTE,
          rendered `<#00FFFF cyan mask: dragon>` / `<#00FFFF cyan boundingbox: head>` before the caption;
        * faceid: `reference_captions` = captions of the reference images 1..k → `[[faceid]] [[img0]] caption
          [[img1]] ref 1 …`;
        * subject_driven: `item` (subject name) and `reference_captions` (one) → `[[subject_driven]] <item: …>
          [[img0]] caption [[img1]] source caption`;
        * multiview / caption: `token caption`, or only the token when the caption is empty."""
        caption = " ".join(caption.split())
        style = self.prompt_style
        if style == "caption" or style == "multiview":
            _reject_unused(self.name, kwargs)
            return _join(self.token, caption)
        if style in ("colour_mask", "colour_box"):
            entries = kwargs.pop("entries", ())
            _reject_unused(self.name, kwargs)
            kind = "mask" if style == "colour_mask" else "boundingbox"
            return _join(self.token, *(colour_entry(label, colour, kind) for label, colour in entries), caption)
        references = list(kwargs.pop("reference_captions", ()))
        if style == "faceid":
            _reject_unused(self.name, kwargs)
            if not 1 <= len(references) <= self.max_views - 1:
                raise ValueError(f"task {self.name}: give 1..{self.max_views - 1} reference captions; "
                                 f"got {len(references)}.")
            parts = [self.token, _IMAGE_TAG.format(0), caption]
            for index, reference in enumerate(references, start=1):
                parts += [_IMAGE_TAG.format(index), " ".join(reference.split())]
            return _join(*parts)
        # subject_driven
        item = kwargs.pop("item", None)
        _reject_unused(self.name, kwargs)
        if not item:
            raise ValueError(f"task {self.name}: build_prompt needs item='name of the subject'.")
        if len(references) != 1:
            raise ValueError(f"task {self.name}: give exactly one reference (source) caption; got {len(references)}.")
        return _join(self.token, f"<item: {' '.join(item.split())}>", _IMAGE_TAG.format(0), caption,
                     _IMAGE_TAG.format(1), " ".join(references[0].split()))


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _reject_unused(task: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"task {task}: build_prompt got unexpected arguments {sorted(kwargs)}.")


def colour_entry(label: str, colour: str, kind: str = "mask") -> str:
    """`<#00FFFF cyan mask: dragon>` (kind "mask") or `<#00FFFF cyan boundingbox: head>` (kind "boundingbox")."""
    if colour not in PALETTE:
        raise ValueError(f"colour {colour!r} is not one of the 20 prompt colours: {', '.join(PALETTE)}.")
    if kind not in ("mask", "boundingbox"):
        raise ValueError(f"kind must be 'mask' or 'boundingbox'; got {kind!r}.")
    return f"<{PALETTE[colour]} {colour} {kind}: {' '.join(label.split())}>"


# ----------------------------------------------------------------------------------------------------------------------
# Multiview helpers
# ----------------------------------------------------------------------------------------------------------------------


def multiview_roles(num_cameras: int) -> tuple[str, ...]:
    """("image", "rays") per camera: [img_0, ray_0, img_1, ray_1, …]."""
    if num_cameras < 1:
        raise ValueError(f"num_cameras must be >= 1; got {num_cameras}.")
    return ("image", "rays") * num_cameras


def multiview_target_mask(num_cameras: int, known_images: Sequence[int] = (0,),
                          known_rays: Sequence[int] | None = None) -> tuple[bool, ...]:
    """Target mask over [img_0, ray_0, …]: images not in `known_images` and rays not in `known_rays` (None = all
    rays known) are denoised. NVS: known_images=(0,); pose estimation: known_images=all, known_rays=(); text →
    multiview: known_images=()."""
    cameras = range(num_cameras)
    for name, indices in (("known_images", known_images), ("known_rays", known_rays or ())):
        bad = [i for i in indices if i not in cameras]
        if bad:
            raise ValueError(f"{name} {bad} out of range for {num_cameras} cameras.")
    rays = set(cameras if known_rays is None else known_rays)
    images = set(known_images)
    return tuple(flag for c in cameras for flag in (c not in images, c not in rays))


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------

_BOTH_WAYS = {"generate": _mask(1, 0), "estimate": _mask(0, 1)}
_GENERATE_ONLY = {"generate": _mask(1, 0)}


def _pair_task(name: str, token: str, condition: str, directions=_BOTH_WAYS, prompt_style="caption",
               description="") -> Task:
    return Task(name=name, token=token, view_roles=("image", condition), min_views=2, max_views=2,
                directions=directions, prompt_style=prompt_style, description=description)


_ALL_TASKS = (
    Task(name="text2image", token="[[text2image]]", view_roles=("image",), min_views=1, max_views=1,
         directions={"generate": _mask(1)}, description="text → image"),
    _pair_task("deblurring", "[[deblurring]]", "blurred_image", _GENERATE_ONLY, description="blurred → sharp image"),
    _pair_task("image_inpainting", "[[image_inpainting]]", "masked_image", _GENERATE_ONLY,
               description="image with the hole painted gray (128, 128, 128) → completed image"),
    _pair_task("canny2image", "[[canny2image]]", "canny", description="canny edges ↔ image"),
    _pair_task("depth2image", "[[depth2image]]", "depth", description="depth ↔ image"),
    _pair_task("hed2img", "[[hed2img]]", "hed", description="HED edges ↔ image"),
    _pair_task("pose2image", "[[pose2image]]", "pose", description="human pose ↔ image"),
    _pair_task("semanticmap2image", "[[semanticmap2image]]", "semantic_map", prompt_style="colour_mask",
               description="semantic map ↔ image; classes as <#hex colour mask: class>"),
    _pair_task("boundingbox2image", "[[boundingbox2image]]", "bounding_boxes", prompt_style="colour_box",
               description="bounding boxes ↔ image; classes as <#hex colour boundingbox: class>"),
    _pair_task("image_editing", "[[image_editing]]", "source_image", _GENERATE_ONLY,
               description="instruction editing; the caption is the instruction"),
    Task(name="faceid", token="[[faceid]]", view_roles=("image", "reference"), min_views=2, max_views=5,
         directions={"generate": _mask(1, 0)}, prompt_style="faceid", view_layout="references",
         description="ID customization: frame 0 target, frames 1..k references"),
    Task(name="subject_driven", token="[[subject_driven]]", view_roles=("image", "reference"), min_views=2,
         max_views=2, directions={"generate": _mask(1, 0)}, prompt_style="subject_driven",
         description="subject-driven generation: frame 0 target, frame 1 the subject"),
    Task(name="multiview", token="[[multiview]]", view_roles=multiview_roles(2), min_views=4, max_views=12,
         directions={
             "novel_view_synthesis": multiview_target_mask(2, known_images=(0,)),
             "pose_estimation": multiview_target_mask(2, known_images=(0, 1), known_rays=()),
             "text_to_multiview": multiview_target_mask(2, known_images=()),
         },
         prompt_style="multiview", view_layout="camera_pairs",
         description="2-6 cameras as [img_0, ray_0, img_1, ray_1, ...]; caption optional"),
)

TASKS: Mapping[str, Task] = MappingProxyType({task.name: task for task in _ALL_TASKS})
_BY_TOKEN = {task.token: task for task in _ALL_TASKS}
_ALIASES = {"semantic2image": "semanticmap2image", "hed2image": "hed2img", "inpainting": "image_inpainting",
            "canny": "canny2image", "t2i": "text2image", "id_customization": "faceid"}


def get_task(name: str) -> Task:
    """The task registered as `name` (or a token such as "[[depth2image]]", or a common alias)."""
    key = name.strip()
    if key in TASKS:
        return TASKS[key]
    if key in _BY_TOKEN:
        return _BY_TOKEN[key]
    if key in _ALIASES:
        return TASKS[_ALIASES[key]]
    raise KeyError(f"unknown task {name!r}; valid names: {', '.join(TASKS)}.")


def parse_prompt(prompt: str) -> tuple[Task | None, str]:
    """(task, rest of the prompt) from the task token at the start of `prompt`; (None, prompt) if it has none.

    Only a registered task token counts: `[[img0]]` markers are not task tokens."""
    for match in _TOKEN_RE.finditer(prompt):
        task = _BY_TOKEN.get(match.group(0))
        if task is not None:
            rest = (prompt[:match.start()] + prompt[match.end():]).strip()
            return task, " ".join(rest.split())
    return None, prompt


def task_from_prompt(prompt: str) -> Task:
    """The task whose token the prompt contains; KeyError naming the valid tokens when there is none."""
    task, _ = parse_prompt(prompt)
    if task is None:
        raise KeyError(f"prompt has no task token: {prompt[:80]!r}; valid tokens: {', '.join(_BY_TOKEN)}.")
    return task
