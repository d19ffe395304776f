"""Read, write and list files under one root URI: a local path, file:///path or s3://bucket/prefix.

Writes are atomic: a reader sees the old object or the complete new one, never a partial file.
  * local: write a temp file in the target's folder, fsync, os.replace (or os.link for put_if_absent);
  * S3: one PUT of the complete body (boto3), or a multipart upload for `write_file`, which S3 makes visible only
    when it completes. `put_if_absent` sends `If-None-Match: *`: S3 answers 412 when the key exists, so of two
    racing writers exactly one wins (the commit-marker primitive of the data build).
Reads, listing and deletes go through `pyarrow.fs`; `filesystem` and `fs_path()` hand the same place to pyarrow and
Ray Data: `ds.write_parquet(storage.uri("x"), filesystem=storage.filesystem)`.

S3 settings come from arguments (config `storage.s3`), else the standard AWS environment: endpoint from
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, credentials and region from boto3's chain (AWS_ACCESS_KEY_ID/...,
AWS_PROFILE, ~/.aws/credentials and ~/.aws/config, instance metadata). pyarrow is given the credentials boto3
resolved, so profiles and config files work for both.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from onegen.config import OnegenConfig

_TEMP_MARK = ".onegen-tmp-"  # local temp files carry this in their name; listings skip them


class StorageError(OSError):
    """A storage problem that is not "no such file": bad URI, missing bucket, credentials, unreachable endpoint."""


def parse_root_uri(root: str) -> tuple[str, str, str, str]:
    """(scheme "s3"|"file", bucket, prefix, root path) of a storage root: a local path, file:///abs/path or
    s3://BUCKET[/PREFIX]. Raises StorageError naming the URI and the accepted forms (config validation uses it too)."""
    if root.startswith("s3://"):
        bucket, _, prefix = root[len("s3://"):].partition("/")
        if not bucket:
            raise StorageError(f"{root}: expected s3://BUCKET[/PREFIX]")
        prefix = prefix.strip("/")
        return "s3", bucket, prefix, posixpath.join(bucket, prefix) if prefix else bucket
    if root.startswith("file://"):
        local = root[len("file://"):]
        if not local.startswith("/"):
            raise StorageError(f"{root}: a file:// URI needs an absolute path (file:///abs/path)")
        return "file", "", "", str(Path(local).absolute())
    if "://" in root:
        raise StorageError(f"{root}: unsupported scheme; use a local path, file:///path or s3://bucket/prefix")
    return "file", "", "", str(Path(root).expanduser().absolute())


