"""The face labeller (build.faces): the faces of every picture, boxed by mediapipe's face detector; identity groups
keep only the pictures with one.

mediapipe's BlazeFace detector (its legacy solution; both range models ship in the wheel: offline) gives each face a
relative box and a score. They become the picture's `faces` (pipelines/record.py): whole-pixel [x0, y0, x1, y1)
boxes clipped to the picture, most confident first. The detector runs on the full-size decoded picture and the boxes
are bucketed with it (pipelines/bucket.py: mapped as entity boxes; a face the crop cuts away is left out at that
resolution); the shard's WebDataset JSON carries them per view and resolution.

Identity groups (a folder source with `layout: identities`, pipelines/sources/folder.py): the release's ID data are
sets of pictures of one person with the face found in each. A picture in which no face passes
build.faces.min_confidence leaves its group (`no_face`), and so does one with several faces (`several_faces`: which
is the person is not known) and one whose face the group's bucket would crop (`face_cropped`: less than
FACE_KEPT of its face inside the centre crop to the group's bucket at some resolution; the bucket follows the
group's first picture, so that one is checked against its own); after those, the pictures past the faceid task's 5
views (a target and 4 references, in file order; `beyond_max_views`). pipelines.process.leave_out lists them in the
group's metadata and the manifest counts them per reason. A group left with fewer than 2 pictures, which the faceid
task cannot use, is dropped as `too_few_pictures`; one the detector failed on as `error_faces` (an unchecked group
would pass pictures without a face as references). All this happens before bucketing, on the full-size pictures.

Outcomes counted per sample: ok (a face in some view); no_face (none in any view: the sample is kept, its faces
empty); source (every view had faces from its source); error. Dropped (identity groups): too_few_pictures,
error_faces.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from onegen.build_config import FacesSection
from pipelines.labelers import OK, SOURCE, Label
from pipelines.mediapipe_models import MediapipeStage, mediapipe_preflight
from pipelines.process import TOO_FEW_PICTURES, identity_views, is_identity, leave_out, too_few_message

NO_FACE = "no_face"
FACES_ERROR = "error_faces"  # a drop reason: an identity group the detector failed on
FACE_KEPT = 0.75  # the least share of a picture's face its group's bucket must keep
MODELS = {"face_detection_full_range": 1, "face_detection_short_range": 0}  # -> the solution's model_selection


def preflight(section: FacesSection) -> dict[str, Any]:
    return mediapipe_preflight(section, tuple(MODELS))


def has_faces(sample) -> bool:
    return sample.faces is not None


def face_box(xmin: float, ymin: float, width: float, height: float, image_w: int,
             image_h: int) -> list[int] | None:
    """A relative box (mediapipe's) as the smallest whole-pixel [x0, y0, x1, y1) covering it, clipped to the
    picture; None when nothing of it is inside."""
    x0, y0 = max(0, math.floor(xmin * image_w)), max(0, math.floor(ymin * image_h))
    x1, y1 = min(image_w, math.ceil((xmin + width) * image_w)), min(image_h, math.ceil((ymin + height) * image_h))
    return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


class Stage(MediapipeStage):
    stage = "faces"
    models = tuple(MODELS)
    drops = (TOO_FEW_PICTURES, FACES_ERROR)

    def load(self, folder: str, device: str, dtype) -> None:
        from pipelines.mediapipe_models import import_mediapipe

        self.detector = import_mediapipe().solutions.face_detection.FaceDetection(
            model_selection=MODELS[self.section.model], min_detection_confidence=self.section.min_confidence)

    def smoke_test(self) -> None:
        self.faces(np.zeros((64, 64, 3), dtype=np.uint8))

    def faces(self, image: np.ndarray) -> list[dict[str, Any]]:
        """[{"bbox_2d", "score"}] of the faces in an (H, W, 3) uint8 RGB picture, most confident first."""
        height, width = image.shape[:2]
        found = []
        for detection in self.detector.process(np.ascontiguousarray(image)).detections or []:
            box = detection.location_data.relative_bounding_box
            pixels = face_box(box.xmin, box.ymin, box.width, box.height, width, height)
            if pixels is not None:
                found.append({"bbox_2d": pixels, "score": round(float(detection.score[0]), 4)})
        return sorted(found, key=lambda face: -face["score"])

    def label(self, records: list[dict]) -> list[Label]:
        return [self._checked(record) for record in records]

    def _checked(self, record: dict) -> Label:
        try:
            return self._label(record)
        except Exception as err:
            if not is_identity(record):
                raise  # counted `error` by the base class; the sample is kept
            return Label(FACES_ERROR, message=f"the face detector failed on identity "
                                              f"{record['meta']['identity']!r}: {type(err).__name__}: {err}")

    def _label(self, record: dict) -> Label:
        samples = [view["sample"] for view in record["views"]]
        if all(has_faces(sample) for sample in samples):
            return Label(SOURCE)
        faces = {v: sample.faces if has_faces(sample) else self.faces(sample.image)
                 for v, sample in enumerate(samples)}
        if not is_identity(record):
            found = any(faces.values())
            return Label(OK if found else NO_FACE, value={"faces": faces, "left": {}},
                         message=None if found else "no face found (build.faces.min_confidence)")
        left = self.left_out(samples, faces)
        kept = len(samples) - len(left)
        if kept < identity_views()[0]:
            return Label(TOO_FEW_PICTURES, message=too_few_message(record, [r for r, _ in left.values()], kept))
        return Label(OK, value={"faces": faces, "left": left})

    def left_out(self, samples: list, faces: dict[int, list]) -> dict[int, tuple[str, str]]:
        """{view: (reason, message)} of an identity group's pictures that leave it (module docstring)."""
        from pipelines.bucket import bucket_for, kept_share

        most = identity_views()[1]
        left: dict[int, tuple[str, str]] = {}
        kept: list[int] = []
        for v, sample in enumerate(samples):
            if not faces[v]:
                left[v] = (NO_FACE, "no face found (build.faces.min_confidence)")
            elif len(faces[v]) > 1:
                left[v] = ("several_faces", f"{len(faces[v])} faces found: which is the person is not known")
            elif len(kept) == most:
                left[v] = ("beyond_max_views", f"the faceid task takes {most} pictures of a person (a target and "
                                               f"{most - 1} references): the first {most} usable ones are kept")
            else:
                shape = sample.image.shape[:2]
                first = samples[kept[0]].image.shape[:2] if kept else shape  # the group's bucket follows it
                shares = {r: kept_share(faces[v][0]["bbox_2d"], shape, bucket_for(first, r))
                          for r in self.cfg.build.resolutions}
                worst = min(shares, key=shares.get)
                if shares[worst] < FACE_KEPT:
                    left[v] = ("face_cropped", f"at resolution {worst} the group's bucket "
                                               f"{bucket_for(first, worst)} (its first picture's aspect) keeps "
                                               f"{shares[worst]:.0%} of this picture's face")
                else:
                    kept.append(v)
        return left

    def apply(self, record: dict, value: dict) -> None:
        """The boxes as the pictures' faces; an identity group keeps the pictures left_out() did not name."""
        for v, faces in value["faces"].items():
            record["views"][v]["sample"].faces = faces
        leave_out(record, value["left"])
