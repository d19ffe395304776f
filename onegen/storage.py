"""Read, write and list files under one root URI: a local path, file:///path or s3://bucket/prefix.

Writes are atomic: a reader sees the old object or the complete new one, never a partial file.
  * local: write a temp file in the target's folder, fsync, then os.replace (write) or an exclusive commit
    (put_if_absent: os.link, or where hard links are refused, Linux renameat2(RENAME_NOREPLACE)). Temp names carry
    the writer's host and pid (`.NAME.onegen-tmp-HOST-PID-ID`); writes remove temp files that crashed writers left
    in the folder (dead pid on this host, or untouched for a day), and listings never show them.
  * S3: one PUT for a bytes body; a multipart upload for a chunk iterable longer than one part (8 MiB, streamed:
    one part in memory) or for `write_file` (S3 makes it visible only when it completes, and it is aborted if the
    producer or an upload fails; uploads of the same key left incomplete for a day are aborted first).
    `put_if_absent` sends `If-None-Match: *` (S3 answers 412 when the key exists, so of two racing writers exactly
    one wins: the commit-marker primitive of the data build). Some S3-compatible stores ignore that header: each
    store (endpoint + bucket) is probed once per process, and where it is ignored a claim protocol on S3's strong
    read-after-write consistency takes its place (`_put_if_absent_by_claim`).
Reads, listing and deletes go through `pyarrow.fs`; `filesystem` and `fs_path()` hand the same place to pyarrow and
Ray Data: `ds.write_parquet(storage.uri("x"), filesystem=storage.filesystem)`.

S3 settings come from arguments (config `storage.s3`), else the standard AWS environment: endpoint from
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, credentials from boto3's chain (AWS_ACCESS_KEY_ID/..., AWS_PROFILE,
~/.aws/credentials and ~/.aws/config, credential_process, web identity, container and instance roles). The region is
the `region` argument, else the bucket's own (asked once with HeadBucket), else the profile's / AWS_DEFAULT_REGION,
else us-east-1. Expiring credentials keep working: boto3 refreshes them, and pyarrow either resolves the same chain
itself (refreshing too) or gets a new filesystem built with the new keys (see `_filesystem_keys`). Connect timeouts
and retries are bounded, so an unreachable endpoint fails with its name instead of hanging.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import functools
import logging
import os
import posixpath
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from onegen.config import OnegenConfig

log = logging.getLogger(__name__)

_TEMP_MARK = ".onegen-tmp-"  # local temp files carry this in their name; listings skip them
_CLAIM_MARK = ".onegen-claim"  # S3 claim objects of the put_if_absent claim protocol: KEY.onegen-claim/ID
_RESERVED_DIR = "_onegen"  # onegen's own bookkeeping under the root (the conditional-put probe); not listed

_CONNECT_TIMEOUT_S = 5  # S3 answers a connect in milliseconds; a dead endpoint should fail fast, not in minutes
_MAX_ATTEMPTS = 3  # per request, first try included (AWS SDKs' "standard" retry mode default)
_PART_SIZE = 8 << 20  # multipart part size for streamed writes (S3: at least 5 MiB, except the last part)
_SPOOL_MEMORY = 8 << 20  # put_if_absent of an iterable spools up to this much in memory, then to a temp file
_STALE_TEMP_AGE_S = 24 * 3600  # a temp file untouched this long belongs to a dead writer, whatever its host
_TEMP_SWEEP_INTERVAL_S = 600  # sweep a folder for stale temp files at most this often per process
_STALE_UPLOAD_AGE = dt.timedelta(days=1)  # incomplete multipart uploads of a key older than this are aborted
_CLAIM_STALE_AGE = dt.timedelta(minutes=10)  # a put_if_absent claim older than this is a dead writer's
_CLAIM_ATTEMPTS = 12  # claim rounds before put_if_absent gives up on a store that ignores If-None-Match

# botocore credential methods that are refreshable and that the AWS C++ SDK inside pyarrow resolves by itself from
# the same environment (instance/container roles, IRSA web identity, credential_process). Assume-role profiles and
# SSO are left out: the C++ SDK's default chain does not resolve them the way boto3 does.
_SDK_CHAIN_METHODS = frozenset({"iam-role", "container-role", "assume-role-with-web-identity", "custom-process"})

# Whether a store honours If-None-Match, by (endpoint, bucket): probed once per process.
_CONDITIONAL_PUT: dict[tuple[str, str], bool] = {}
_CONDITIONAL_PUT_LOCK = threading.Lock()

# When this process last swept a local folder for stale temp files (monotonic seconds), by folder.
_LAST_SWEEP: dict[str, float] = {}
_LAST_SWEEP_LOCK = threading.Lock()


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
    if root.lower().startswith(("file:", "s3:")):  # file:/x, s3:bucket: a URI missing its '//', not a folder name
        raise StorageError(f"{root}: a URI needs '//' after the scheme: file:///abs/path or s3://bucket/prefix")
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
    def for_file(cls, location: str | os.PathLike) -> tuple["Storage", str]:
        """(Storage of a file's folder, the file's name) for a local path, file:// or s3:// URI: how to reach one
        named file (a url list, a tar, an output picture) through the methods that take a path under a root."""
        text = os.fspath(location)
        if "://" in text:
            parent, name = text.rstrip("/").rsplit("/", 1)
            if parent.endswith(":/"):  # s3://bucket-only or file:/// root: the bucket/root itself is the folder
                parent += "/"
            return cls(parent), name
        local = Path(text).expanduser().absolute()
        return cls(str(local.parent)), local.name

    @classmethod
    def from_config(cls, cfg: "OnegenConfig") -> "Storage":
        s3 = cfg.storage.s3
        return cls(cfg.storage.root, endpoint_url=s3.endpoint_url, region=s3.region, profile=s3.profile)

    def __repr__(self) -> str:
        return f"Storage({self.root_uri!r})"

    def check_access(self) -> None:
        """Fail now, naming the root and the fix, if this root cannot be used: for S3, no credentials, an
        unreachable endpoint or a missing bucket; locally, a folder that cannot be created. Commands call it
        before they start Ray (onegen.preflight), so a build never fails minutes in on a typo'd bucket."""
        if self.scheme == "s3":
            self._credential_source()
            self._check_bucket("")
            return
        try:
            Path(self._root_path).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"{self.root_uri}: cannot create the storage root ({err.strerror or err}); point "
                               "storage.root at a folder you can write, or an s3:// URI") from None

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
    def region(self) -> str | None:
        """The S3 region used for this root (None locally): the `region` argument, else the bucket's own region
        (asked once), else the session's (AWS_DEFAULT_REGION / profile), else us-east-1."""
        return self._region if self.scheme == "s3" else None

    @property
    def filesystem(self) -> pafs.FileSystem:
        """pyarrow filesystem for this root (S3: same endpoint, region and credentials as the boto3 writes).

        S3 with expiring credentials that pyarrow cannot resolve itself: the filesystem carries the keys of the
        moment, and a new one is built once boto3 has refreshed them; take `filesystem` again for each job rather
        than keeping one for hours."""
        if self.scheme != "s3":
            return self._lazy("filesystem", pafs.LocalFileSystem)
        keys = self._filesystem_keys()
        with self._lock:
            built = self._cache.get("s3_filesystem")
            if built is None or built[0] != keys:  # first use, or boto3 has refreshed the credentials
                built = (keys, self._make_s3_filesystem(keys))
                self._cache["s3_filesystem"] = built
            return built[1]

    def _make_s3_filesystem(self, keys: tuple[str, str, str | None] | None) -> pafs.S3FileSystem:
        kwargs: dict[str, Any] = {"region": self._region, "connect_timeout": _CONNECT_TIMEOUT_S,
                                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_MAX_ATTEMPTS)}
        endpoint = self.endpoint_url
        if endpoint:
            scheme, _, hostport = endpoint.partition("://")
            kwargs.update(endpoint_override=hostport.rstrip("/"), scheme=scheme)
        if keys is not None:
            access_key, secret_key, token = keys
            kwargs.update(access_key=access_key, secret_key=secret_key, session_token=token)
        return pafs.S3FileSystem(**kwargs)

    # --- reading ------------------------------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        with self.open_input_stream(rel) as stream:
            return stream.read()

    def open_input_stream(self, rel: str) -> pafs.NativeFile:
        """A pyarrow input stream (a context manager with .read()); FileNotFoundError names the URI."""
        rel = _clean_rel(rel)
        try:
            return self.filesystem.open_input_stream(self.fs_path(rel))
        except StorageError:
            raise  # already names the URI and the fix (unreachable endpoint, credentials)
        except OSError as err:
            self._check_bucket(rel)
            raise self._translate(err, rel) from None

    def exists(self, rel: str) -> bool:
        """True if `rel` is a file or a folder (an S3 prefix with objects under it)."""
        return self._info(rel).type != pafs.FileType.NotFound

    def stat(self, rel: str) -> tuple[int, str]:
        """(size in bytes, version) of the file `rel`; the version is its modification time in ns as a string (local
        mtime_ns; S3: LastModified, whole seconds, as pyarrow reports it, in a listing too: pyarrow exposes no ETag).
        Data sources key inputs by path + size + version. FileNotFoundError if `rel` is not a file."""
        info = self._info(_clean_rel(rel))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(errno.ENOENT, f"{self.uri(rel)}: no such file")
        return int(info.size), str(info.mtime_ns)

    def list(self, prefix: str = "", recursive: bool = False) -> list[str]:
        """Sorted paths relative to the root under folder `prefix`. Recursive: files only. Not recursive: the
        immediate children, folders with a trailing '/'. A missing prefix lists as empty. Temp files, claims and
        onegen's own `_onegen/` folder are never listed."""
        base = self.fs_path(prefix)
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
        except OSError as err:
            raise self._translate(err, prefix) from None
        if not infos:
            self._check_bucket(prefix)
        out = []
        for info in infos:
            rel = posixpath.relpath(info.path, self._root_path)
            if _is_internal(rel):
                continue
            if info.type == pafs.FileType.Directory:
                if not recursive:
                    out.append(rel + "/")
            elif info.type == pafs.FileType.File:
                out.append(rel)
        return sorted(out)

    # --- writing ------------------------------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes | Iterable[bytes]) -> None:
        """Write atomically, replacing any existing file. `data` may be an iterable of chunks, streamed (S3: a
        multipart upload once it exceeds one part): if it raises, nothing is written (the target keeps its
        previous content or stays absent)."""
        rel = _clean_rel(rel)
        if self.scheme == "s3":
            if isinstance(data, (bytes, bytearray, memoryview)):
                self._s3_put(rel, bytes(data))
            else:
                self._s3_write_stream(rel, iter(data))
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
            self._abort_stale_uploads(rel)
            try:
                self._s3_client.upload_file(os.fspath(local_path), self._bucket, self._key(rel))
            except Exception as err:  # boto3 raises S3UploadFailedError wrapping ClientError
                raise self._translate(err, rel) from None
            return
        with open(local_path, "rb") as src:
            self.write_bytes(rel, iter(functools.partial(src.read, 1 << 20), b""))

    def put_if_absent(self, rel: str, data: bytes | Iterable[bytes]) -> bool:
        """Create `rel` only if it does not exist. True: this call created it. False: it existed (or a racing
        writer won); the existing content is untouched. The content appears complete or not at all (S3: an
        iterable is spooled first, in memory up to 8 MiB and then in a temp file, and sent in one PUT)."""
        rel = _clean_rel(rel)
        if self.scheme == "s3":
            return self._s3_put_if_absent(rel, data)
        target = Path(self.fs_path(rel))
        tmp = self._write_local_temp(target, data)
        try:
            os.link(tmp, target)  # atomic, and fails if the target exists: exactly one racing writer wins
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # File systems without hard links: an exclusive rename commits the complete file in one step too.
            if not _rename_noreplace(tmp, target):
                return False
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

    # --- internals: local -------------------------------------------------------------------------------------

    def _info(self, rel: str) -> pafs.FileInfo:
        try:
            return self.filesystem.get_file_info(self.fs_path(rel))
        except OSError as err:
            raise self._translate(err, rel) from None

    def _write_local_temp(self, target: Path, data: bytes | Iterable[bytes]) -> Path:
        """Write `data` to a fsynced temp file beside `target`; on any error remove it and re-raise."""
        target.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale_temps(target.parent)
        tmp = target.with_name(f".{target.name}{_TEMP_MARK}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
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

    # --- internals: S3 connection -----------------------------------------------------------------------------

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
        if self._region_arg:
            return self._region_arg
        with self._lock:
            if "bucket_region" not in self._cache:
                found = self._discover_bucket_region()
                if found is None:  # bucket not there (yet), or it would not say: ask again on the next build
                    return self._session.region_name or "us-east-1"
                self._cache["bucket_region"] = found
            return self._cache["bucket_region"]

    def _discover_bucket_region(self) -> str | None:
        """The bucket's region from HeadBucket's `x-amz-bucket-region` header, which S3 also sends with 301 and 403
        answers (a bucket in another region, or no permission to head it); None if the bucket is not there."""
        import botocore.exceptions

        # Any region will do to ask: S3 names the bucket's region in its answer (or redirects there).
        bootstrap = self._session.client("s3", endpoint_url=self.endpoint_url, config=self._client_config(),
                                         region_name=self._session.region_name or "us-east-1")
        try:
            headers = bootstrap.head_bucket(Bucket=self._bucket)["ResponseMetadata"]["HTTPHeaders"]
        except botocore.exceptions.ClientError as err:
            headers = err.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        except botocore.exceptions.BotoCoreError as err:  # unreachable endpoint, no credentials: say so now
            raise self._translate(err, "") from None
        return headers.get("x-amz-bucket-region") or None

    def _credential_source(self):
        """boto3's credentials object (refreshable ones refresh themselves); StorageError if there is none."""
        def resolve():
            creds = self._session.get_credentials()
            if creds is None:
                raise StorageError(f"{self.root_uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials (never in a config "
                                   "file)")
            return creds
        return self._lazy("credentials", resolve)

    def _filesystem_keys(self) -> tuple[str, str, str | None] | None:
        """The keys to build the pyarrow filesystem with, or None to let pyarrow resolve them itself.

        Expiring credentials (instance role, IRSA, credential_process, ...) must not be frozen into a filesystem:
        they die within the hour and a long build fails. Where boto3 found them through a chain that the AWS C++
        SDK inside pyarrow resolves the same way from the same environment, and no explicit profile was given
        (pyarrow cannot be told one), pyarrow gets no keys: its default chain refreshes by itself, also inside a
        filesystem pickled into Ray Data workers, and no keys travel in that pickle. Otherwise pyarrow gets the
        keys of the moment; `get_frozen_credentials()` refreshes them when near expiry, and `filesystem` builds a
        new pyarrow filesystem whenever they differ from the ones the cached one was built with."""
        creds = self._credential_source()
        if self._pyarrow_resolves(creds):
            return None
        frozen = creds.get_frozen_credentials()
        return frozen.access_key, frozen.secret_key, frozen.token

    def _pyarrow_resolves(self, creds) -> bool:
        """Whether pyarrow's own AWS SDK chain finds the same refreshable credentials boto3 found."""
        from botocore.credentials import RefreshableCredentials

        if self._profile or not isinstance(creds, RefreshableCredentials) or creds.method not in _SDK_CHAIN_METHODS:
            return False
        # Both chains try environment keys first, then diverge on one point: beside static keys of the same
        # profile, boto3 prefers web identity and credential_process, the C++ SDK the static keys.
        try:
            scoped = self._session._session.get_scoped_config()
        except Exception:
            return False
        return "aws_access_key_id" not in scoped

    @property
    def _s3_client(self):
        # Built once: the client signs every request with the session's credentials object, which refreshes
        # itself when it nears expiry, so it never holds stale keys and needs no rebuilding.
        return self._lazy("s3_client", self._make_s3_client)

    def _make_s3_client(self):
        self._credential_source()  # fail early with the helpful message
        return self._session.client("s3", endpoint_url=self.endpoint_url, region_name=self._region,
                                    config=self._client_config())

    def _client_config(self):
        from botocore.config import Config

        s3 = {"addressing_style": "path"} if self.endpoint_url else {}  # custom endpoints (MinIO, moto, Ceph)
        return Config(s3=s3, connect_timeout=_CONNECT_TIMEOUT_S,
                      retries={"total_max_attempts": _MAX_ATTEMPTS, "mode": "standard"})

    # --- internals: S3 writes ---------------------------------------------------------------------------------

    def _s3_put(self, rel: str, body: bytes | IO[bytes], *, if_none_match: bool = False) -> bool:
        """One PUT of `body` (bytes or a seekable file). With if_none_match: False if the key exists."""
        import botocore.exceptions

        extra = {"IfNoneMatch": "*"} if if_none_match else {}
        for attempt in range(5):
            if not isinstance(body, bytes):
                body.seek(0)
            try:
                self._s3_client.put_object(Bucket=self._bucket, Key=self._key(rel), Body=body, **extra)
                return True
            except botocore.exceptions.ClientError as err:
                code = _error_code(err)
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

    def _s3_call(self, rel: str, method: str, **kwargs) -> dict:
        """A boto3 S3 call whose errors name the URI."""
        try:
            return getattr(self._s3_client, method)(Bucket=self._bucket, **kwargs)
        except Exception as err:
            raise self._translate(err, rel) from None

    def _s3_write_stream(self, rel: str, chunks: Iterator[bytes]) -> None:
        """Stream chunks to S3 holding one part in memory: a body that fits one part is one PUT, a longer one a
        multipart upload. The producer raising, or any failure, aborts the upload: nothing becomes visible."""
        part = _next_part(chunks, _PART_SIZE)
        if len(part) < _PART_SIZE:  # the producer is done: the whole body is this one part
            self._s3_put(rel, bytes(part))
            return
        self._abort_stale_uploads(rel)
        key = self._key(rel)
        upload_id = self._s3_call(rel, "create_multipart_upload", Key=key)["UploadId"]
        try:
            parts = []
            while part:
                answer = self._s3_call(rel, "upload_part", Key=key, UploadId=upload_id, PartNumber=len(parts) + 1,
                                       Body=part)
                # Keep the part checksums botocore added (UploadPart's Checksum* fields): S3 wants them again at
                # completion.
                parts.append({"PartNumber": len(parts) + 1, "ETag": answer["ETag"],
                              **{k: v for k, v in answer.items() if k.startswith("Checksum")}})
                del part  # free this part before gathering the next: one part in memory at a time
                part = _next_part(chunks, _PART_SIZE)
            self._s3_call(rel, "complete_multipart_upload", Key=key, UploadId=upload_id,
                          MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self._s3_client.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
            except Exception as abort_err:  # the upload stays invisible; the stale-upload sweep aborts it later
                log.warning("%s: could not abort multipart upload %s: %s", self.uri(rel), upload_id, abort_err)
            raise

    def _abort_stale_uploads(self, rel: str) -> None:
        """Abort multipart uploads of this key that crashed writers left incomplete (older than a day: a live
        writer's upload is younger): they are invisible but S3 bills their parts until aborted. Best effort: a
        policy without s3:ListBucketMultipartUploads must not stop the write (a bucket lifecycle rule
        AbortIncompleteMultipartUpload is the complete cure)."""
        key = self._key(rel)
        cutoff = dt.datetime.now(dt.timezone.utc) - _STALE_UPLOAD_AGE
        try:
            uploads = self._s3_client.list_multipart_uploads(Bucket=self._bucket, Prefix=key).get("Uploads", [])
            for upload in uploads:
                if upload["Key"] == key and upload["Initiated"] <= cutoff:
                    self._s3_client.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload["UploadId"])
        except Exception as err:
            log.warning("%s: could not clean up stale multipart uploads: %s", self.uri(rel), err)

    def _s3_put_if_absent(self, rel: str, data: bytes | Iterable[bytes]) -> bool:
        if isinstance(data, (bytes, bytearray, memoryview)):
            return self._s3_create(rel, bytes(data))
        # A create-if-absent is one PUT of the whole body: spool the chunks (in memory, then a temp file) first,
        # so a failing producer sends nothing.
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY) as spool:
            for chunk in data:
                spool.write(chunk)
            return self._s3_create(rel, spool)

    def _s3_create(self, rel: str, body: bytes | IO[bytes]) -> bool:
        if self._conditional_put_honoured():
            return self._s3_put(rel, body, if_none_match=True)
        return self._put_if_absent_by_claim(rel, body)

    def _conditional_put_honoured(self) -> bool:
        """Whether this store refuses a second `If-None-Match: *` PUT (AWS S3 does; some S3-compatible stores
        ignore the header and overwrite). Probed once per endpoint and bucket in this process."""
        where = (self.endpoint_url or "AWS S3", self._bucket)
        with _CONDITIONAL_PUT_LOCK:
            if where not in _CONDITIONAL_PUT:
                honoured = self._probe_conditional_put()
                if not honoured:
                    log.warning("S3 endpoint %s, bucket %s: the store ignores If-None-Match (a second conditional "
                                "PUT overwrote the probe object); put_if_absent uses a slower claim protocol "
                                "instead", *where)
                _CONDITIONAL_PUT[where] = honoured
            return _CONDITIONAL_PUT[where]

    def _probe_conditional_put(self) -> bool:
        import botocore.exceptions

        rel = f"{_RESERVED_DIR}/conditional-put-probe/{uuid.uuid4().hex}"
        try:
            if not self._s3_put(rel, b"", if_none_match=True):
                raise StorageError(f"{self.uri(rel)}: a fresh probe key already exists")
            return not self._s3_put(rel, b"", if_none_match=True)
        except StorageError as err:
            if "NotImplemented" in str(err):  # the store rejects the header outright: no conditional PUT either
                return False
            raise
        finally:
            try:
                self._s3_client.delete_object(Bucket=self._bucket, Key=self._key(rel))
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
                log.warning("%s: could not delete the conditional-put probe: %s", self.uri(rel), err)

    def _put_if_absent_by_claim(self, rel: str, body: bytes | IO[bytes]) -> bool:
        """put_if_absent for stores that ignore If-None-Match: writers claim the key before writing it.

        Each round: (a) the target exists -> False; (b) PUT our claim KEY.onegen-claim/ID; (c) LIST the claims,
        deleting those older than _CLAIM_STALE_AGE (by the store's clock, against our own claim). Only our claim:
        re-check the target is absent, PUT it, delete the claim -> True. Another live claim: delete ours, False if
        the target now exists, else back off randomly and go again (bounded).
        Why at most one writer PUTs the target, given strong read-after-write and list-after-write consistency:
        say A and B both saw only their own claims, and A's LIST came first. A's LIST missed B's claim, so it ran
        before B's claim PUT finished; B's LIST ran after that, so after A's claim PUT, and missed A's claim only
        because A had already deleted it. A deletes its claim only after its target PUT completed, or when it
        gives up the round without writing; so either A has not written, or B's re-check (after its LIST) finds
        A's target and B returns False. Stale claims: a writer stops using its claim half the stale age after
        making it, so a claim is judged stale only when its writer is done with it (unless one target PUT takes
        longer than that). Livelock (everyone keeps seeing someone else's claim) is broken by random backoff and
        bounded by _CLAIM_ATTEMPTS."""
        key = self._key(rel)
        claims = f"{key}{_CLAIM_MARK}/"
        for attempt in range(_CLAIM_ATTEMPTS):
            if self._s3_key_exists(rel, key):
                return False
            mine = claims + uuid.uuid4().hex
            claimed_at = time.monotonic()
            self._s3_call(rel, "put_object", Key=mine, Body=b"")
            try:
                if self._only_live_claim(rel, claims, mine):
                    if self._s3_key_exists(rel, key):
                        return False
                    if time.monotonic() - claimed_at < _CLAIM_STALE_AGE.total_seconds() / 2:
                        return self._s3_put(rel, body)
            finally:
                self._delete_claim(rel, mine)
            if self._s3_key_exists(rel, key):
                return False
            time.sleep(random.uniform(0, min(2.0, 0.05 * 2 ** attempt)))
        raise StorageError(f"{self.uri(rel)}: put_if_absent could not claim the key in {_CLAIM_ATTEMPTS} rounds "
                           "(other writers kept claiming it; this store ignores If-None-Match): retry later")

    def _only_live_claim(self, rel: str, claims: str, mine: str) -> bool:
        """True if `mine` is the only live claim under `claims`; deletes stale claims of dead writers."""
        listed = []
        for page in self._s3_client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=claims):
            listed.extend(page.get("Contents", []))
        own = next((obj["LastModified"] for obj in listed if obj["Key"] == mine), None)
        if own is None:  # our own claim not listed: not the consistency we rely on; do not write
            return False
        live = False
        for obj in listed:
            if obj["Key"] == mine:
                continue
            if own - obj["LastModified"] > _CLAIM_STALE_AGE:
                self._delete_claim(rel, obj["Key"])
            else:
                live = True
        return not live

    def _delete_claim(self, rel: str, claim: str) -> None:
        # Best effort: a claim left behind only delays other writers until it is stale (after a win they see the
        # target and return False), so a failed delete must not turn a win into an error.
        try:
            self._s3_client.delete_object(Bucket=self._bucket, Key=claim)
        except Exception as err:
            log.warning("%s: could not delete put_if_absent claim %s: %s", self.uri(rel), claim, err)

    def _s3_key_exists(self, rel: str, key: str) -> bool:
        import botocore.exceptions

        try:
            self._s3_client.head_object(Bucket=self._bucket, Key=key)
            return True
        except botocore.exceptions.ClientError as err:
            if _error_code(err) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._translate(err, rel) from None
        except Exception as err:
            raise self._translate(err, rel) from None

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


