"""WebDataset tars as a build source (`type: webdataset`): e.g. an earlier img2dataset output, local or on S3.

    specs = plan_tar_partitions(["s3://bucket/laion-out/", "/data/extra-{000..009}.tar"])  # driver: listing only
    records = read_tar_partition(specs[0])                                                 # Ray task: one tar

Plan. Each path is a tar (`.tar`, `.tar.gz`, `.tgz`), a folder or s3:// prefix (every tar under it, recursively), or a
pattern: `{000..009}` brace ranges (webdataset's notation, expanded by `braceexpand`, which webdataset uses; every
name a range expands to must exist) and `*`/`?`/`[...]` globs matched against the listing of the pattern's folder.
Other files (img2dataset's per-shard parquet and `_stats.json`) are ignored. Tars are taken in path order (a folder
or glob sorted, a range in its expansion order), each once; one tar is one partition, spec {"root", "path", "size",
"version"} (the size and version from the listing, as for folders).

Samples. Members are grouped into samples by key the way webdataset does (`webdataset.tariterators`: the key is the
member name up to the first '.' of its base name; members of one sample are consecutive). The image is the
sample's first member whose last extension is an image's (folder.IMAGE_EXTENSIONS); `.txt` is the caption, `.json`
a sidecar read like a folder's: "caption" -> captions["original"] (wins over .txt), "captions" merged, every other key
(img2dataset's url, status, sizes, extra columns) -> meta["sidecar"]. A sample without an image is dropped as
`not_an_image`, one with a bad .json as `bad_sidecar`. input_id = f"{tar uri}#{size}:{version}/{key}".

A tar whose bytes are damaged part-way (truncated, not a tar, bad gzip) keeps the samples before the damage and
ends with one record dropped as `unreadable` that names the tar and the error: the build goes on and the loss is
counted. A tar changed since the plan (another size) is one `unreadable` record. A read error of the store itself
(S3 down, a reset connection) raises, so Ray retries the partition rather than commit part of the tar.
"""

from __future__ import annotations

import fnmatch
import gzip
import tarfile
import zlib
from collections.abc import Callable
from typing import Any

from onegen.storage import Storage
from pipelines.decode import DropSample
from pipelines.sources.folder import IMAGE_EXTENSIONS, apply_json_sidecar, listed_versions, raise_if_store_down

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = "*?["


# --- plan -------------------------------------------------------------------------------------------------------

