"""The pose labeller (build.pose): the people in every picture without keypoints of its own, as COCO-17 keypoints.

The release's pose data are keypoints drawn as OpenPose/ControlNet skeletons (ONEDIFFUSION_SPEC §6). Here mediapipe's
pose landmarker (its legacy solution, whose full model ships in the wheel: offline) finds a person and 33 landmarks;
the 17 that COCO names (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles) become the sample's
keypoints in pixel coordinates, v = 2 where the landmark's visibility reaches build.pose.min_visibility and it lies in
the picture, else v = 0 at (0, 0) (COCO's absent point). The keypoints are found on the full-size decoded picture and
bucketed with it (pipelines/bucket.py), so every resolution's pose map (model.conditions.pose_condition, the one
renderer) is drawn from the same people.

Several people: the legacy landmarker follows one person per call. To find more, the person found is blanked out
(the box of its segmentation mask, painted black) and the picture searched again, up to build.pose.max_people; the
search stops when nothing more is found, when the find has fewer than 3 visible keypoints, or when it overlaps one
already found (its keypoints' box lies more than half inside an earlier one's: the same person again).

Outcomes counted per sample: ok (at least one person in some view); no_person (none: the sample keeps its views and
gets no pose map); source (every view had keypoints from its source, e.g. the synthetic world's exact ones, possibly
none); error.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onegen.build_config import PoseSection
from pipelines.labelers import OK, SOURCE, Label
from pipelines.mediapipe_models import MediapipeStage, mediapipe_preflight

NO_PERSON = "no_person"
MODELS = ("pose_landmark_full",)  # the only pose model in the wheel (lite and heavy download on first use)
# COCO-17's keypoints in order, as indices of mediapipe's 33 pose landmarks.
MEDIAPIPE_TO_COCO = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
SAME_PERSON = 0.5  # a find whose keypoint box lies this much inside an earlier one's is that person again
MIN_JOINTS = 3  # a find with fewer visible keypoints is not taken as a person (a one-dot skeleton)


def preflight(section: PoseSection) -> dict[str, Any]:
    return mediapipe_preflight(section, MODELS)


def has_keypoints(sample) -> bool:
    """The source gave the picture's people (possibly none): they are kept."""
    return sample.keypoints is not None


def coco_keypoints(landmarks: np.ndarray, height: int, width: int, min_visibility: float) -> np.ndarray:
    """(17, 3) float32 COCO keypoints (pixel x, y, v) from (33, 3) mediapipe landmarks (x, y normalised to the
    picture's width and height, visibility in [0, 1])."""
    picked = np.asarray(landmarks, dtype=np.float64)[list(MEDIAPIPE_TO_COCO)]
    x, y = picked[:, 0] * width, picked[:, 1] * height
    seen = (picked[:, 2] >= min_visibility) & (x >= 0) & (x < width) & (y >= 0) & (y < height)
    return np.stack([np.where(seen, x, 0.0), np.where(seen, y, 0.0), np.where(seen, 2.0, 0.0)],
                    axis=1).astype(np.float32)


def _keypoint_box(person: np.ndarray) -> tuple[float, float, float, float] | None:
    seen = person[person[:, 2] > 0]
    if not len(seen):
        return None
    return float(seen[:, 0].min()), float(seen[:, 1].min()), float(seen[:, 0].max()), float(seen[:, 1].max())


def _inside_share(box: tuple, other: tuple) -> float:
    """The share of `box`'s area that lies inside `other` (a point-like box: 1 if inside, else 0)."""
    width = min(box[2], other[2]) - max(box[0], other[0])
    height = min(box[3], other[3]) - max(box[1], other[1])
    area = (box[2] - box[0]) * (box[3] - box[1])
    if area <= 0:
        return float(other[0] <= box[0] <= other[2] and other[1] <= box[1] <= other[3])
    return max(0.0, width) * max(0.0, height) / area


class Stage(MediapipeStage):
    stage = "pose"
    models = MODELS

    def load(self, folder: str, device: str, dtype) -> None:
        from pipelines.mediapipe_models import import_mediapipe

        mp = import_mediapipe()
        # static_image_mode: every call detects afresh (no tracking from the previous picture); model_complexity 1:
        # the bundled full model; the segmentation mask tells which pixels to blank before looking for the next one.
        self.landmarker = mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1,
                                                 enable_segmentation=True,
                                                 min_detection_confidence=self.section.min_confidence)

    def smoke_test(self) -> None:
        self.people(np.zeros((64, 64, 3), dtype=np.uint8))

    def people(self, image: np.ndarray) -> np.ndarray:
        """(P, 17, 3) float32 COCO keypoints of the people found in an (H, W, 3) uint8 RGB picture (P may be 0)."""
        height, width = image.shape[:2]
        work = np.ascontiguousarray(image)
        found: list[np.ndarray] = []
        boxes: list[tuple] = []
        for _ in range(self.section.max_people):
            result = self.landmarker.process(work)
            if result.pose_landmarks is None:
                break
            landmarks = np.array([(p.x, p.y, p.visibility) for p in result.pose_landmarks.landmark])
            person = coco_keypoints(landmarks, height, width, self.section.min_visibility)
            box = _keypoint_box(person)
            if (person[:, 2] > 0).sum() < MIN_JOINTS or any(_inside_share(box, earlier) > SAME_PERSON
                                                             for earlier in boxes):
                break
            found.append(person)
            boxes.append(box)
            work = _blanked(work, result.segmentation_mask, box)
        return np.stack(found) if found else np.zeros((0, 17, 3), dtype=np.float32)

    def label(self, records: list[dict]) -> list[Label]:
        labels = []
        for record in records:
            samples = [view["sample"] for view in record["views"]]
            if all(has_keypoints(sample) for sample in samples):
                labels.append(Label(SOURCE))
                continue
            people = {v: self.people(sample.image) for v, sample in enumerate(samples) if not has_keypoints(sample)}
            if any(len(found) for found in people.values()):
                labels.append(Label(OK, value=people))
            else:
                labels.append(Label(NO_PERSON, value=people, message="no person found (build.pose.min_confidence)"))
        return labels

    def apply(self, record: dict, value: dict[int, np.ndarray]) -> None:
        """The people found as the pictures' keypoints (none: an empty (0, 17, 3) array, which draws no map)."""
        for v, people in value.items():
            record["views"][v]["sample"].keypoints = people


def _blanked(image: np.ndarray, mask: np.ndarray | None, box: tuple) -> np.ndarray:
    """A copy of `image` with the person just found painted black: the box of its segmentation mask (above 0.5),
    or its keypoints' box where the landmarker gave no mask."""
    height, width = image.shape[:2]
    if mask is not None and (mask > 0.5).any():
        ys, xs = np.nonzero(mask > 0.5)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    else:
        x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
        x1, y1 = min(width, int(np.ceil(box[2])) + 1), min(height, int(np.ceil(box[3])) + 1)
    out = image.copy()
    out[y0:y1, x0:x1] = 0
    return out
