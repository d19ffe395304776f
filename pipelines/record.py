"""The one record form every data source yields: an image plus optional labels, captions and camera.

Web images, folders, S3 objects and the synthetic world all become `Sample`s; the build job validates them, runs
labelers to fill missing labels, and writes them as WebDataset samples (`to_wds`) that read back exactly
(`from_wds`). A sample with nothing but an image (and maybe an original caption) is valid.

Fields and conventions:

* ``key``: stable unique name, no '.' or '/' (WebDataset splits a tar member name at its first '.').
* ``image``: (H, W, 3) uint8 RGB.
* ``captions``: {"short": ..., "long": ..., "original": ...}, any subset (names are free, values strings).
* ``depth``: (H, W) float32 metres; ``depth_kind`` says which: "z" (along the optical axis, OpenCV z) or "ray"
  (distance along the pixel's ray). Invalid pixels (sky) are 0; valid mask = ``depth > 0``.
* ``instance``: (H, W) int32, 0 = background; ``semantic``: (H, W) int32 indices into ``classes``.
* ``entities``: list of dicts, each at least {"id": int, "class": str}; sources add colour, size, 3D centre, bbox_2d.
* ``keypoints``: (P, 17, 3) float32 COCO-17 (x, y, visibility 0/1/2), pixel coordinates.
* ``faces``: list of {"bbox_2d": [x0, y0, x1, y1) whole pixels, "score": float}, most confident first (the face
  labeller's, pipelines/faces.py); None: not looked for, []: none found.
* ``camera``: {"K": 3x3, "c2w_opengl": 4x4, "w2c_opencv": 4x4 (float64 arrays), "width", "height", "azimuth",
  "elevation" (degrees), "distance" (metres), ...}; see pipelines/sources/synthetic_camera.py for the conventions.
* ``group``: samples that belong together (the views of one multiview scene) share a group id.
* ``meta``: JSON-serialisable extras.

WebDataset layout (`to_wds`): "__key__"; "png" (lossless, default) or "jpg" image; "depth.npy"; "instance.png" and
"semantic.png" as 16-bit grayscale PNG when every id is in [0, 65535], else "instance.npy"/"semantic.npy"; "json" with
everything else (captions, camera, entities, keypoints, classes, group, source, meta, schema). PNG/npy are lossless and
JSON floats round-trip exactly, so ``Sample.from_wds(s.to_wds())`` reproduces ``s`` bit for bit (except with "jpg").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from onegen.storage import Storage

SCHEMA = "onegen.sample/1"
NUM_KEYPOINTS = 17
DEPTH_KINDS = ("z", "ray")
_CAMERA_ARRAYS = {"K": (3, 3), "c2w_opengl": (4, 4), "w2c_opencv": (4, 4)}
_LABEL_MAPS = ("instance", "semantic")
PNG_COMPRESS_LEVEL = 6


class SampleError(ValueError):
    """A sample field is missing, malformed or inconsistent. `field` names it."""

    def __init__(self, key: str, field_name: str, problem: str):
        self.key = key
        self.field = field_name
        super().__init__(f"sample {key!r}: field {field_name!r} {problem}")


@dataclass(eq=False)
class Sample:
    key: str
    source: str
    image: np.ndarray
    captions: dict[str, str] = field(default_factory=dict)
    depth: np.ndarray | None = None
    depth_kind: str | None = None
    instance: np.ndarray | None = None
    semantic: np.ndarray | None = None
    classes: list[str] | None = None
    entities: list[dict[str, Any]] | None = None
    keypoints: np.ndarray | None = None
    faces: list[dict[str, Any]] | None = None
    camera: dict[str, Any] | None = None
    group: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------------------- checks

    def validate(self) -> Sample:
        """Raise `SampleError` (naming the field) if anything is malformed; return self so calls can chain."""

        def fail(name: str, problem: str) -> None:
            raise SampleError(str(self.key), name, problem)

        if not isinstance(self.key, str) or not self.key:
            fail("key", f"must be a non-empty string, got {self.key!r}")
        if "." in self.key or "/" in self.key:
            fail("key", "must not contain '.' or '/' (WebDataset splits member names at the first '.')")
        if not isinstance(self.source, str) or not self.source:
            fail("source", f"must be a non-empty string, got {self.source!r}")
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            fail("image", f"must be a (H, W, 3) uint8 RGB array, got {_describe(img)}")
        h, w = img.shape[:2]
        if h == 0 or w == 0:
            fail("image", f"must not be empty, got shape {img.shape}")
        if not isinstance(self.captions, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.captions.items()
        ):
            fail("captions", "must be a dict of str -> str (e.g. {'short': ..., 'long': ...})")

        if self.depth is not None:
            d = self.depth
            if not isinstance(d, np.ndarray) or d.dtype != np.float32 or d.shape != (h, w):
                fail("depth", f"must be float32 of shape (H, W) = {(h, w)} matching 'image', got {_describe(d)}")
            if self.depth_kind not in DEPTH_KINDS:
                fail("depth_kind", f"must be one of {DEPTH_KINDS} when depth is set, got {self.depth_kind!r}")
            if not np.all(np.isfinite(d)) or np.any(d < 0):
                fail("depth", "must be finite and >= 0 (0 marks invalid pixels)")
        elif self.depth_kind is not None:
            fail("depth_kind", "is set but 'depth' is missing")

        for name in _LABEL_MAPS:
            m = getattr(self, name)
            if m is None:
                continue
            if not isinstance(m, np.ndarray) or m.dtype != np.int32 or m.shape != (h, w):
                fail(name, f"must be int32 of shape (H, W) = {(h, w)} matching 'image', got {_describe(m)}")
            if m.size and m.min() < 0:
                fail(name, f"must be >= 0, got minimum {int(m.min())}")
        if self.classes is not None:
            if not isinstance(self.classes, list) or not all(isinstance(c, str) for c in self.classes):
                fail("classes", "must be a list of class-name strings")
        if self.semantic is not None:
            if self.classes is None:
                fail("classes", "is required when 'semantic' is set (names of the semantic ids)")
            if self.semantic.size and int(self.semantic.max()) >= len(self.classes):
                fail("semantic", f"has id {int(self.semantic.max())} but 'classes' has only {len(self.classes)} names")

        if self.entities is not None:
            if not isinstance(self.entities, list):
                fail("entities", "must be a list of dicts")
            for i, e in enumerate(self.entities):
                if not isinstance(e, dict) or not isinstance(e.get("id"), int) or not isinstance(e.get("class"), str):
                    fail("entities", f"item {i} must be a dict with int 'id' and str 'class', got {e!r}")

        if self.keypoints is not None:
            k = self.keypoints
            if (not isinstance(k, np.ndarray) or k.dtype != np.float32 or k.ndim != 3
                    or k.shape[1:] != (NUM_KEYPOINTS, 3)):
                fail("keypoints", f"must be float32 of shape (P, 17, 3), got {_describe(k)}")
            if k.size and not np.isin(k[..., 2], (0.0, 1.0, 2.0)).all():
                fail("keypoints", "visibility (last column) must be 0, 1 or 2 (COCO)")

        if self.faces is not None:
            if not isinstance(self.faces, list) or not all(_is_face(f, w, h) for f in self.faces):
                fail("faces", f"must be a list of {{'bbox_2d': [x0, y0, x1, y1] whole pixels inside the {w}x{h} "
                              f"image with x0 < x1, y0 < y1, 'score': number}}, got {self.faces!r}")

        if self.camera is not None:
            if not isinstance(self.camera, dict):
                fail("camera", "must be a dict")
            for name, shape in _CAMERA_ARRAYS.items():
                a = self.camera.get(name)
                if a is None:
                    fail("camera", f"is missing {name!r}")
                a = np.asarray(a)
                if a.shape != shape or not np.all(np.isfinite(a)):
                    fail("camera", f"entry {name!r} must be a finite {shape} matrix, got shape {a.shape}")
            for name, expected in (("width", w), ("height", h)):
                if self.camera.get(name) != expected:
                    fail("camera", f"entry {name!r} must equal the image's {name} {expected}, got "
                                   f"{self.camera.get(name)!r}")
        if self.group is not None and not isinstance(self.group, str):
            fail("group", f"must be a string or None, got {type(self.group).__name__}")
        if not isinstance(self.meta, dict):
            fail("meta", "must be a dict")
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            fail("meta", f"must be JSON-serialisable: {e}")
        return self

    # ---------------------------------------------------------------------------------------------------- encoding

    def to_wds(self, image_format: str = "png") -> dict[str, Any]:
        """The WebDataset sample dict (values are bytes, "__key__" a str). `image_format`: "png" or "jpg" (lossy)."""
        self.validate()
        out: dict[str, Any] = {"__key__": self.key}
        if image_format == "png":
            out["png"] = encode_png(self.image)
        elif image_format == "jpg":
            buf = io.BytesIO()
            Image.fromarray(self.image).save(buf, format="JPEG", quality=95)
            out["jpg"] = buf.getvalue()
        else:
            raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
        if self.depth is not None:
            out["depth.npy"] = encode_npy(self.depth)
        for name in _LABEL_MAPS:
            m = getattr(self, name)
            if m is None:
                continue
            if m.size == 0 or int(m.max()) <= 0xFFFF:
                out[f"{name}.png"] = encode_png(m.astype(np.uint16))
            else:
                out[f"{name}.npy"] = encode_npy(m)
        out["json"] = self._json_document()
        return out

    def _json_document(self) -> bytes:
        doc: dict[str, Any] = {"schema": SCHEMA, "source": self.source, "captions": self.captions}
        if self.depth_kind is not None:
            doc["depth_kind"] = self.depth_kind
        if self.classes is not None:
            doc["classes"] = self.classes
        if self.entities is not None:
            doc["entities"] = self.entities
        if self.keypoints is not None:
            doc["keypoints"] = self.keypoints.astype(np.float64).tolist()
            doc["num_people"] = int(self.keypoints.shape[0])
        if self.faces is not None:
            doc["faces"] = self.faces
        if self.camera is not None:
            doc["camera"] = {k: (np.asarray(v).tolist() if k in _CAMERA_ARRAYS else v) for k, v in self.camera.items()}
        if self.group is not None:
            doc["group"] = self.group
        doc["meta"] = self.meta
        return json.dumps(_jsonable(doc), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_wds(cls, sample: dict[str, Any]) -> Sample:
        """Exact inverse of `to_wds` for dicts of raw bytes (as `webdataset.WebDataset` yields without `.decode()`)."""
        key = sample.get("__key__")
        if not isinstance(key, str):
            raise SampleError(str(key), "__key__", "is missing")
        for name, value in sample.items():
            if not name.startswith("__") and not isinstance(value, (bytes, bytearray)):
                raise SampleError(key, name, f"must be raw bytes (read the shard without .decode()), got "
                                             f"{type(value).__name__}")
        if "json" not in sample:
            raise SampleError(key, "json", "is missing")
        doc = json.loads(sample["json"])
        if doc.get("schema") != SCHEMA:
            raise SampleError(key, "json", f"has schema {doc.get('schema')!r}, expected {SCHEMA!r}")
        if "png" in sample:
            image = decode_png(sample["png"])
        elif "jpg" in sample:
            image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        else:
            raise SampleError(key, "png", "is missing (no 'png' or 'jpg' image)")
        labels: dict[str, np.ndarray | None] = {}
        for name in _LABEL_MAPS:
            if f"{name}.png" in sample:
                labels[name] = decode_png(sample[f"{name}.png"]).astype(np.int32)
            elif f"{name}.npy" in sample:
                labels[name] = decode_npy(sample[f"{name}.npy"])
            else:
                labels[name] = None
        camera = doc.get("camera")
        if camera is not None:
            camera = {k: (np.asarray(v, dtype=np.float64) if k in _CAMERA_ARRAYS else v) for k, v in camera.items()}
        keypoints = doc.get("keypoints")
        if keypoints is not None:
            keypoints = np.asarray(keypoints, dtype=np.float32).reshape(int(doc["num_people"]), NUM_KEYPOINTS, 3)
        return cls(
            key=key,
            source=doc["source"],
            image=image,
            captions=doc.get("captions", {}),
            depth=decode_npy(sample["depth.npy"]) if "depth.npy" in sample else None,
            depth_kind=doc.get("depth_kind"),
            instance=labels["instance"],
            semantic=labels["semantic"],
            classes=doc.get("classes"),
            entities=doc.get("entities"),
            keypoints=keypoints,
            faces=doc.get("faces"),
            camera=camera,
            group=doc.get("group"),
            meta=doc.get("meta", {}),
        )

    # ----------------------------------------------------------------------------------------------- comparisons

    def differences(self, other: Sample) -> list[str]:
        """Names of the fields in which two samples differ (arrays compared bit for bit, dtype included)."""
        out = []
        for name in ("key", "source", "captions", "depth_kind", "classes", "entities", "faces", "group", "meta"):
            if _jsonable(getattr(self, name)) != _jsonable(getattr(other, name)):
                out.append(name)
        for name in ("image", "depth", "instance", "semantic", "keypoints"):
            if not _same_array(getattr(self, name), getattr(other, name)):
                out.append(name)
        a, b = self.camera, other.camera
        if (a is None) != (b is None) or (a is not None and (
                set(a) != set(b) or any(
                    not _same_array(np.asarray(a[k]), np.asarray(b[k])) if k in _CAMERA_ARRAYS else a[k] != b[k]
                    for k in a))):
            out.append("camera")
        return out

    def content_digest(self) -> str:
        """sha256 over the raw arrays and the JSON document: equal digests <=> identical content on any machine
        (unlike PNG bytes, which depend on the zlib build)."""
        h = hashlib.sha256()
        for name in ("image", "depth", "instance", "semantic", "keypoints"):
            a = getattr(self, name)
            h.update(name.encode())
            if a is not None:
                h.update(str((a.dtype.str, a.shape)).encode())
                h.update(np.ascontiguousarray(a).tobytes())
        h.update(self._json_document())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Encoders (lossless, deterministic for a given Pillow/zlib build)


def encode_png(array: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> RGB PNG; (H, W) uint8 -> 8-bit gray; (H, W) uint16 -> 16-bit gray PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    if img.mode == "I;16":
        return np.asarray(img, dtype=np.uint16)
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    return np.asarray(img)


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ---------------------------------------------------------------------------------------------------------------------
# Folder form: the WebDataset members written as files "<key>.<ext>" (tar the folder and it is a shard).
# Folders are storage roots: a local path, file:///path or s3://bucket/prefix (or a `Storage`). Every file is written
# atomically by `Storage.write_bytes` (temp file + fsync + rename locally, one PUT on S3).


def as_storage(root: str | os.PathLike | Storage) -> Storage:
    """`root` as a `Storage` (a local path, file:// or s3:// URI; a `Storage` is returned as is). S3 settings come from
    the standard AWS environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_PROFILE, ...)."""
    return root if isinstance(root, Storage) else Storage(root)


def storage_location(storage: Storage, rel: str) -> Path | str:
    """Where `rel` lives: a `Path` under a local root, an s3:// URI string otherwise."""
    return Path(storage.uri(rel)) if storage.scheme == "file" else storage.uri(rel)