def plan_tar_partitions(paths: list[str], skip: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """One spec per tar named by `paths` (see the module docstring), in path order, each tar once; a tar whose
    `tar_input_prefix` `skip` names is left out (an incremental build: an earlier build read it). Raises
    FileNotFoundError naming a path that lists no tar (a wrong path, not an empty source)."""
    if isinstance(paths, str):
        raise TypeError(f"paths must be a list of tar paths, got the string {paths!r}: wrap it in a list")
    from braceexpand import braceexpand

    specs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in paths:
        found = []
        for expanded in braceexpand(str(path)):
            here = _tars_at(expanded)
            if not here and not any(char in expanded for char in _GLOB_CHARS):  # a range must not skip a gap
                where = expanded if expanded == str(path) else f"{expanded} (from {path})"
                raise FileNotFoundError(f"{where}: no tar there ({', '.join(TAR_EXTENSIONS)}); name tar files, a "
                                        "folder or s3:// prefix holding them, or a pattern such as "
                                        "shards-{000..009}.tar")
            found += here
        if not found:
            raise FileNotFoundError(f"{path}: no tar matches ({', '.join(TAR_EXTENSIONS)}); check the pattern")
        for spec in found:
            uri = Storage(spec["root"]).uri(spec["path"])
            if uri not in seen:
                seen.add(uri)
                if skip is None or not skip(tar_input_prefix(spec)):
                    specs.append(spec)
    return specs


def _tars_at(path: str) -> list[dict[str, Any]]:
    """Tars at one expanded path: the file itself, every tar under a folder, or the glob's matches."""
    storage, name = Storage.for_file(path)
    if any(char in name for char in _GLOB_CHARS):
        files = listed_versions(storage) if storage.exists("") else {}
        return [_spec(storage, rel, files[rel]) for rel in files
                if "/" not in rel and _is_tar(rel) and fnmatch.fnmatchcase(rel, name)]
    if _is_tar(name):
        try:
            return [_spec(storage, name, storage.stat(name))]
        except FileNotFoundError:
            pass  # maybe a folder whose name ends in .tar
    storage = Storage(path)
    files = listed_versions(storage) if storage.exists("") else {}
    return [_spec(storage, rel, files[rel]) for rel in files if _is_tar(rel)]


def _is_tar(rel: str) -> bool:
    return rel.lower().endswith(TAR_EXTENSIONS)


def _spec(storage: Storage, rel: str, size_version: tuple[int, str]) -> dict[str, Any]:
    size, version = size_version
    return {"root": storage.root_uri, "path": rel, "size": int(size), "version": str(version)}


def tar_input_prefix(spec: dict[str, Any]) -> str:
    """What every input_id of this tar starts with: a tar (this exact version) is in a build iff its ids are."""
    return f"{Storage(spec['root']).uri(spec['path'])}#{spec['size']}:{spec['version']}/"


# --- read -------------------------------------------------------------------------------------------------------

def read_tar_partition(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per sample of the tar, in tar order (see the module docstring)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    storage = Storage(spec["root"])
    uri, prefix = storage.uri(spec["path"]), tar_input_prefix(spec)
    records: list[dict[str, Any]] = []
    try:
        size = storage.stat(spec["path"])[0]
        if size != spec["size"]:
            raise DropSample("unreadable", f"{uri}: changed since the build planned it ({size} bytes, planned "
                                           f"{spec['size']}); sources must stay fixed during a build: build the new "
                                           "version under a new build name")
        with storage.open_input_stream(spec["path"]) as stream:
            members = ({**member, "__url__": uri} for member in tar_file_iterator(stream))
            for sample in group_by_keys(members):
                records.append(_sample_record(len(records), prefix, uri, sample))
    except DropSample as refused:
        records.append(_damaged(len(records), prefix, uri, refused.reason, str(refused)))
    except FileNotFoundError:
        records.append(_damaged(len(records), prefix, uri, "unreadable",
                                f"{uri}: vanished since the build planned it; sources must stay fixed during a build "
                                "(restore the tar, or build under a new name)"))
    except (tarfile.TarError, EOFError, ValueError, gzip.BadGzipFile, zlib.error) as err:  # the bytes are bad
        where = f"after its first {len(records)} samples" if records else "before its first sample"
        records.append(_damaged(len(records), prefix, uri, "unreadable",
                                f"{uri}: the tar is damaged {where} ({type(err).__name__}: {err}); the samples "
                                "before the damage are kept: rewrite the tar to build the rest"))
    except OSError as err:  # the store, not the tar (a reset connection): fail the task, so Ray retries it
        raise_if_store_down(storage, err)
        raise
    return records


def _sample_record(index: int, prefix: str, uri: str, sample: dict[str, Any]) -> dict[str, Any]:
    key = sample["__key__"]
    record = {"index": index, "input_id": prefix + key, "group_id": None, "views": [], "captions": {},
              "meta": {"tar": uri, "key": key}, "dropped": None, "error": None}
    members = [name for name in sample if not name.startswith("__")]
    image = _member(members, IMAGE_EXTENSIONS)
    name = f"{uri}/{key}.{image}" if image else f"{uri}/{key}"
    try:
        text_member, json_member = _member(members, (".txt",)), _member(members, (".json",))
        if text_member:
            text = _text(sample[text_member], f"{uri}/{key}.{text_member}")
            if text.strip():
                record["captions"]["original"] = text.strip()
        if json_member:
            where = f"{uri}/{key}.{json_member}"
            apply_json_sidecar(_text(sample[json_member], where), where, record)
        if image is None:
            raise DropSample("not_an_image", f"{uri}: sample {key!r} has no image member (its members: "
                                             f"{', '.join(members) or 'none'}; images are "
                                             f"{', '.join(IMAGE_EXTENSIONS)})")
    except DropSample as refused:
        record.update(dropped=refused.reason, error=str(refused), views=[{"name": name, "camera": None}])
        return record
    record["views"] = [{"data": sample[image], "name": name, "camera": None}]
    return record


def _member(members: list[str], extensions: tuple[str, ...]) -> str | None:
    """The first member whose last extension is one of `extensions`: webdataset splits a name at the first dot of
    its base name, so `photo.v2.jpg` is key `photo`, member `v2.jpg`."""
    return next((name for name in members if f".{name.lower().rsplit('.', 1)[-1]}" in extensions), None)


def _text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DropSample("bad_sidecar", f"{where}: not UTF-8 text ({err}); rewrite the member as UTF-8") from None


def _damaged(index: int, prefix: str, uri: str, reason: str, message: str) -> dict[str, Any]:
    """The record standing for a tar's unreadable rest: one counted input, never silence."""
    return {"index": index, "input_id": f"{prefix}#rest-from-{index}", "group_id": None,
            "views": [{"name": uri, "camera": None}], "captions": {}, "meta": {"tar": uri}, "dropped": reason,
            "error": message}


__all__ = ["TAR_EXTENSIONS", "plan_tar_partitions", "read_tar_partition", "tar_input_prefix"]