class Storage:
    """Files under `root_uri`; every method takes a path relative to the root ('shards/00001.tar')."""

    def __init__(self, root_uri: str | os.PathLike, *, endpoint_url: str | None = None, region: str | None = None,
                 profile: str | None = None):
        root = os.fspath(root_uri)
        self.scheme, self._bucket, self._prefix, self._root_path = parse_root_uri(root)
        self.root_uri = f"s3://{self._root_path}" if self.scheme == "s3" else self._root_path
        self._endpoint_arg, self._region_arg, self._profile = endpoint_url, region, profile
        self._init_args = (root, endpoint_url, region, profile)
        self._lock = threading.RLock()  # boto3 sessions are not thread-safe; build clients once
        self._cache: dict[str, Any] = {}

    # Pickles as its settings (clients and locks are rebuilt), so a Storage can travel into Ray tasks.
    def __getstate__(self) -> dict[str, Any]:
        return {"init_args": self._init_args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        root, endpoint_url, region, profile = state["init_args"]
        self.__init__(root, endpoint_url=endpoint_url, region=region, profile=profile)

    def _lazy(self, name: str, factory):
        with self._lock:
            if name not in self._cache:
                self._cache[name] = factory()
            return self._cache[name]

    @classmethod
    def from_config(cls, cfg: "OnegenConfig") -> "Storage":
        s3 = cfg.storage.s3
        return cls(cfg.storage.root, endpoint_url=s3.endpoint_url, region=s3.region, profile=s3.profile)

    def __repr__(self) -> str:
        return f"Storage({self.root_uri!r})"

    # --- where things are ---------------------------------------------------------------------------------------

    def uri(self, rel: str = "") -> str:
        """Full location of `rel`: an absolute local path or s3://bucket/key (what Ray Data and pyarrow accept)."""
        path = self.fs_path(rel)
        return f"s3://{path}" if self.scheme == "s3" else path

    def fs_path(self, rel: str = "") -> str:
        """Path of `rel` inside `self.filesystem` (bucket/key for S3, absolute path locally)."""
        rel = _clean_rel(rel, allow_root=True)
        return posixpath.join(self._root_path, rel) if rel else self._root_path

    @property
    def path(self) -> str:
        """The root as a path inside `self.filesystem`."""
        return self._root_path

    @property
    def endpoint_url(self) -> str | None:
        if self.scheme != "s3":
            return None
        return (self._endpoint_arg or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or None)

    @property
    def filesystem(self) -> pafs.FileSystem:
        """pyarrow filesystem for this root (S3: same endpoint, region and credentials as the boto3 writes)."""
        return self._lazy("filesystem", self._make_filesystem)

    def _make_filesystem(self) -> pafs.FileSystem:
        if self.scheme != "s3":
            return pafs.LocalFileSystem()
        creds = self._credentials()
        endpoint = self.endpoint_url
        kwargs: dict[str, Any] = {"region": self._region}
        if endpoint:
            scheme, _, hostport = endpoint.partition("://")
            kwargs.update(endpoint_override=hostport.rstrip("/"), scheme=scheme)
        return pafs.S3FileSystem(access_key=creds.access_key, secret_key=creds.secret_key,
                                 session_token=creds.token, **kwargs)

    # --- reading ------------------------------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        with self.open_input_stream(rel) as stream:
            return stream.read()

    def open_input_stream(self, rel: str) -> pafs.NativeFile:
        """A pyarrow input stream (a context manager with .read()); FileNotFoundError names the URI."""
        rel = _clean_rel(rel)
        try:
            return self.filesystem.open_input_stream(self.fs_path(rel))
        except OSError as err:
            self._check_bucket(rel)
            raise self._translate(err, rel) from None

    def exists(self, rel: str) -> bool:
        """True if `rel` is a file or a folder (an S3 prefix with objects under it)."""
        return self._info(rel).type != pafs.FileType.NotFound

    def list(self, prefix: str = "", recursive: bool = False) -> list[str]:
        """Sorted paths relative to the root under folder `prefix`. Recursive: files only. Not recursive: the
        immediate children, folders with a trailing '/'. A missing prefix lists as empty."""
        base = self.fs_path(prefix)
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
        except OSError as err:
            raise self._translate(err, prefix) from None
        if not infos:
            self._check_bucket(prefix)
        out = []
        for info in infos:
            if _TEMP_MARK in posixpath.basename(info.path):
                continue
            rel = posixpath.relpath(info.path, self._root_path)
            if info.type == pafs.FileType.Directory:
                if not recursive:
                    out.append(rel + "/")
            elif info.type == pafs.FileType.File:
                out.append(rel)
        return sorted(out)

    # --- writing ------------------------------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes | Iterable[bytes]) -> None:
        """Write atomically, replacing any existing file. `data` may be an iterable of chunks: if it raises, nothing
        is written (the target keeps its previous content or stays absent)."""
        rel = _clean_rel(rel)
        if self.scheme == "s3":
            self._s3_put(rel, _join_chunks(data))
            return
        target = Path(self.fs_path(rel))
        tmp = self._write_local_temp(target, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def write_file(self, rel: str, local_path: str | os.PathLike) -> None:
        """Copy a local file to `rel` atomically (large shards: S3 multipart upload, visible only when complete)."""
        rel = _clean_rel(rel)
        if self.scheme == "s3":
            try:
                self._s3_client.upload_file(os.fspath(local_path), self._bucket, self._key(rel))
            except Exception as err:  # boto3 raises S3UploadFailedError wrapping ClientError
                raise self._translate(err, rel) from None
            return
        with open(local_path, "rb") as src:
            self.write_bytes(rel, iter(functools.partial(src.read, 1 << 20), b""))

    def put_if_absent(self, rel: str, data: bytes | Iterable[bytes]) -> bool:
        """Create `rel` only if it does not exist. True: this call created it. False: it existed (or a racing
        writer won); the existing content is untouched. The content appears complete or not at all."""
        rel = _clean_rel(rel)
        if self.scheme == "s3":
            return self._s3_put(rel, _join_chunks(data), if_none_match=True)
        target = Path(self.fs_path(rel))
        tmp = self._write_local_temp(target, data)
        try:
            os.link(tmp, target)  # atomic, and fails if the target exists: exactly one racing writer wins
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return _exclusive_copy(tmp, target)  # file systems without hard links
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)
        return True

    def delete(self, rel: str, *, recursive: bool = False, missing_ok: bool = True) -> bool:
        """Delete a file (or a folder with recursive=True). Returns False if nothing was there."""
        rel = _clean_rel(rel)
        info = self._info(rel)
        if info.type == pafs.FileType.NotFound:
            if missing_ok:
                return False
            raise FileNotFoundError(f"{self.uri(rel)}: no such file")
        try:
            if info.type == pafs.FileType.Directory:
                if not recursive:
                    raise IsADirectoryError(f"{self.uri(rel)}: is a folder; pass recursive=True to delete it")
                self.filesystem.delete_dir(info.path)
            else:
                self.filesystem.delete_file(info.path)
        except IsADirectoryError:
            raise
        except OSError as err:
            raise self._translate(err, rel) from None
        return True

    # --- internals ----------------------------------------------------------------------------------------------

    def _info(self, rel: str) -> pafs.FileInfo:
        try:
            return self.filesystem.get_file_info(self.fs_path(rel))
        except OSError as err:
            raise self._translate(err, rel) from None

    def _check_bucket(self, rel: str) -> None:
        """S3 reports a missing bucket like a missing key; say which it is."""
        if self.scheme != "s3":
            return
        try:
            missing = self.filesystem.get_file_info(self._bucket).type == pafs.FileType.NotFound
        except OSError as err:
            raise self._translate(err, rel) from None
        if missing:
            raise StorageError(f"{self.uri(rel)}: bucket '{self._bucket}' does not exist: create it, or fix "
                               "storage.root")

    def _key(self, rel: str) -> str:
        return posixpath.join(self._prefix, rel) if self._prefix else rel

    def _write_local_temp(self, target: Path, data: bytes | Iterable[bytes]) -> Path:
        """Write `data` to a fsynced temp file beside `target`; on any error remove it and re-raise."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}{_TEMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "xb") as out:
                for chunk in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    @property
    def _session(self):
        return self._lazy("session", self._make_session)

    def _make_session(self):
        import boto3
        import botocore.exceptions

        try:
            return boto3.Session(profile_name=self._profile)
        except botocore.exceptions.ProfileNotFound:
            raise StorageError(f"{self.root_uri}: AWS profile '{self._profile}' not found in ~/.aws/config or "
                               "~/.aws/credentials (storage.s3.profile / AWS_PROFILE)") from None

    @property
    def _region(self) -> str:
        return self._region_arg or self._session.region_name or "us-east-1"

    def _credentials(self):
        creds = self._session.get_credentials()
        if creds is None:
            raise StorageError(f"{self.root_uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials (never in a config file)")
        return creds.get_frozen_credentials()

    @property
    def _s3_client(self):
        return self._lazy("s3_client", self._make_s3_client)

    def _make_s3_client(self):
        from botocore.config import Config

        self._credentials()  # fail early with the helpful message
        # Path-style addressing for custom endpoints (MinIO, moto, Ceph), like pyarrow's default.
        config = Config(s3={"addressing_style": "path"}) if self.endpoint_url else None
        return self._session.client("s3", endpoint_url=self.endpoint_url, region_name=self._region, config=config)

    def _s3_put(self, rel: str, body: bytes, *, if_none_match: bool = False) -> bool:
        import botocore.exceptions

        extra = {"IfNoneMatch": "*"} if if_none_match else {}
        for attempt in range(5):
            try:
                self._s3_client.put_object(Bucket=self._bucket, Key=self._key(rel), Body=body, **extra)
                return True
            except botocore.exceptions.ClientError as err:
                code = err.response.get("Error", {}).get("Code")
                if if_none_match and code == "PreconditionFailed":
                    return False
                # S3 answers 409 while another conditional write to the key is in flight: retry, then it is 412.
                if if_none_match and code == "ConditionalRequestConflict" and attempt < 4:
                    time.sleep(0.05 * 2 ** attempt)
                    continue
                raise self._translate(err, rel) from None
            except Exception as err:
                raise self._translate(err, rel) from None
        raise AssertionError("unreachable")

    def _translate(self, err: BaseException, rel: str) -> OSError:
        """Turn boto3/pyarrow errors into FileNotFoundError or a StorageError that names the URI and the fix."""
        uri = self.uri(rel) if rel else self.root_uri
        text = str(err)
        code = ""
        response = getattr(err, "response", None) or getattr(getattr(err, "last_exception", None), "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code", "")
        name = type(err).__name__
        if code == "NoSuchBucket" or "NoSuchBucket" in text or "Bucket '" in text and "not found" in text.lower():
            return StorageError(f"{uri}: bucket '{self._bucket}' does not exist: create it, or fix storage.root")
        if code in ("NoSuchKey", "404") or isinstance(err, FileNotFoundError) or "Path does not exist" in text:
            return FileNotFoundError(errno.ENOENT, f"{uri}: no such file")
        if name == "NoCredentialsError":
            return StorageError(f"{uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                "or AWS_PROFILE with ~/.aws/credentials")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or "AccessDenied" in text \
                or "ACCESS_DENIED" in text:
            return StorageError(f"{uri}: access denied ({code or 'AccessDenied'}): check the AWS credentials "
                                "(AWS_PROFILE / AWS_ACCESS_KEY_ID) and the bucket policy")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError") \
                or "curlCode: 7" in text or "Couldn't connect" in text:
            where = self.endpoint_url or "AWS S3"
            return StorageError(f"{uri}: cannot reach the S3 endpoint {where}: check storage.s3.endpoint_url / "
                                "AWS_ENDPOINT_URL and that the service is up")
        if isinstance(err, StorageError):
            return err
        return StorageError(f"{uri}: {name}: {text}")


def _clean_rel(rel: str, *, allow_root: bool = False) -> str:
    """Normalise a relative path; refuse absolute paths and '..' (everything stays under the root)."""
    rel = os.fspath(rel).replace("\\", "/")
    norm = posixpath.normpath(rel) if rel else ""
    if norm == ".":
        norm = ""
    if rel.startswith("/") or norm == ".." or norm.startswith("../"):
        raise ValueError(f"{rel!r}: expected a path relative to the storage root, without '..'")
    if not norm and not allow_root:
        raise ValueError("expected a file path relative to the storage root, got an empty path")
    return norm


def _join_chunks(data: bytes | Iterable[bytes]) -> bytes:
    # The whole body is gathered before the single PUT, so a failing producer uploads nothing.
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return b"".join(data)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def _exclusive_copy(tmp: Path, target: Path) -> bool:
    """Fallback without hard links: O_EXCL create decides the winner; the content is copied in afterwards, so a
    reader racing the winner may see a short file (only on such file systems)."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as out, open(tmp, "rb") as src:
        shutil.copyfileobj(src, out)
        out.flush()
        os.fsync(out.fileno())
    return True