def write_sample_files(sample: Sample, folder: str | os.PathLike | Storage,
                       image_format: str = "png") -> list[Path | str]:
    """Write each member of `sample.to_wds()` to `folder/<key>.<ext>`, each atomically (`Storage.write_bytes`).

    Returns the files written: `Path`s in a local folder, s3:// URIs under an S3 root."""
    storage = as_storage(folder)
    written: list[Path | str] = []
    for ext, data in sample.to_wds(image_format).items():
        if ext.startswith("__"):
            continue
        name = f"{sample.key}.{ext}"
        storage.write_bytes(name, data)
        written.append(storage_location(storage, name))
    return written


def read_sample_files(folder: str | os.PathLike | Storage, key: str) -> Sample:
    """Inverse of `write_sample_files` (same kinds of `folder`)."""
    storage = as_storage(folder)
    members: dict[str, Any] = {"__key__": key}
    for name in storage.list():
        if name.startswith(f"{key}.") and not name.endswith("/"):
            members[name[len(key) + 1:]] = storage.read_bytes(name)
    if len(members) == 1:
        raise FileNotFoundError(f"no files named {key}.* in {storage.root_uri}")
    return Sample.from_wds(members)


# ---------------------------------------------------------------------------------------------------------------------
# WebDataset tars as bytes (one shard = one object: write it with `Storage.write_bytes`, read it with `read_bytes`)


