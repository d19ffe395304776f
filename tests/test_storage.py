"""Storage round trips on a local path, a file:// URI and S3 (a real moto server on 127.0.0.1), atomic writes and
create-if-absent races."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
import sys, time
from onegen.storage import Storage
def chunks():
    yield b"x" * 1000
    print("writing", flush=True)
    time.sleep(60)
    yield b"never"
Storage(sys.argv[1]).write_bytes("victim.bin", chunks())
"""


def test_writer_killed_mid_write_leaves_no_target(tmp_path: Path):
    storage = Storage(tmp_path / "root")
    storage.write_bytes("victim.bin", b"old")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, storage.root_uri], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
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


def test_unreachable_endpoint_is_named(aws_env, free_tcp_port):
    endpoint = f"http://127.0.0.1:{free_tcp_port()}"
    storage = Storage("s3://b/x", endpoint_url=endpoint)
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {endpoint}"):
        storage.read_bytes("k")
    assert time.monotonic() - start < 30
