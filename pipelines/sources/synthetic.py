"""The synthetic One-Gen world as a data source: seeded procedural 3D scenes with exact labels, as `Sample`s.

    for sample in synthetic_samples(seed=0, num_scenes=100, views_per_scene=4, size=128):
        ...  # sample.image, .depth, .instance, .semantic, .keypoints, .camera, .captions, .entities

`synthetic_samples` is the iterator the build job consumes (it treats the synthetic world as one more source, like
folders or URL lists); `render_shard_bytes` packs whole scenes into one WebDataset tar, the shards `onegen synth
render` (onegen/cli/synth.py, through `write_wds_shards`) writes, named by `shard_name` from the seed, the first
scene and a digest of every other setting that changes their bytes (`shard_settings_digest`). Scene i of a run
with seed s depends only on (s, i) (`SeedSequence([s, i])`), so any range of scenes can be rendered independently,
by any worker, in any order, with byte-identical results.

Pieces: synthetic_scene (palette, classes, figures, generation), synthetic_camera (spherical cameras, spec §2.3),
synthetic_geometry (ray–primitive kernels), synthetic_render (images and labels), synthetic_caption (captions and
prompt fields). Conventions (depth = z-depth with sky = 0, COCO visibility, caption frames) are documented there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from model.tasks import assign_class_colours
from onegen.storage import Storage
from pipelines.record import Sample, as_storage, samples_to_wds_tar, storage_location
from pipelines.sources.synthetic_camera import Camera, camera_from_spherical
from pipelines.sources.synthetic_caption import (
    describe_view, prompt_tags, visible_entity_ids,
)
from pipelines.sources.synthetic_render import ViewRender, render
from pipelines.sources.synthetic_scene import (
    CLASS_ID, CLASSES, COCO_KEYPOINTS, COCO_SKELETON, PALETTE, PALETTE_HEX, Scene, SceneSpec, SyntheticConfig,
    figure_geometry, generate_scene, sample_camera_params, scene_seed_sequence,
)

SOURCE = "synthetic"
GENERATOR_VERSION = "onegen.synthetic/1"

__all__ = [
    "CLASSES", "COCO_KEYPOINTS", "COCO_SKELETON", "PALETTE", "Camera", "Scene", "SceneSpec", "SyntheticConfig",
    "ViewRender", "camera_from_spherical", "generate_scene", "render", "render_shard_bytes", "sample_key",
    "scene_cameras", "shard_name", "shard_settings_digest", "synthetic_samples", "view_to_sample", "write_wds_shards",
]


def sample_key(seed: int, scene_index: int, view_index: int) -> str:
    return f"synthetic-{seed}-{scene_index:06d}-v{view_index:02d}"


def group_key(seed: int, scene_index: int) -> str:
    return f"synthetic-{seed}-{scene_index:06d}"


def shard_settings_digest(num_scenes: int, config: SyntheticConfig, image_format: str = "png") -> str:
    """8 hex digits naming everything but (seed, first scene) that changes a shard's bytes: the scene count, every
    `SyntheticConfig` field (size, views, figures, ...), the image format and `GENERATOR_VERSION` (bump it when the
    renderer or the sample encoding changes what the same arguments produce). Stable across runs and machines."""
    settings = {"generator": GENERATOR_VERSION, "num_scenes": int(num_scenes), "image_format": image_format,
                "config": dataclasses.asdict(config)}
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def shard_name(seed: int, first_scene: int, settings_digest: str | None = None) -> str:
    """File name of the WebDataset shard whose first scene is `first_scene`:
    'synthetic-<seed>-<first:06d>-<settings_digest>.tar' (digest from `shard_settings_digest`), so a shard rendered
    with other settings never takes the name of this one (`--skip-existing` keeps only shards of equal content).
    Without a digest, 'synthetic-<seed>-<first:06d>.tar' names the scenes only, not how they were rendered."""
    suffix = f"-{settings_digest}" if settings_digest else ""
    return f"{group_key(seed, first_scene)}{suffix}.tar"


def scene_cameras(scene: Scene, rng: np.random.Generator, config: SyntheticConfig) -> list[Camera]:
    """`config.views_per_scene` cameras around the scene's target (view 0 is the multiview reference)."""
    return [
        camera_from_spherical(az, el, dist, scene.spec.target, config.image_size)
        for az, el, dist in sample_camera_params(rng, config.views_per_scene, config)
    ]


