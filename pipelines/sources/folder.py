"""Images in a local folder or under an s3:// prefix as a build source: a plan from one listing, records per partition.

    specs = plan_folder_partitions("s3://bucket/photos", partition_size=256)   # on the driver: listing only
    records = read_folder_partition("s3://bucket/photos", specs[0])             # in a Ray task: reads the files

Inputs. Every file under the root (recursively, in sorted order) whose extension is in IMAGE_EXTENSIONS (any case) is
one input, and a file with an image extension that is no image is an input too (the decode stage drops it as
not_an_image). Other files are ignored, except:

* Sidecars, by stem in the same folder: for `dir/STEM.EXT`, `dir/STEM.txt` -> captions["original"] (the text,
  stripped); `dir/STEM.json` (an object) -> its "caption" (a string) -> captions["original"], its "captions" ({name:
  text}) merged into captions, every other key -> meta["sidecar"]. Both may exist: the .json wins over the .txt. A
  sidecar that is not UTF-8 text, or a .json that is not such an object, drops the input as `bad_sidecar` (a caption
  silently lost would be worse than a named, counted drop).
* Multiview groups: a folder that holds a `cameras.json` is ONE input, a group, holding the images its cameras.json
  lists, in its order (the view order); everything under that folder belongs to the group (the outermost such folder
  wins), and image files it does not list are ignored. The format:

      {"frames": [{"file": "000.png",                       # path relative to the group folder, no '..'
                   "c2w_opengl": [[...4 numbers...] x 4],  # camera-to-world, OpenGL axes (x right, y up, looks
                                                           # down -z); finite, bottom row 0 0 0 1
                   "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]},   # optional pixel intrinsics, fx, fy > 0
                  ...],                                    # at least one frame, each file listed once
       "caption": "...",                                   # optional: captions["original"]
       "captions": {"name": "text"}}                       # optional: merged into captions; other keys -> meta

  A cameras.json that breaks these rules makes the group a record dropped as `bad_cameras`, with an error naming the
  file, the frame and what is wrong: one bad scene never stops the build.
* Identity groups (`layout: identities`, for ID customization): every sub-folder directly under the root is ONE
  input, a person: the images under it (recursively, sorted by path) are the views of one group, whose rows the
  trainer's faceid task reads (view 0 the target, the others references); cameras.json and sidecars there are not
  read. A picture that cannot be read or decoded leaves its group instead of dropping it; the face stage
  (build.faces, which this layout needs) boxes each view's faces and leaves out a picture without exactly one face,
  one whose face the group's bucket would crop, and those past the faceid task's 5; a group left with fewer than 2
  is dropped (`too_few_pictures`; pipelines.process.leave_out, pipelines/faces.py). Images directly under the root
  are single samples, as in the default layout.

Plan. Partitions are consecutive chunks of `partition_size` inputs in sorted order (a single image is named by its
path, a group by its folder). A spec is JSON holding everything the reader needs: {"first": index of its first input
in the source, "entries": [...]}, an entry being {"path", "size", "version", "sidecars": [{"path", "size",
"version"}]} for an image, {"group": folder, "cameras": {...}, "files": [{...}, ...]} for a group (its image files)
or {"identity": folder, "files": [...]} for a person.
Sizes and versions (`Storage.stat`: local mtime_ns, S3 LastModified) come from one recursive listing, so the plan is
the same for an unchanged folder and changes when a file is added, removed or rewritten (the build then refuses to
mix the two in one build).

Records (pipelines/ingest.py): exactly one per entry, in entry order: {"index", "input_id", "group_id", "views":
[{"data", "name", "camera"}], "captions", "meta": {"path", "root", "sidecar"?, "identity"?}, "dropped", "error"}.
input_id is f"{uri}#{size}:{version}" for an image, f"{folder uri}#{digest}" for a group or a person (the digest
covers every id of its cameras.json and image files). A file that cannot be read (vanished or changed since the
plan, no permission) makes its record `unreadable` with the reason; an S3 store that cannot be reached at all
raises instead, so the partition fails and is retried rather than committed as all-dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

from onegen.storage import Storage
from pipelines.decode import DropSample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # case-insensitive
CAMERAS_FILE = "cameras.json"
SIDECAR_EXTENSIONS = (".txt", ".json")
FOLDER_DROP_REASONS = ("unreadable", "bad_sidecar", "bad_cameras")
_FORMAT_HINT = "see the cameras.json format in pipelines/sources/folder.py"


# --- plan ---------------------------------------------------------------------------------------------------------

def plan_folder_partitions(root: str, partition_size: int, skip: Callable[[str], bool] | None = None,
                           layout: str = "files") -> list[dict]:
    """The folder's inputs (see the module docstring; `layout` "files" or "identities") cut into consecutive
    partitions of `partition_size`, as JSON-serialisable specs for `read_folder_partition`; inputs whose input_id
    `skip` names are left out first (an incremental build). Raises FileNotFoundError when the root lists no files and
    ValueError when none of them is an image input (a wrong path, not an empty source, in both cases)."""
    if int(partition_size) < 1:
        raise ValueError(f"partition_size must be at least 1 input, got {partition_size}")
    storage = Storage(root)
    files = listed_versions(storage)
    if not files:
        raise FileNotFoundError(f"{storage.root_uri}: no files there; check the folder source's path (a local folder "
                                "or s3://bucket/prefix)")
    identities = layout == "identities"
    groups = set() if identities else {posixpath.dirname(rel) for rel in files
                                       if posixpath.basename(rel) == CAMERAS_FILE}
    inputs: dict[str, dict[str, Any]] = {}
    members: dict[str, list[dict[str, Any]]] = {}
    for rel in files:  # sorted
        group = _outermost_group(rel, groups)
        if identities and "/" in rel:
            person = rel.split("/", 1)[0]
            if _is_image(rel):
                inputs.setdefault(person, {"identity": person, "files": members.setdefault(person, [])})
                members[person].append(_file(rel, files))
        elif group is not None:
            if group not in inputs:
                inputs[group] = {"group": group, "cameras": _file(posixpath.join(group, CAMERAS_FILE), files),
                                 "files": members.setdefault(group, [])}
            if _is_image(rel):
                members[group].append(_file(rel, files))
        elif _is_image(rel):
            stem = posixpath.splitext(rel)[0]
            inputs[rel] = {**_file(rel, files), "sidecars": [_file(stem + ext, files) for ext in SIDECAR_EXTENSIONS
                                                             if stem + ext in files]}
    if not inputs:
        raise ValueError(f"{storage.root_uri}: {len(files)} files but no images ({', '.join(IMAGE_EXTENSIONS)}) and no "
                         f"{'identity folders' if identities else CAMERAS_FILE + ' groups'}; check the folder "
                         "source's path")
    entries = [inputs[name] for name in sorted(inputs)]
    if skip is not None:
        entries = [entry for entry in entries if not skip(entry_input_id(storage, entry))]
    step = int(partition_size)
    return [{"first": first, "entries": entries[first:first + step]} for first in range(0, len(entries), step)]


def entry_input_id(storage: Storage, entry: dict) -> str:
    """The input_id of a planned entry: f"{uri}#{size}:{version}" for an image, f"{folder uri}#{digest}" for a group
    (the digest covers the path, size and version of its cameras.json and every image file)."""
    if "identity" in entry:
        folder, files = entry["identity"], entry["files"]
    elif "group" in entry:
        folder, files = entry["group"], [entry["cameras"], *entry["files"]]
    else:
        return f"{storage.uri(entry['path'])}#{entry['size']}:{entry['version']}"
    ids = [f"{f['path']}#{f['size']}:{f['version']}" for f in files]
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    return f"{storage.uri(folder) if folder else storage.root_uri}#{digest}"


def listed_versions(storage: Storage) -> dict[str, tuple[int, str]]:
    """{relative path: (size, version)} of every file under the storage root, sorted by path, from one recursive
    listing (S3: one request per 1000 keys, not one per file); the versions are the ones `Storage.stat` gives.
    Shared with pipelines/sources/tars.py."""
    names = storage.list(recursive=True)  # the public listing: no temp files, claims or onegen's own folder
    if not names:
        return {}
    infos = storage.filesystem.get_file_info(pafs.FileSelector(storage.path, recursive=True, allow_not_found=True))
    by_path = {info.path: info for info in infos if info.type == pafs.FileType.File}
    out = {}
    for rel in _without_link_repeats(storage, names):
        info = by_path.get(storage.fs_path(rel))
        out[rel] = (int(info.size), str(info.mtime_ns)) if info is not None else storage.stat(rel)
    return out


def _without_link_repeats(storage: Storage, names: list[str]) -> list[str]:
    """A local folder may reach one file by several paths through symlinks (a link to a parent folder repeats the
    whole tree until the OS stops at ELOOP): keep each real file once, under its shortest path, so a link never
    multiplies inputs. S3 has no links."""
    if not isinstance(storage.filesystem, pafs.LocalFileSystem):
        return names
    import os

    shortest: dict[str, str] = {}
    for rel in sorted(names, key=lambda name: (name.count("/"), name)):
        shortest.setdefault(os.path.realpath(storage.fs_path(rel)), rel)
    return sorted(shortest.values())


def _outermost_group(rel: str, groups: set[str]) -> str | None:
    parts = rel.split("/")[:-1]
    for depth in range(len(parts) + 1):
        folder = "/".join(parts[:depth])
        if folder in groups:
            return folder
    return None


def _is_image(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_EXTENSIONS)


def _file(rel: str, files: dict[str, tuple[int, str]]) -> dict[str, Any]:
    size, version = files[rel]
    return {"path": rel, "size": size, "version": version}


# --- read ---------------------------------------------------------------------------------------------------------

def read_folder_partition(root: str, spec: dict) -> list[dict]:
    """One record per entry of `spec` (from `plan_folder_partitions` on the same root), in entry order. Never raises
    for one bad input (it becomes a dropped record); raises only when the store itself cannot be reached."""
    storage = Storage(root)
    readers = {"group": _read_group, "identity": _read_identity}
    return [next((read for key, read in readers.items() if key in entry), _read_image)(storage, index, entry)
            for index, entry in enumerate(spec["entries"])]


def _record(index: int, input_id: str, group_id: str | None, meta: dict) -> dict[str, Any]:
    return {"index": index, "input_id": input_id, "group_id": group_id, "views": [], "captions": {}, "meta": meta,
            "dropped": None, "error": None}


def _read_image(storage: Storage, index: int, entry: dict) -> dict[str, Any]:
    uri = storage.uri(entry["path"])
    record = _record(index, entry_input_id(storage, entry), None,
                     {"path": entry["path"], "root": storage.root_uri})
    try:
        for sidecar in entry["sidecars"]:
            _apply_sidecar(storage, sidecar, record)
        data = read_planned(storage, entry)
    except DropSample as refused:
        record.update(dropped=refused.reason, error=str(refused), views=[{"name": uri, "camera": None}])
        return record
    record["views"] = [{"data": data, "name": uri, "camera": None}]
    return record


def _apply_sidecar(storage: Storage, sidecar: dict, record: dict) -> None:
    uri = storage.uri(sidecar["path"])
    data = read_planned(storage, sidecar)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DropSample("bad_sidecar", f"{uri}: not UTF-8 text ({err}); save the sidecar as UTF-8") from None
    if sidecar["path"].endswith(".txt"):
        if text.strip():
            record["captions"]["original"] = text.strip()
        return
    apply_json_sidecar(text, uri, record)


def apply_json_sidecar(text: str, uri: str, record: dict) -> None:
    """A .json sidecar (a folder's STEM.json, a tar's KEY.json) into the record: captions, the rest as
    meta["sidecar"]; DropSample("bad_sidecar") naming `uri` when it is not a JSON object of that shape."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DropSample("bad_sidecar", f"{uri}: not valid JSON ({err}); fix or remove the sidecar") from None
    if not isinstance(document, dict):
        raise DropSample("bad_sidecar", f"{uri}: a sidecar must be a JSON object ({{\"caption\": ..., ...}}), got "
                                      f"{type(document).__name__}")
    captions, extras = _captions_of(document, uri, "bad_sidecar")
    record["captions"].update(captions)
    if extras:
        record["meta"]["sidecar"] = extras