@contextlib.contextmanager
def folder_into_place(target: str | Path) -> Iterator[Path]:
    """A scratch folder beside the local folder `target` (which must not exist yet) to write into, renamed to
    `target` when the block ends without an error: a reader sees `target` absent or complete, never half written."""
    target = Path(target)
    scratch = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        yield scratch
        os.rename(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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


def _is_internal(rel: str) -> bool:
    """Temp files, S3 claims and the `_onegen/` folder: onegen's own, hidden from listings."""
    parts = rel.split("/")
    return (_TEMP_MARK in parts[-1] or any(_CLAIM_MARK in part for part in parts)
            or parts[0] == _RESERVED_DIR)


def _error_code(err: BaseException) -> str:
    return (getattr(err, "response", None) or {}).get("Error", {}).get("Code", "")


def _next_part(chunks: Iterator[bytes], size: int) -> bytearray:
    """The next `size` bytes or more (whole chunks) from `chunks`; shorter only once `chunks` is exhausted."""
    part = bytearray()
    for chunk in chunks:
        part += chunk
        if len(part) >= size:
            break
    return part


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


# --- local put_if_absent without hard links: renameat2(RENAME_NOREPLACE) -------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@functools.lru_cache(maxsize=None)
def _libc_renameat2():
    """libc's renameat2 (Linux, glibc >= 2.28), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` unless `dst` exists, in one atomic step: True if renamed, False if `dst` existed.
    The complete, fsynced file appears at once, so a crash leaves either no target or the whole one."""
    fn = _libc_renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), os.fspath(dst))
    raise StorageError(f"{dst}: put_if_absent cannot create the file atomically: this file system supports neither "
                       "hard links nor renameat2 RENAME_NOREPLACE; put the storage root on a local disk or on S3")