def _entity_records(scene: Scene, view: ViewRender, visible: set[int]) -> list[dict[str, Any]]:
    spec = scene.spec
    out: list[dict[str, Any]] = []
    for obj in spec.objects:
        centre = obj.centre
        out.append({
            "id": obj.id, "class": obj.shape, "colour": obj.colour, "colour_hex": PALETTE_HEX[obj.colour],
            "size": obj.size, "dimensions": dict(obj.dimensions), "yaw_deg": obj.yaw_deg,
            "centre": list(centre),
        })
    for p, fig in enumerate(spec.figures):
        top = figure_geometry(fig).top
        out.append({
            "id": fig.id, "class": "person", "colour": fig.colour, "colour_hex": PALETTE_HEX[fig.colour],
            "size": None, "dimensions": {"height": top}, "pose": fig.pose, "heading_deg": fig.heading_deg,
            "keypoint_index": p, "centre": [fig.position[0], fig.position[1], 0.5 * top],
        })
    for e in out:
        e["centre_camera"] = [float(x) for x in view.camera.world_to_camera(np.array(e["centre"]))]
        e["pixels"] = view.entity_pixels[e["id"]]
        box = view.entity_bboxes[e["id"]]
        e["bbox_2d"] = list(box) if box is not None else None
        e["visible"] = e["id"] in visible
    return out


def view_to_sample(
    scene: Scene,
    view: ViewRender,
    *,
    seed: int,
    scene_index: int,
    view_index: int,
    num_views: int,
    class_colours: dict[str, str],
    config: SyntheticConfig,
) -> Sample:
    """One rendered view as a `Sample` (labels, captions, camera, entities, prompt fields in meta)."""
    spec = scene.spec
    cam = view.camera
    visible = visible_entity_ids(view.entity_pixels, cam.width, cam.height, config.min_visible_fraction)
    sky_fraction = float(np.count_nonzero(view.semantic == CLASS_ID["sky"])) / view.semantic.size
    entities = _entity_records(scene, view, set(visible))
    captions, relations = describe_view(spec, cam, visible, sky_fraction)
    present_classes = sorted({e["class"] for e in entities if e["visible"]}, key=lambda c: CLASS_ID[c])
    sun_az, sun_el = spec.sun_azimuth_deg, spec.sun_elevation_deg
    meta = {
        "generator": GENERATOR_VERSION,
        "seed": int(seed),
        "scene_index": int(scene_index),
        "view_index": int(view_index),
        "num_views": int(num_views),
        "depth_valid": "depth > 0 (sky pixels are 0)",
        "keypoint_names": list(COCO_KEYPOINTS),
        "sun": {"azimuth": sun_az, "elevation": sun_el, "direction": list(spec.sun_direction)},
        "relations": relations,
        "prompts": {
            "class_colours": {c: {"name": n, "hex": PALETTE_HEX[n]} for c, n in class_colours.items()},
            "semantic": prompt_tags(present_classes, class_colours, "mask"),
            "boundingbox": prompt_tags(present_classes, class_colours, "boundingbox"),
        },
    }
    return Sample(
        key=sample_key(seed, scene_index, view_index),
        source=SOURCE,
        image=view.image,
        captions=captions,
        depth=view.depth,
        depth_kind="z",
        instance=view.instance,
        semantic=view.semantic,
        classes=list(CLASSES),
        entities=entities,
        keypoints=view.keypoints,
        camera=cam.to_dict(),
        group=group_key(seed, scene_index),
        meta=meta,
    )


def resolve_config(
    config: SyntheticConfig | None = None,
    *,
    views_per_scene: int | None = None,
    size: int | None = None,
    with_figures: bool | None = None,
) -> SyntheticConfig:
    """`config` (or the defaults) with the explicitly given overrides applied (and validated)."""
    config = config or SyntheticConfig()
    overrides = {k: v for k, v in (("views_per_scene", views_per_scene), ("image_size", size),
                                   ("with_figures", with_figures)) if v is not None}
    return dataclasses.replace(config, **overrides) if overrides else config