def _captions_of(document: dict, uri: str, reason: str, *, skip: tuple = ()) -> tuple[dict[str, str], dict]:
    """(captions, the other keys) of a sidecar or cameras.json object: "caption" -> "original", "captions" merged."""
    captions: dict[str, str] = {}
    caption = document.get("caption")
    if caption is not None:
        if not isinstance(caption, str):
            raise DropSample(reason, f"{uri}: \"caption\" must be a string, got {type(caption).__name__}")
        if caption.strip():
            captions["original"] = caption.strip()
    named = document.get("captions")
    if named is not None:
        if not isinstance(named, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in named.items()):
            raise DropSample(reason, f"{uri}: \"captions\" must be an object of name -> text, e.g. {{\"short\": \"a "
                                   "cat\"}}")
        captions.update(named)
    extras = {k: v for k, v in document.items() if k not in ("caption", "captions", *skip)}
    return captions, extras


def _read_group(storage: Storage, index: int, entry: dict) -> dict[str, Any]:
    folder = entry["group"]
    cameras = entry["cameras"]
    record = _record(index, entry_input_id(storage, entry), folder or ".",
                     {"path": folder or ".", "root": storage.root_uri})
    try:
        document = _parse_cameras(storage, cameras, folder, entry["files"])
        captions, extras = _captions_of(document, storage.uri(cameras["path"]), "bad_cameras",
                                        skip=("frames",))
        views = []
        planned = {f["path"]: f for f in entry["files"]}
        for frame in document["frames"]:
            rel = _frame_path(folder, frame["file"])
            views.append({"data": read_planned(storage, planned[rel]), "name": storage.uri(rel),
                          "camera": {"c2w_opengl": frame["c2w_opengl"], "K": frame.get("K")}})
    except DropSample as refused:
        record.update(dropped=refused.reason, error=str(refused),
                      views=[{"name": storage.uri(f["path"]), "camera": None} for f in entry["files"]])
        return record
    record.update(views=views, captions=captions)
    if extras:
        record["meta"]["sidecar"] = extras
    return record