def samples_to_wds_tar(samples: Iterable[Sample], image_format: str = "png") -> bytes:
    """A WebDataset tar of `samples` (`to_wds` members, in order). Member mtimes are 0, so the same samples give the
    same bytes on every run."""
    return wds_tar_bytes(sample.to_wds(image_format) for sample in samples)


def wds_tar_bytes(members: Iterable[dict[str, Any]]) -> bytes:
    """A WebDataset tar of ready member dicts ("__key__" + ext -> bytes), in order, member mtimes 0."""
    import webdataset as wds

    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer, encoder=False, mtime=0)
    try:
        for sample_members in members:
            writer.write(sample_members)
    finally:
        writer.close()
    return buffer.getvalue()


def samples_from_wds_tar(data: bytes) -> list[Sample]:
    """The samples of a WebDataset tar given as bytes, in order: members KEY.EXT grouped by KEY (split at the first
    '.' of the member's base name, as WebDataset does), each group decoded by `Sample.from_wds`.

    Raises ValueError for a member without an extension or a KEY.EXT that appears twice; tarfile.TarError if `data`
    is not a tar."""
    groups: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, slash, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not stem or not dot or not ext:
                raise ValueError(f"tar member {member.name!r}: expected a name KEY.EXT")
            key = folder + slash + stem
            group = groups.setdefault(key, {"__key__": key})
            if ext in group:
                raise ValueError(f"tar member {member.name!r} appears twice")
            group[ext] = tar.extractfile(member).read()
    return [Sample.from_wds(group) for group in groups.values()]


# ---------------------------------------------------------------------------------------------------------------------


def _is_face(face: Any, width: int, height: int) -> bool:
    if not isinstance(face, dict) or not isinstance(face.get("score"), (int, float)):
        return False
    box = face.get("bbox_2d")
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, int) for v in box):
        return False
    return 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _jsonable(x: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON types (so documents compare and serialise the same way)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x