def render_scene(seed: int, scene_index: int, config: SyntheticConfig) -> tuple[Scene, list[ViewRender]]:
    """Scene `scene_index` of seed `seed`, rendered from its cameras (independent of every other scene)."""
    scene_seq, camera_seq, _ = scene_seed_sequence(seed, scene_index).spawn(3)
    return _render_seeded(scene_seq, camera_seq, config)


def _render_seeded(scene_seq: np.random.SeedSequence, camera_seq: np.random.SeedSequence,
                   config: SyntheticConfig) -> tuple[Scene, list[ViewRender]]:
    scene = generate_scene(np.random.default_rng(scene_seq), config)
    cameras = scene_cameras(scene, np.random.default_rng(camera_seq), config)
    return scene, render(scene, cameras, shadows=config.shadows)


def synthetic_samples(
    seed: int = 0,
    num_scenes: int = 1,
    views_per_scene: int | None = None,
    size: int | None = None,
    with_figures: bool | None = None,
    *,
    config: SyntheticConfig | None = None,
    first_scene: int = 0,
) -> Iterator[Sample]:
    """Samples of scenes first_scene .. first_scene + num_scenes - 1, views in order (keys `sample_key`).

    The source iterator of the build job. Arguments left as None come from `config` (default `SyntheticConfig()`).
    """
    config = resolve_config(config, views_per_scene=views_per_scene, size=size, with_figures=with_figures)
    if num_scenes < 0 or first_scene < 0:
        raise ValueError(f"num_scenes and first_scene must be >= 0, got {num_scenes} and {first_scene}")
    person_and_shapes = [c for c in CLASSES if c not in ("sky", "ground")]
    for i in range(first_scene, first_scene + num_scenes):
        # scene i's three streams: scene layout, cameras, prompt colours (the split `render_scene` uses)
        scene_seq, camera_seq, prompt_seq = scene_seed_sequence(seed, i).spawn(3)
        scene, views = _render_seeded(scene_seq, camera_seq, config)
        class_colours = assign_class_colours(person_and_shapes, np.random.default_rng(prompt_seq))
        for v, view in enumerate(views):
            yield view_to_sample(scene, view, seed=seed, scene_index=i, view_index=v, num_views=len(views),
                                 class_colours=class_colours, config=config)


def render_shard_bytes(seed: int, first_scene: int, num_scenes: int, config: SyntheticConfig,
                       image_format: str = "png") -> bytes:
    """One WebDataset tar (bytes) of every view of scenes first_scene .. first_scene + num_scenes - 1, in order.

    Member mtimes are 0, so the same scenes give the same bytes; read it back with
    `pipelines.record.samples_from_wds_tar`. The whole shard is built in memory (write it with `Storage.write_bytes`).
    """
    return samples_to_wds_tar(synthetic_samples(seed, num_scenes, config=config, first_scene=first_scene),
                              image_format)


def write_wds_shards(
    out: str | os.PathLike | Storage,
    seed: int,
    num_scenes: int,
    config: SyntheticConfig,
    *,
    first_scene: int = 0,
    scenes_per_shard: int = 100,
    image_format: str = "png",
    skip_existing: bool = False,
) -> list[Path | str]:
    """Write scenes [first_scene, first_scene + num_scenes) as WebDataset shards under the storage root `out`, each
    with one atomic `Storage.write_bytes`; returns their locations (`Path`s locally, s3:// URIs on S3), skipped ones
    included. Names: `shard_name` with `shard_settings_digest`. skip_existing: leave shards that exist
    (`Storage.exists`) untouched: same name, same content."""
    storage = as_storage(out)
    locations: list[Path | str] = []
    with tqdm(total=num_scenes * config.views_per_scene, desc="synth render", unit="img") as progress:
        for start in range(first_scene, first_scene + num_scenes, scenes_per_shard):
            count = min(scenes_per_shard, first_scene + num_scenes - start)
            name = shard_name(seed, start, shard_settings_digest(count, config, image_format))
            locations.append(storage_location(storage, name))
            if not (skip_existing and storage.exists(name)):
                storage.write_bytes(name, render_shard_bytes(seed, start, count, config, image_format))
            progress.update(count * config.views_per_scene)
    return locations