def _read_identity(storage: Storage, index: int, entry: dict) -> dict[str, Any]:
    """A person's pictures as one group record (meta["identity"]: the folder's name); a picture that cannot be read
    is a view with its refusal (the decode stage leaves it out of the group)."""
    person = entry["identity"]
    record = _record(index, entry_input_id(storage, entry), person,
                     {"path": person, "root": storage.root_uri, "identity": person})
    for planned in entry["files"]:
        view = {"name": storage.uri(planned["path"]), "camera": None}
        try:
            view["data"] = read_planned(storage, planned)
        except DropSample as refused:
            view["refused"] = (refused.reason, str(refused))
        record["views"].append(view)
    return record


def _frame_path(folder: str, file: str) -> str:
    return posixpath.normpath(posixpath.join(folder, file)) if folder else posixpath.normpath(file)


def _parse_cameras(storage: Storage, cameras: dict, folder: str, files: list[dict]) -> dict:
    """The cameras.json object with each frame's matrices as float lists; DropSample("bad_cameras") naming the file,
    the frame and the problem when it breaks the format."""
    uri = storage.uri(cameras["path"])

    def bad(problem: str) -> DropSample:
        return DropSample("bad_cameras", f"{uri}: {problem}; fix the file ({_FORMAT_HINT})")

    data = read_planned(storage, cameras)
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"not valid UTF-8 JSON ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("frames"), list) or not document["frames"]:
        raise bad("expected an object with a non-empty \"frames\" list")
    planned = {f["path"] for f in files}
    seen: set[str] = set()
    frames = []
    for i, frame in enumerate(document["frames"]):
        if not isinstance(frame, dict) or not isinstance(frame.get("file"), str) or not frame["file"]:
            raise bad(f"frame {i}: expected an object with a \"file\" name")
        name = frame["file"]
        rel = _frame_path(folder, name)
        inside = rel == folder or not folder or rel.startswith(folder + "/")
        if name.startswith("/") or not inside or rel.split("/")[0] == "..":
            raise bad(f"frame {i}: file {name!r} must be a path inside the group folder")
        if rel not in planned:
            listed = sorted(posixpath.relpath(p, folder or ".") for p in planned)
            raise bad(f"frame {i}: file {name!r} is not an image in the folder (images there: {listed})")
        if rel in seen:
            raise bad(f"frame {i}: file {name!r} is listed twice")
        seen.add(rel)
        c2w = _matrix(frame.get("c2w_opengl"), 4)
        if c2w is None:
            raise bad(f"frame {i} ({name}): \"c2w_opengl\" must be a 4x4 list of finite numbers, got "
                      f"{_shape_of(frame.get('c2w_opengl'))}")
        if any(abs(a - b) > 1e-6 for a, b in zip(c2w[3], (0.0, 0.0, 0.0, 1.0))):
            raise bad(f"frame {i} ({name}): \"c2w_opengl\" bottom row must be [0, 0, 0, 1], got {c2w[3]}")
        K = frame.get("K")
        if K is not None:
            K = _matrix(K, 3)
            if K is None:
                raise bad(f"frame {i} ({name}): \"K\" must be a 3x3 list of finite numbers or absent, got "
                          f"{_shape_of(frame.get('K'))}")
            if K[0][0] <= 0 or K[1][1] <= 0 or any(abs(a - b) > 1e-6 for a, b in zip(K[2], (0.0, 0.0, 1.0))):
                raise bad(f"frame {i} ({name}): \"K\" must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0, "
                          f"got {K}")
        frames.append({"file": name, "c2w_opengl": c2w, "K": K})
    return {**document, "frames": frames}