# --- local temp files: named after their writer, swept when the writer is gone -------------------------------------

@functools.lru_cache(maxsize=None)
def _host_tag() -> str:
    """This host's name as it appears in temp file names (no separators, bounded length)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40] or "host"


def _temp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) from a temp file name `.NAME.onegen-tmp-HOST-PID-ID`, or None if it is not one."""
    _, mark, owner = name.rpartition(_TEMP_MARK)
    parts = owner.rsplit("-", 2) if mark else []  # the host tag has no '-', so the split is unambiguous
    if len(parts) == 3 and parts[0] and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _sweep_stale_temps(folder: Path) -> None:
    """Remove temp files in `folder` that crashed writers left: a dead pid on this host, or untouched for a day
    (any host: pids of other hosts cannot be checked). At most every _TEMP_SWEEP_INTERVAL_S per folder and process,
    so writing many files into one big folder does not list it each time."""
    now = time.monotonic()
    with _LAST_SWEEP_LOCK:
        last = _LAST_SWEEP.get(str(folder))
        if last is not None and now - last < _TEMP_SWEEP_INTERVAL_S:
            return
        _LAST_SWEEP[str(folder)] = now
    cutoff = time.time() - _STALE_TEMP_AGE_S
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if _TEMP_MARK not in entry.name:
            continue
        owner = _temp_owner(entry.name)
        try:
            dead = owner is not None and owner[0] == _host_tag() and not _pid_alive(owner[1])
            if dead or entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
        except FileNotFoundError:
            pass  # its writer finished, or another sweeper was first
        except OSError as err:
            log.debug("could not remove stale temp file %s: %s", entry.path, err)
