"""Storage round trips on a local path, a file:// URI and S3 (a real moto server on 127.0.0.1), atomic writes and
create-if-absent races."""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import logging
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import onegen.storage as storage_mod
from onegen.config import load_config
from onegen.storage import Storage, StorageError

@pytest.fixture(params=["local", "file-uri", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(tmp_path / "root")
    if request.param == "file-uri":
        return Storage(f"file://{tmp_path}/root")
    endpoint = request.getfixturevalue("moto_endpoint")
    request.getfixturevalue("aws_env")
    return Storage(f"s3://{request.getfixturevalue('make_bucket')()}/prefix", endpoint_url=endpoint)


def test_write_read_overwrite_exists(storage: Storage):
    assert not storage.exists("a/b.bin")
    storage.write_bytes("a/b.bin", b"one")
    assert storage.read_bytes("a/b.bin") == b"one"
    storage.write_bytes("a/b.bin", [b"tw", b"o"])  # chunks
    assert storage.read_bytes("a/b.bin") == b"two"
    assert storage.exists("a/b.bin") and storage.exists("a")
    with storage.open_input_stream("a/b.bin") as stream:
        assert stream.read() == b"two"


def test_missing_file_raises_file_not_found_naming_the_uri(storage: Storage):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes("nope.bin")
    assert storage.uri("nope.bin") in str(pytest.raises(FileNotFoundError, storage.read_bytes, "nope.bin").value)


def test_list_recursive_and_immediate_children(storage: Storage):
    for rel in ("x/1.txt", "x/sub/2.txt", "y.txt"):
        storage.write_bytes(rel, b".")
    assert storage.list(recursive=True) == ["x/1.txt", "x/sub/2.txt", "y.txt"]
    assert storage.list() == ["x/", "y.txt"]
    assert storage.list("x") == ["x/1.txt", "x/sub/"]
    assert storage.list("x", recursive=True) == ["x/1.txt", "x/sub/2.txt"]
    assert storage.list("missing") == []


def test_delete_file_and_folder(storage: Storage):
    storage.write_bytes("d/1", b"1")
    storage.write_bytes("d/2", b"2")
    assert storage.delete("d/1") is True
    assert storage.delete("d/1") is False
    with pytest.raises(FileNotFoundError):
        storage.delete("d/1", missing_ok=False)
    with pytest.raises(IsADirectoryError):
        storage.delete("d")
    assert storage.delete("d", recursive=True)
    assert storage.list(recursive=True) == []


def test_pyarrow_writes_through_filesystem_land_where_storage_reads(storage: Storage):
    # pyarrow gets `filesystem` + `fs_path()` (Ray Data: `uri()`) and must hit the same objects.
    table = pa.table({"x": [1, 2, 3]})
    storage.filesystem.create_dir(storage.fs_path("t"))  # a no-op on S3; pyarrow does not create local parents
    pq.write_table(table, storage.fs_path("t/part-0.parquet"), filesystem=storage.filesystem)
    assert storage.list("t") == ["t/part-0.parquet"]
    assert pq.read_table(storage.fs_path("t/part-0.parquet"), filesystem=storage.filesystem).equals(table)
    assert len(storage.read_bytes("t/part-0.parquet")) > 0


def test_storage_pickles_for_ray_tasks(storage: Storage):
    storage.write_bytes("k", b"v")  # clients and locks exist now; a copy rebuilds its own
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.uri("k") == storage.uri("k") and copy.read_bytes("k") == b"v"
    copy.write_bytes("k2", b"w")
    assert storage.read_bytes("k2") == b"w"


def test_uri_shapes(tmp_path: Path):
    assert Storage(tmp_path).uri("a/b") == f"{tmp_path}/a/b"
    assert Storage(f"file://{tmp_path}").uri("a") == f"{tmp_path}/a"
    s3 = Storage("s3://bucket/pre/")
    assert s3.uri("a/b") == "s3://bucket/pre/a/b" and s3.fs_path("a/b") == "bucket/pre/a/b"
    assert s3.path == "bucket/pre" and s3.uri() == "s3://bucket/pre"


def test_paths_stay_under_the_root(tmp_path: Path):
    storage = Storage(tmp_path)
    for bad in ("../escape", "/abs", "a/../../b", ""):
        with pytest.raises(ValueError):
            storage.write_bytes(bad, b"x")
    with pytest.raises(StorageError, match="unsupported scheme"):
        Storage("gs://bucket/x")


def failing_chunks():
    yield b"partial data "
    raise RuntimeError("producer crashed")


def test_failed_write_leaves_no_partial_file(storage: Storage):
    with pytest.raises(RuntimeError, match="producer crashed"):
        storage.write_bytes("new.bin", failing_chunks())
    assert not storage.exists("new.bin")
    storage.write_bytes("old.bin", b"complete")
    with pytest.raises(RuntimeError):
        storage.write_bytes("old.bin", failing_chunks())
    assert storage.read_bytes("old.bin") == b"complete"
    assert storage.list() == ["old.bin"]
    if storage.scheme == "file":  # no temp file left behind either
        assert sorted(os.listdir(storage.path)) == ["old.bin"]


KILLED_WRITER = """
import errno, os, sys, time
from onegen.storage import Storage
if sys.argv[3] == "no-hard-links":
    def refuse_hard_links(src, dst, **_):
        raise PermissionError(errno.EPERM, "Operation not permitted", src)
    os.link = refuse_hard_links
def chunks():
    yield b"x" * 1000
    print("writing", flush=True)
    time.sleep(60)
    yield b"never"
getattr(Storage(sys.argv[1]), sys.argv[2])("victim.bin", chunks())
"""


def kill_writer_mid_write(storage: Storage, method: str, *, hard_links: bool = True) -> None:
    """Run `storage.<method>("victim.bin", chunks)` in a subprocess and SIGKILL it while it is writing."""
    args = [sys.executable, "-c", KILLED_WRITER, storage.root_uri, method, "hard-links" if hard_links else
            "no-hard-links"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_writer_killed_mid_write_leaves_no_target(tmp_path: Path):
    storage = Storage(tmp_path / "root")
    storage.write_bytes("victim.bin", b"old")
    kill_writer_mid_write(storage, "write_bytes")
    assert storage.read_bytes("victim.bin") == b"old"
    assert storage.list() == ["victim.bin"]  # the orphaned temp file is not listed


def test_put_if_absent_creates_once_and_never_overwrites(storage: Storage):
    assert storage.put_if_absent("_COMMITTED", b"first") is True
    assert storage.put_if_absent("_COMMITTED", b"second") is False
    assert storage.read_bytes("_COMMITTED") == b"first"
    storage.write_bytes("plain", b"x")
    assert storage.put_if_absent("plain", b"y") is False
    assert storage.read_bytes("plain") == b"x"


def test_put_if_absent_race_has_exactly_one_winner(storage: Storage):
    writers = 8
    barrier = threading.Barrier(writers)
    results: dict[int, bool] = {}

    def write(i: int) -> None:
        barrier.wait(timeout=30)
        results[i] = storage.put_if_absent("marker", f"writer-{i}".encode())

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [i for i, won in results.items() if won]
    assert len(results) == writers and len(winners) == 1
    assert storage.read_bytes("marker") == f"writer-{winners[0]}".encode()


def test_put_if_absent_failed_producer_creates_nothing(storage: Storage):
    with pytest.raises(RuntimeError):
        storage.put_if_absent("marker", failing_chunks())
    assert not storage.exists("marker")
    assert storage.put_if_absent("marker", b"ok") is True


def test_write_file_copies_a_local_file(storage: Storage, tmp_path: Path):
    src = tmp_path / "shard.tar"
    src.write_bytes(os.urandom(3 << 20))
    storage.write_file("shards/00000.tar", src)
    assert storage.read_bytes("shards/00000.tar") == src.read_bytes()


# --- S3 configuration: endpoint and credentials from the standard AWS environment ---------------------------------

def test_endpoint_from_aws_endpoint_url_env(moto_endpoint, aws_env, make_bucket):
    bucket = make_bucket()
    aws_env.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    storage = Storage(f"s3://{bucket}")
    storage.write_bytes("k", b"v")
    assert storage.endpoint_url == moto_endpoint and storage.read_bytes("k") == b"v"


def test_credentials_from_a_profile_in_the_shared_credentials_file(moto_endpoint, aws_env, make_bucket,
                                                                   tmp_path: Path):
    bucket = make_bucket()
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    (tmp_path / "aws-credentials").write_text("[onegen-test]\naws_access_key_id = k1\naws_secret_access_key = s1\n")
    aws_env.setenv("AWS_PROFILE", "onegen-test")
    storage = Storage(f"s3://{bucket}/p", endpoint_url=moto_endpoint)
    storage.write_bytes("k", b"v")  # boto3 path
    assert storage.list() == ["k"] and storage.read_bytes("k") == b"v"  # pyarrow path


def test_storage_from_config(moto_endpoint, aws_env, make_bucket, tmp_path: Path):
    bucket = make_bucket()
    cfg = load_config(None, ["run.name=t", f"storage.root=s3://{bucket}/data",
                             f"storage.s3.endpoint_url={moto_endpoint}", "storage.s3.region=us-east-1"])
    storage = Storage.from_config(cfg)
    storage.write_bytes("k", b"v")
    assert storage.uri("k") == f"s3://{bucket}/data/k" and storage.read_bytes("k") == b"v"


def test_missing_bucket_is_named_with_the_fix(moto_endpoint, aws_env):
    storage = Storage("s3://onegen-no-such-bucket/x", endpoint_url=moto_endpoint)
    for action in (lambda: storage.write_bytes("k", b"v"), lambda: storage.read_bytes("k"), storage.list):
        with pytest.raises(StorageError, match="bucket 'onegen-no-such-bucket' does not exist: create it"):
            action()


def test_missing_credentials_say_where_they_come_from(moto_endpoint, aws_env):
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    storage = Storage("s3://any-bucket/x", endpoint_url=moto_endpoint)
    with pytest.raises(StorageError, match=r"s3://any-bucket/x: no AWS credentials found: set AWS_ACCESS_KEY_ID"):
        storage.write_bytes("k", b"v")


def test_unknown_profile_is_named(aws_env):
    with pytest.raises(StorageError, match="AWS profile 'nobody' not found"):
        Storage("s3://b/x", profile="nobody").filesystem


def fs_options(fs) -> dict:
    """The settings a pyarrow S3FileSystem pickles (what a Ray Data worker receives)."""
    return fs.__reduce__()[1][0]


def test_unreachable_endpoint_is_named(aws_env, free_tcp_port):
    endpoint = f"http://127.0.0.1:{free_tcp_port()}"
    named = f"cannot reach the S3 endpoint {re.escape(endpoint)}"
    with pytest.raises(StorageError, match=named):  # no region given: the bucket-region lookup fails first
        Storage("s3://b/x", endpoint_url=endpoint).read_bytes("k")
    storage = Storage("s3://b/x", endpoint_url=endpoint, region="us-east-1")
    for action in (lambda: storage.read_bytes("k"), storage.list, lambda: storage.write_bytes("k", b"v")):
        with pytest.raises(StorageError, match=named):
            action()  # pyarrow, pyarrow, boto3
    # What keeps that bounded when an endpoint black-holes connections instead of refusing them: both clients get a
    # short connect timeout and few attempts, not the SDK defaults (boto3: 60 s and 5 attempts; pyarrow: none).
    config = storage._s3_client.meta.config
    assert 0 < config.connect_timeout <= 10 and config.retries["total_max_attempts"] <= 5
    assert 0 < fs_options(storage.filesystem)["connect_timeout"] <= 10


def race(writers: int, write: Callable[[int], bool]) -> dict[int, bool]:
    """Start `writers` threads at once on write(i); their results by i."""
    barrier = threading.Barrier(writers)
    results: dict[int, bool] = {}

    def run(i: int) -> None:
        barrier.wait(timeout=30)
        results[i] = write(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == writers, "a writer failed or hung"
    return results


def numbered_chunks(mib: int):
    """`mib` chunks of 1 MiB, each filled with its own byte value (so a reordered or lost chunk shows)."""
    for i in range(mib):
        yield bytes([i % 256]) * (1 << 20)


# --- credentials that expire and refresh (instance roles, IRSA, SSO, credential_process) ----------------------------

CREDENTIAL_PROCESS = r"""
import datetime, fcntl, json, sys
with open(sys.argv[1], "a+") as counter:  # one character per call: the n-th call hands out key n
    fcntl.flock(counter, fcntl.LOCK_EX)
    counter.seek(0)
    n = len(counter.read()) + 1
    counter.write("x")
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)
print(json.dumps({"Version": 1, "AccessKeyId": f"AKIDREFRESH{n:06d}", "SecretAccessKey": f"secret{n}",
                  "SessionToken": f"token{n}", "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}))
"""


class RefreshingProfile(NamedTuple):
    bucket: str  # made while the test keys were still in the environment (the fixture's boto3 needs them)
    calls: Path  # one character per credential_process call


@pytest.fixture
def refreshing_profile(aws_env, make_bucket, tmp_path: Path) -> RefreshingProfile:
    """Profile 'refreshing': credential_process credentials that expire in a minute, inside botocore's mandatory
    refresh window, so every use refreshes them and hands out a new key; no other credentials around."""
    bucket = make_bucket()
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    script, counter = tmp_path / "credential_process.py", tmp_path / "credential-calls"
    script.write_text(CREDENTIAL_PROCESS)
    command = " ".join(shlex.quote(str(part)) for part in (sys.executable, "-S", script, counter))
    Path(os.environ["AWS_CONFIG_FILE"]).write_text(f"[profile refreshing]\ncredential_process = {command}\n")
    return RefreshingProfile(bucket, counter)


def signing_key(request) -> str:
    return re.search(r"Credential=([^/]+)/", request.headers["Authorization"].decode()).group(1)


def test_refreshed_credentials_reach_the_filesystem_and_the_client(refreshing_profile, moto_endpoint):
    # An explicit profile: pyarrow cannot be told it, so it gets the keys of the moment, rebuilt when they change.
    storage = Storage(f"s3://{refreshing_profile.bucket}/p", endpoint_url=moto_endpoint, profile="refreshing")
    signed: list[str] = []
    storage._s3_client.meta.events.register("before-send.s3", lambda request, **_: signed.append(signing_key(request)))
    storage.write_bytes("k", b"one")
    first = fs_options(storage.filesystem)["access_key"]
    storage.write_bytes("k", b"two")
    assert storage.read_bytes("k") == b"two" and storage.list() == ["k"]
    later = fs_options(storage.filesystem)["access_key"]
    # The old code froze `first` into the one filesystem it ever built: expired after an hour on real S3.
    assert first.startswith("AKIDREFRESH") and later > first
    assert len(signed) >= 2 and signed == sorted(set(signed))  # every boto3 request signed with a fresh key


def test_refreshable_credentials_of_the_sdk_chain_are_left_to_pyarrow(refreshing_profile, aws_env, moto_endpoint):
    # The same process credentials through AWS_PROFILE: pyarrow's own AWS SDK resolves and refreshes them.
    aws_env.setenv("AWS_PROFILE", "refreshing")
    storage = Storage(f"s3://{refreshing_profile.bucket}/p", endpoint_url=moto_endpoint)
    storage.write_bytes("k", b"v")
    fs = storage.filesystem
    assert not fs_options(fs)["access_key"] and b"AKIDREFRESH" not in pickle.dumps(fs)  # no keys to expire in Ray
    calls = len(refreshing_profile.calls.read_text())
    assert fs.get_file_info(storage.fs_path("k")).size == 1
    assert len(refreshing_profile.calls.read_text()) > calls  # pyarrow ran the credential process itself
    with pickle.loads(pickle.dumps(fs)).open_input_stream(storage.fs_path("k")) as stream:
        assert stream.read() == b"v"
    assert storage.read_bytes("k") == b"v" and storage.filesystem is fs  # nothing to rebuild


def test_static_keys_beside_a_credential_process_keep_pyarrow_on_boto3s_keys(refreshing_profile, aws_env,
                                                                              moto_endpoint):
    # boto3 prefers the process to static keys of the same profile, pyarrow's chain the keys: hand pyarrow boto3's.
    config = Path(os.environ["AWS_CONFIG_FILE"])
    config.write_text(config.read_text() + "aws_access_key_id = STATICKEY\naws_secret_access_key = s\n")
    aws_env.setenv("AWS_PROFILE", "refreshing")
    storage = Storage(f"s3://{refreshing_profile.bucket}/p", endpoint_url=moto_endpoint)
    assert fs_options(storage.filesystem)["access_key"].startswith("AKIDREFRESH")
    storage.write_bytes("k", b"v")
    assert storage.read_bytes("k") == b"v"


# --- local put_if_absent where hard links are refused ----------------------------------------------------------------

def refuse_hard_links(src, dst, **_):
    raise PermissionError(errno.EPERM, "Operation not permitted", os.fspath(src))


SIZE_WATCHER = """
import os, sys
target, stop = sys.argv[1], sys.argv[2]
sizes = set()
print("watching", flush=True)
while not os.path.exists(stop):
    try:
        sizes.add(os.stat(target).st_size)
    except FileNotFoundError:
        pass
print(" ".join(map(str, sorted(sizes))))
"""


def test_put_if_absent_without_hard_links_commits_complete_files_atomically(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(os, "link", refuse_hard_links)  # like a file system without hard links
    storage = Storage(tmp_path / "root")
    size = 16 << 20  # the old O_EXCL-then-copy fallback needs milliseconds to fill that: the watcher sees it
    stop = tmp_path / "stop-watching"
    # A reader in another process (no shared GIL) polls the marker: it must never see a short one.
    watcher = subprocess.Popen([sys.executable, "-c", SIZE_WATCHER, storage.fs_path("marker"), str(stop)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().strip() == "watching"
        results = race(8, lambda i: storage.put_if_absent("marker", bytes([65 + i]) * size))
    finally:
        stop.touch()
        sizes_seen = watcher.communicate(timeout=30)[0].split()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert storage.read_bytes("marker") == bytes([65 + winners[0]]) * size
    assert sizes_seen == [str(size)]
    assert sorted(os.listdir(storage.path)) == ["marker"]  # the losers' temp files are gone


def test_put_if_absent_writer_killed_without_hard_links_leaves_no_marker(tmp_path: Path):
    storage = Storage(tmp_path / "root")
    kill_writer_mid_write(storage, "put_if_absent", hard_links=False)
    assert not storage.exists("victim.bin") and storage.list() == []
    assert storage.put_if_absent("victim.bin", b"ok") is True
    assert sorted(os.listdir(storage.path)) == ["victim.bin"]  # and the dead writer's temp file was swept


def test_put_if_absent_refuses_a_file_system_without_links_or_exclusive_rename(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(os, "link", refuse_hard_links)

    def renameat2_unsupported(*_args) -> int:  # what libc answers where the file system lacks RENAME_NOREPLACE
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(storage_mod, "_libc_renameat2", lambda: renameat2_unsupported)
    storage = Storage(tmp_path / "root")
    with pytest.raises(StorageError, match="supports neither hard links nor renameat2 RENAME_NOREPLACE") as err:
        storage.put_if_absent("marker", b"x")
    assert storage.fs_path("marker") in str(err.value) and "local disk or on S3" in str(err.value)
    assert os.listdir(storage.path) == []


# --- S3 stores that ignore If-None-Match -----------------------------------------------------------------------------

def ignore_if_none_match(storage: Storage) -> None:
    """Make this Storage's boto3 client drop If-None-Match: a store that ignores the header, on the real moto."""
    def strip(request, **_):
        if "If-None-Match" in request.headers:
            del request.headers["If-None-Match"]

    storage._s3_client.meta.events.register("before-sign.s3.PutObject", strip)


def bucket_keys(storage: Storage, bucket: str) -> list[str]:
    return sorted(obj["Key"] for obj in storage._s3_client.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_conditional_put_probe_tells_honouring_and_ignoring_stores_apart(moto_endpoint, aws_env, make_bucket,
                                                                         caplog):
    honest_bucket, ignoring_bucket = make_bucket(), make_bucket()
    honest = Storage(f"s3://{honest_bucket}/p", endpoint_url=moto_endpoint)
    assert honest._conditional_put_honoured() is True
    ignoring = Storage(f"s3://{ignoring_bucket}/p", endpoint_url=moto_endpoint)
    ignore_if_none_match(ignoring)
    with caplog.at_level(logging.WARNING, logger="onegen.storage"):
        assert ignoring._conditional_put_honoured() is False
        assert ignoring._conditional_put_honoured() is False  # probed once per store
    warnings = [record.getMessage() for record in caplog.records if "ignores If-None-Match" in record.getMessage()]
    assert len(warnings) == 1 and moto_endpoint in warnings[0] and ignoring_bucket in warnings[0]
    assert bucket_keys(honest, honest_bucket) == [] and bucket_keys(ignoring, ignoring_bucket) == []  # probes gone


def test_store_ignoring_if_none_match_still_has_exactly_one_winner(moto_endpoint, aws_env, make_bucket):
    bucket = make_bucket()
    storage = Storage(f"s3://{bucket}/p", endpoint_url=moto_endpoint)
    ignore_if_none_match(storage)
    results = race(8, lambda i: storage.put_if_absent("marker", f"writer-{i}".encode()))
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert storage.read_bytes("marker") == f"writer-{winners[0]}".encode()
    assert storage.put_if_absent("marker", numbered_chunks(1)) is False
    assert storage.read_bytes("marker") == f"writer-{winners[0]}".encode()
    assert bucket_keys(storage, bucket) == ["p/marker"]  # no claims left behind
    assert storage.list() == ["marker"]


def test_conditional_put_conflict_409_is_retried(moto_endpoint, aws_env, make_bucket):
    from botocore.awsrequest import AWSResponse

    class Body:
        def stream(self, **_):
            yield (b"<Error><Code>ConditionalRequestConflict</Code>"
                   b"<Message>A conflicting conditional operation is in progress</Message></Error>")

    storage = Storage(f"s3://{make_bucket()}/p", endpoint_url=moto_endpoint)
    assert storage._conditional_put_honoured()  # probe first: the 409 below is for the real write
    conflicts = []

    def conflict_once(request, **_):  # what S3 answers while another conditional write to the key is in flight
        if "If-None-Match" in request.headers and not conflicts:
            conflicts.append(request.url)
            return AWSResponse(request.url, 409, {}, Body())
        return None

    storage._s3_client.meta.events.register("before-send.s3.PutObject", conflict_once)
    assert storage.put_if_absent("marker", b"x") is True and len(conflicts) == 1
    assert storage.read_bytes("marker") == b"x"
    assert storage.put_if_absent("marker", b"y") is False


# --- streaming writes ------------------------------------------------------------------------------------------------

def test_streamed_write_of_12_mib_round_trips(storage: Storage):
    expected = b"".join(numbered_chunks(12))
    storage.write_bytes("big.bin", numbered_chunks(12))  # S3: a multipart upload
    assert storage.read_bytes("big.bin") == expected
    assert storage.put_if_absent("marker.bin", numbered_chunks(12)) is True  # S3: spooled, one conditional PUT
    assert storage.read_bytes("marker.bin") == expected
    assert storage.list() == ["big.bin", "marker.bin"]


def test_streamed_s3_write_that_fails_keeps_the_old_object_and_no_upload(moto_endpoint, aws_env, make_bucket):
    bucket = make_bucket()
    storage = Storage(f"s3://{bucket}/p", endpoint_url=moto_endpoint)
    storage.write_bytes("big.bin", b"old")
    parts_sent = []
    storage._s3_client.meta.events.register("after-call.s3.UploadPart", lambda **_: parts_sent.append(1))

    def crashing_producer():
        yield from numbered_chunks(12)
        raise RuntimeError("producer crashed")

    with pytest.raises(RuntimeError, match="producer crashed"):
        storage.write_bytes("big.bin", crashing_producer())
    assert parts_sent  # the upload had started
    assert storage.read_bytes("big.bin") == b"old"
    assert storage._s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


STREAMING_WRITER = """
import sys, tracemalloc
from onegen.storage import Storage
def chunks(mib):
    for i in range(mib):
        yield bytes([i % 256]) * (1 << 20)
storage = Storage(sys.argv[1], endpoint_url=sys.argv[2])
storage.write_bytes("warm-up", b"x")  # clients built before measuring
tracemalloc.start()
storage.write_bytes("stream.bin", chunks(40))
write_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.reset_peak()
storage.put_if_absent("spooled.bin", chunks(40))
print(write_peak, tracemalloc.get_traced_memory()[1])
"""


def test_streamed_s3_writes_do_not_hold_the_whole_body(moto_endpoint, aws_env, make_bucket):
    # In a subprocess: the moto server in this process keeps the uploaded bytes, which would count as ours.
    bucket = make_bucket()
    storage = Storage(f"s3://{bucket}/p", endpoint_url=moto_endpoint)
    out = subprocess.run([sys.executable, "-c", STREAMING_WRITER, storage.root_uri, moto_endpoint],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    write_peak, spool_peak = map(int, out.stdout.split())
    body = 40 << 20
    assert write_peak < body / 2 and spool_peak < body / 2, (write_peak, spool_peak)
    expected = b"".join(numbered_chunks(40))
    for key in ("stream.bin", "spooled.bin"):  # boto3 reads 40 MiB from moto much faster than pyarrow
        assert storage._s3_client.get_object(Bucket=bucket, Key=f"p/{key}")["Body"].read() == expected


# --- leftovers of crashed writers ------------------------------------------------------------------------------------

def test_writes_sweep_temp_files_of_dead_writers(tmp_path: Path):
    folder = tmp_path / "root" / "d"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = storage_mod._host_tag()

    def leftover(name: str, host: str, pid: int, age_s: float = 0) -> Path:
        path = folder / f".{name}.onegen-tmp-{host}-{pid}-0123456789ab"
        path.write_bytes(b"partial")
        os.utime(path, (time.time() - age_s,) * 2)
        return path

    dead_writer = leftover("a.bin", host, dead.pid)
    live_writer = leftover("a.bin", host, os.getpid())
    other_host_recent = leftover("b.bin", "elsewhere", dead.pid)
    other_host_old = leftover("e.bin", "elsewhere", dead.pid, age_s=2 * 86400)
    storage = Storage(tmp_path / "root")
    assert storage.list("d") == []  # temp files are never listed
    temp_names = []

    def chunks():
        yield b"new"
        temp_names.extend(name for name in os.listdir(folder) if name.startswith(".c.bin.onegen-tmp-"))

    storage.write_bytes("d/c.bin", chunks())
    assert temp_names == [name for name in temp_names if f".onegen-tmp-{host}-{os.getpid()}-" in name] != []
    assert not dead_writer.exists() and not other_host_old.exists()
    assert live_writer.exists() and other_host_recent.exists()
    assert storage.list("d") == ["d/c.bin"] and storage.list(recursive=True) == ["d/c.bin"]


def test_incomplete_uploads_of_the_key_left_for_a_day_are_aborted(moto_endpoint, aws_env, make_bucket, monkeypatch,
                                                                  tmp_path: Path):
    # moto reports every upload as initiated years ago; an age limit of 0 keeps the test off that quirk.
    monkeypatch.setattr(storage_mod, "_STALE_UPLOAD_AGE", dt.timedelta(0))
    bucket = make_bucket()
    storage = Storage(f"s3://{bucket}/p", endpoint_url=moto_endpoint)
    client = storage._s3_client
    for key in ("p/big.bin", "p/big.bin.v2", "p/shard.tar"):
        client.create_multipart_upload(Bucket=bucket, Key=key)
    storage.write_bytes("big.bin", numbered_chunks(9))
    src = tmp_path / "shard.tar"
    src.write_bytes(b"s" * 1000)
    storage.write_file("shard.tar", src)
    left = [upload["Key"] for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == ["p/big.bin.v2"]  # only uploads of the key being written are touched
    assert storage.read_bytes("big.bin") == b"".join(numbered_chunks(9))


# --- region: the bucket's own ----------------------------------------------------------------------------------------

def test_region_is_the_buckets_own(moto_endpoint, aws_env):
    import uuid

    import boto3

    bucket = f"onegen-eu-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    aws_env.delenv("AWS_DEFAULT_REGION")
    aws_env.delenv("AWS_REGION", raising=False)
    storage = Storage(f"s3://{bucket}/p", endpoint_url=moto_endpoint)
    storage.write_bytes("k", b"v")
    assert storage.read_bytes("k") == b"v" and storage.list() == ["k"]
    assert storage.region == "eu-west-1"
    assert storage._s3_client.meta.region_name == "eu-west-1" and storage.filesystem.region == "eu-west-1"
    aws_env.setenv("AWS_DEFAULT_REGION", "us-west-2")  # the bucket's region beats the session's
    assert Storage(f"s3://{bucket}/p", endpoint_url=moto_endpoint).filesystem.region == "eu-west-1"


def test_region_argument_wins_and_a_missing_bucket_falls_back(moto_endpoint, aws_env, free_tcp_port):
    offline = f"http://127.0.0.1:{free_tcp_port()}"
    assert Storage("s3://b/x", endpoint_url=offline, region="ap-south-1").region == "ap-south-1"  # not even asked
    aws_env.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert Storage("s3://onegen-no-such-bucket/x", endpoint_url=moto_endpoint).region == "us-west-2"
    aws_env.delenv("AWS_DEFAULT_REGION")
    assert Storage("s3://onegen-no-such-bucket/x", endpoint_url=moto_endpoint).region == "us-east-1"
    assert Storage("s3://onegen-no-such-bucket/x").uri("k") == "s3://onegen-no-such-bucket/x/k"


def test_for_file_gives_the_folder_storage_and_the_name(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage, name = Storage.for_file("lists/a.csv")
    assert (storage.root_uri, name) == (str(tmp_path / "lists"), "a.csv")
    storage, name = Storage.for_file("s3://bucket/dir/x.tar")
    assert (storage.uri(name), name) == ("s3://bucket/dir/x.tar", "x.tar")
    storage, name = Storage.for_file("s3://bucket/x.tar")
    assert storage.uri(name) == "s3://bucket/x.tar"