def _matrix(value: Any, n: int) -> list[list[float]] | None:
    """`value` as an n x n list of finite floats, or None if it is not one."""
    if not isinstance(value, list) or len(value) != n:
        return None
    rows = []
    for row in value:
        if not isinstance(row, list) or len(row) != n:
            return None
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row):
            return None
        rows.append([float(x) for x in row])
    return rows


def _shape_of(value: Any) -> str:
    if isinstance(value, list):
        widths = sorted({len(row) if isinstance(row, list) else 0 for row in value})
        return f"{len(value)} rows of {'/'.join(map(str, widths)) or 0} values (or non-finite / non-numeric values)"
    return "nothing" if value is None else type(value).__name__


# --- reading files, shared with pipelines/sources/tars.py ---------------------------------------------------------

def read_planned(storage: Storage, planned: dict) -> bytes:
    """The bytes of planned file {"path", "size", ...}; DropSample("unreadable") if it vanished, cannot be read, or
    has another size than the plan saw (changed since)."""
    rel = planned["path"]
    data = read_or_refuse(storage, rel)
    if planned.get("size") is not None and len(data) != planned["size"]:
        raise DropSample("unreadable", f"{storage.uri(rel)}: changed since the build planned it ({len(data)} bytes, "
                                     f"planned {planned['size']}); sources must stay fixed during a build: build the "
                                     "new version under a new build name")
    return data


