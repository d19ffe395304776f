"""The face labeller (build.faces): the faces of every picture, boxed by mediapipe's face detector; identity groups
keep only the pictures with one.

mediapipe's BlazeFace detector (its legacy solution; both range models ship in the wheel: offline) gives each face a
relative box and a score. They become the picture's `faces` (pipelines/record.py): whole-pixel [x0, y0, x1, y1)
boxes clipped to the picture, most confident first. The detector runs on the full-size decoded picture and the boxes
are bucketed with it (pipelines/bucket.py: mapped as entity boxes; a face the crop cuts away is left out at that
resolution); the shard's WebDataset JSON carries them per view and resolution.

Identity groups (a folder source with `layout: identities`, pipelines/sources/folder.py): the release's ID data are
sets of pictures of one person with the face found in each. A picture in which no face passes
build.faces.min_confidence leaves its group (`no_face`), and so do the pictures with a face past the faceid task's
5 views (a target and 4 references; `beyond_max_views`): pipelines.process.leave_out lists them in the group's
metadata and the manifest counts them per reason. A group left with fewer than 2 pictures, which the faceid task
cannot use, is dropped as `too_few_faces`; one the detector failed on as `error_faces` (an unchecked group would
pass pictures without a face as references). This happens before bucketing, so the group's bucket is chosen from a
picture it keeps (the bucket stage then leaves out a picture whose face the group's crop cuts away).

Outcomes counted per sample: ok (a face in some view); no_face (none in any view: the sample is kept, its faces
empty); source (every view had faces from its source); error. Dropped (identity groups): too_few_faces, error_faces.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from model.tasks import get_task
from onegen.build_config import FacesSection
from pipelines.labelers import OK, SOURCE, Label
from pipelines.mediapipe_models import MediapipeStage, mediapipe_preflight
from pipelines.process import IDENTITY_MIN_VIEWS, TOO_FEW_FACES, is_identity, leave_out

NO_FACE = "no_face"
FACES_ERROR = "error_faces"  # a drop reason: an identity group the detector failed on
MAX_VIEWS = get_task("faceid").max_views  # a target and its references
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
    drops = (TOO_FEW_FACES, FACES_ERROR)

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
        with_face = [v for v in range(len(samples)) if faces[v]]
        left = {v: (NO_FACE, "no face found (build.faces.min_confidence)") for v in faces if not faces[v]}
        left.update({v: ("beyond_max_views", f"the faceid task takes {MAX_VIEWS} pictures of a person (a target "
                                             f"and {MAX_VIEWS - 1} references): the first {MAX_VIEWS} with a face, "
                                             "in file order, are kept") for v in with_face[MAX_VIEWS:]})
        if len(with_face) < IDENTITY_MIN_VIEWS:
            return Label(TOO_FEW_FACES, message=f"identity {record['meta']['identity']!r}: {len(with_face)} of "
                                                f"{len(samples)} pictures show a face, a faceid group needs "
                                                f"{IDENTITY_MIN_VIEWS}; add pictures where the face is clearly "
                                                "visible")
        return Label(OK, value={"faces": faces, "left": left})

    def apply(self, record: dict, value: dict) -> None:
        """The boxes as the pictures' faces; an identity group keeps only the pictures with one (at most
        MAX_VIEWS)."""
        for v, faces in value["faces"].items():
            record["views"][v]["sample"].faces = faces
        leave_out(record, value["left"])
