"""Captions and prompt fields from the scene graph, per view.

What a caption mentions: exactly the entities *visible in that view* (instance pixels >= the config's
``min_visible_fraction`` of the image), each with its true palette colour name. Every object is a unique
(colour, shape) pair and every person wears a unique shirt colour, so "the red cube" always names one entity.

Frames of reference: "left"/"right" and "in front of"/"behind" are relative to the camera of that view, measured on the
ground plane: with ``right`` the camera's (horizontal) right vector and ``forward`` the horizontal viewing direction,
A is "to the left of" B when ``(A - B) . right < -0.15 m`` and "behind" B when ``(A - B) . forward > 0.15 m``
(centres of the entities' footprints). For a multiview group, view 0 is the reference camera (spec §2.2): take its
captions for the group.

* short: "a red sphere, a small blue cube and a person in an orange shirt on the ground" (left to right, no sizes
  except in the long form).
* long: scene intro, one sentence per visible entity front to back with size, position and a relation to an entity
  already described, the person's pose and facing, then where the sunlight comes from.

`scene_graph_relations` returns the relations the long caption states, as data, so tests can check every claim;
`describe_view` gives both (captions and relations) from one pass.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from model.tasks import colour_entry
from pipelines.sources.synthetic_camera import Camera, sin_cos_deg
from pipelines.sources.synthetic_scene import (
    COLOUR_WORDS, POSE_PHRASES, SceneSpec,
)

RELATION_MARGIN_M = 0.15
_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATION_WORDS = {"left_of": "to the left of", "right_of": "to the right of", "behind": "behind",
                  "in_front_of": "in front of", "next_to": "next to"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _count(n: int, noun: str) -> str:
    word = _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)
    plural = noun if n == 1 else ("people" if noun == "person" else noun + "s")
    return f"{word} {plural}"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


class _Entity:
    """View-independent description of one entity, plus its ground-plane footprint centre."""

    def __init__(self, eid: int, kind: str, colour: str, size: str | None, shape: str, xy, extra: dict):
        self.id, self.kind, self.colour, self.size, self.shape = eid, kind, colour, size, shape
        self.xy = (float(xy[0]), float(xy[1]))
        self.extra = extra

    @property
    def name(self) -> str:  # unique referring expression without article: "red sphere", "person in a red shirt"
        c = COLOUR_WORDS[self.colour]
        if self.kind == "person":
            return f"person in {_article(c)} {c} shirt"
        return f"{c} {self.shape}"

    def indefinite(self, with_size: bool) -> str:
        words = f"{self.size} {self.name}" if with_size and self.size else self.name
        return f"{_article(words)} {words}"


def _entities(spec: SceneSpec) -> dict[int, _Entity]:
    out: dict[int, _Entity] = {}
    for o in spec.objects:
        out[o.id] = _Entity(o.id, "object", o.colour, o.size, o.shape, o.position, {})
    for f in spec.figures:
        out[f.id] = _Entity(f.id, "person", f.colour, None, "person", f.position,
                            {"pose": f.pose, "heading_deg": f.heading_deg})
    return out


def _ground_axes(camera: Camera) -> tuple[tuple[float, float], tuple[float, float]]:
    """Horizontal (right, forward) unit vectors of the camera (its right vector is horizontal: no roll)."""
    r = camera.c2w_opengl[:3, 0]
    n = math.sqrt(float(r[0]) * float(r[0]) + float(r[1]) * float(r[1]))
    right = (float(r[0]) / n, float(r[1]) / n)
    return right, (-right[1], right[0])  # forward = up x right


def relation(a_xy, b_xy, camera: Camera) -> list[str]:
    """Relations of A to B in this camera's ground frame, e.g. ["behind", "left_of"], or ["next_to"]."""
    right, forward = _ground_axes(camera)
    dx, dy = a_xy[0] - b_xy[0], a_xy[1] - b_xy[1]
    lateral = dx * right[0] + dy * right[1]
    depthwise = dx * forward[0] + dy * forward[1]
    out = []
    if depthwise > RELATION_MARGIN_M:
        out.append("behind")
    elif depthwise < -RELATION_MARGIN_M:
        out.append("in_front_of")
    if lateral < -RELATION_MARGIN_M:
        out.append("left_of")
    elif lateral > RELATION_MARGIN_M:
        out.append("right_of")
    return out or ["next_to"]


def _relation_phrase(atoms: list[str]) -> str:
    return " and ".join(RELATION_WORDS[a] for a in atoms)


def _facing(heading_deg: float, camera: Camera) -> str:
    right, forward = _ground_axes(camera)
    fy, fx = sin_cos_deg(heading_deg)
    towards_camera = -(fx * forward[0] + fy * forward[1])
    if towards_camera > 0.7:
        return "facing the camera"
    if towards_camera < -0.7:
        return "facing away from the camera"
    return "facing right" if fx * right[0] + fy * right[1] > 0 else "facing left"


def _horizontal_region(u: float, width: int) -> str:
    return "on the left" if u < width / 3 else "on the right" if u > 2 * width / 3 else "in the middle"


def visible_entity_ids(entity_pixels: dict[int, int], width: int, height: int, min_fraction: float) -> list[int]:
    threshold = max(1, int(math.ceil(min_fraction * width * height)))
    return [eid for eid, n in entity_pixels.items() if n >= threshold]