def read_or_refuse(storage: Storage, rel: str) -> bytes:
    try:
        return storage.read_bytes(rel)
    except FileNotFoundError:
        raise DropSample("unreadable", f"{storage.uri(rel)}: vanished since the build planned it; sources must stay "
                                     "fixed during a build (restore the file, or build under a new name)") from None
    except OSError as err:
        raise_if_store_down(storage, err)
        raise DropSample("unreadable", f"{storage.uri(rel)}: cannot read it ({type(err).__name__}: {err}); fix its "
                                     "permissions or remove it") from None


def raise_if_store_down(storage: Storage, err: OSError) -> None:
    """On S3, a read error may be the whole store (endpoint down, credentials gone) rather than one object: probe the
    root, and raise the probe's error if it fails too, so the partition fails (and is retried) instead of being
    committed with every input dropped."""
    if storage.scheme != "s3":
        return
    try:
        storage.exists("")
    except OSError as probe:
        raise probe from err


__all__ = ["CAMERAS_FILE", "FOLDER_DROP_REASONS", "IMAGE_EXTENSIONS", "SIDECAR_EXTENSIONS", "apply_json_sidecar",
           "entry_input_id", "listed_versions", "plan_folder_partitions", "read_folder_partition", "read_or_refuse",
           "read_planned"]