def scene_graph_relations(spec: SceneSpec, camera: Camera, visible: list[int]) -> list[dict[str, Any]]:
    """The relations the long caption states: each visible entity after the first (front to back) relative to the
    nearest entity described before it. [{"subject": id, "relation": ["behind", "left_of"], "object": id}, ...]"""
    return _relations(_entities(spec), camera, visible)


def _relations(ents: dict[int, _Entity], camera: Camera, visible: list[int]) -> list[dict[str, Any]]:
    order = _front_to_back(ents, visible, camera)
    out = []
    for i, eid in enumerate(order[1:], start=1):
        a = ents[eid]
        ref = min(order[:i], key=lambda j: (_squared_distance(ents[j].xy, a.xy), j))
        out.append({"subject": eid, "relation": relation(a.xy, ents[ref].xy, camera), "object": ref})
    return out


def _squared_distance(p, q) -> float:
    dx, dy = p[0] - q[0], p[1] - q[1]
    return dx * dx + dy * dy


def _front_to_back(ents: dict[int, _Entity], visible: list[int], camera: Camera) -> list[int]:
    _, forward = _ground_axes(camera)
    return sorted(visible, key=lambda e: (ents[e].xy[0] * forward[0] + ents[e].xy[1] * forward[1], e))


def captions_for_view(
    spec: SceneSpec, camera: Camera, visible: list[int], sky_fraction: float = 0.0
) -> dict[str, str]:
    """{"short", "long"} captions of one view, naming exactly the `visible` entity ids."""
    return describe_view(spec, camera, visible, sky_fraction)[0]


def describe_view(
    spec: SceneSpec, camera: Camera, visible: list[int], sky_fraction: float = 0.0
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(`captions_for_view`, `scene_graph_relations`) of one view, computed together (one entity table, the
    relations once)."""
    ents = _entities(spec)
    relation_list = _relations(ents, camera, visible)
    uv = {eid: camera.project(np.array([*ents[eid].xy, 0.0]))[0] for eid in visible}
    left_to_right = sorted(visible, key=lambda e: (float(uv[e][0]), e))
    if not visible:
        short = "an empty checkered floor under a pale sky"
    else:
        short = f"{_join([ents[e].indefinite(with_size=False) for e in left_to_right])} on the ground"

    n_obj = sum(1 for e in visible if ents[e].kind == "object")
    n_people = len(visible) - n_obj
    counted = [c for c in (_count(n_obj, "object") if n_obj else "", _count(n_people, "person") if n_people else "")
               if c]
    elevation = camera.elevation_deg
    angle = "a low angle" if elevation < 20 else "slightly above" if elevation < 32 else "above"
    sky = ", with a pale blue sky above the horizon" if sky_fraction > 0.05 else ""
    sentences = [
        f"A rendered 3D scene with {_join(counted) or 'nothing'} on a light grey checkered floor{sky}, "
        f"seen from {angle}."
    ]
    relations = {r["subject"]: r for r in relation_list}
    for i, eid in enumerate(_front_to_back(ents, visible, camera)):
        e = ents[eid]
        region = _horizontal_region(float(uv[eid][0]), camera.width)
        subject = e.indefinite(with_size=True)
        if e.kind == "person":
            pose = POSE_PHRASES[e.extra["pose"]]
            facing = _facing(e.extra["heading_deg"], camera)
            if i == 0:
                sentences.append(f"In the front, {region}, {subject} is {pose}, {facing}.")
            else:
                r = relations[eid]
                sentences.append(f"{subject[0].upper()}{subject[1:]} is {pose} {_relation_phrase(r['relation'])} "
                                 f"the {ents[r['object']].name}, {facing}.")
        else:
            if i == 0:
                sentences.append(f"In the front, {region}, there is {subject}.")
            else:
                r = relations[eid]
                sentences.append(f"{subject[0].upper()}{subject[1:]} is {_relation_phrase(r['relation'])} "
                                 f"the {ents[r['object']].name}.")
    sentences.append(_sunlight_sentence(spec, camera))
    return {"short": short, "long": " ".join(sentences)}, relation_list


def _sunlight_sentence(spec: SceneSpec, camera: Camera) -> str:
    right, forward = _ground_axes(camera)
    lx, ly, _ = spec.sun_direction
    side = lx * right[0] + ly * right[1]
    depthwise = lx * forward[0] + ly * forward[1]
    came_from, fall = [], []
    if side < -0.3:
        came_from.append("the left")
        fall.append("to the right")
    elif side > 0.3:
        came_from.append("the right")
        fall.append("to the left")
    if depthwise > 0.3:
        came_from.append("behind the scene")
        fall.append("towards the viewer")
    elif depthwise < -0.3:
        came_from.append("behind the camera")
        fall.append("away from the viewer")
    if not came_from:
        return "The sun stands high, so the shadows are short."
    return f"Sunlight comes from {' and from '.join(came_from)}, so hard shadows fall {' and '.join(fall)}."


# ---------------------------------------------------------------------------------------------------------------------
# Prompt fields for the semantic-map and bounding-box tasks (spec §5.1)


def prompt_tags(labels: list[str], class_colours: dict[str, str], kind: str) -> str:
    """'<#FF0000 red mask: sphere> <#0000FF blue mask: person>' (kind "mask") or the "boundingbox" form."""
    return " ".join(colour_entry(c, class_colours[c], kind) for c in labels)
