"""The `urls` source: url lists in four formats, planned into partitions, downloaded by img2dataset from a local
server with real photographs and faults (tests/http_images.py).

One img2dataset run (module fixture `downloaded`, resize_mode "no") carries most assertions; one more checks a
resize mode from a non-main thread, and one runs inside a Ray task. Each img2dataset run takes ~8-10 s on 2 cores.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.sources.urls import plan_url_partitions, read_url_partition, read_url_table
from http_images import FAULTS, ImageServer, write_url_list

REPO = Path(__file__).resolve().parent.parent
EMPTY_URL = "empty URL (no value in the url column)"
BLANKS = ["", None, "   "]
REFUSED = "file:///etc/passwd"


@pytest.fixture(scope="module")
def server():
    with ImageServer(slow_s=3) as running:
        yield running


def _caption(i: int) -> str | None:
    return None if i % 4 == 3 else f"caption {i}, with \"quotes\" and a tab\there ✓"


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    """One partition over every manifest path plus blank and file:// rows, framed by rows outside the partition;
    downloaded with timeout 1 s and retries=1 from an empty cwd, with a private temp dir to catch leftovers."""
    root = tmp_path_factory.mktemp("downloaded")
    paths = list(server.manifest)
    inside = [server.url(path) for path in paths] + BLANKS + [REFUSED]
    urls = [server.url("/outside-before")] + inside + [server.url("/outside-after")]
    n = len(urls)
    extra = {"key": list(range(n)),  # a name img2dataset reserves for itself: must still come through
             "score": [math.nan if i == 2 else i / 10 for i in range(n)],
             "tag": [None if i == 1 else f"t{i}" for i in range(n)]}
    url_list = write_url_list(root / "list.parquet", urls, "parquet", captions=[_caption(i) for i in range(n)],
                              extra=extra)
    spec = {"file": str(url_list), "start": 1, "stop": n - 1}

    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset  # noqa: F401 - this process's own wandb temp folders are made now, before the check below

    cwd, work, private_tmp = root / "cwd", root / "work", root / "tmp"
    for folder in (cwd, work, private_tmp):
        folder.mkdir()
    sigint_before = signal.getsignal(signal.SIGINT)
    tmpdir_before = os.environ.get("TMPDIR")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(tempfile, "tempdir", str(private_tmp))
        patch.setenv("TMPDIR", str(private_tmp))
        started = time.monotonic()
        records, stats = read_url_partition(spec, timeout_s=1, retries=1, threads=4, work_dir=str(work))
        seconds = time.monotonic() - started
        tmpdir_inside = os.environ.get("TMPDIR")
    return {"records": records, "stats": stats, "paths": paths, "inside": inside, "extra": extra, "spec": spec,
            "cwd": cwd, "work": work, "private_tmp": private_tmp, "seconds": seconds,
            "sigint_kept": signal.getsignal(signal.SIGINT) is sigint_before,
            "tmpdir_kept": tmpdir_inside == str(private_tmp) and os.environ.get("TMPDIR") == tmpdir_before}


def _by_path(downloaded) -> dict[str, dict]:
    return dict(zip(downloaded["paths"], downloaded["records"]))


# --- downloading ---------------------------------------------------------------------------------------------------

def test_one_record_per_row_in_row_order(downloaded):
    records = downloaded["records"]
    assert [r["index"] for r in records] == list(range(len(downloaded["inside"])))
    assert [r["input_id"] for r in records] == [url or "" for url in downloaded["inside"]]
    assert downloaded["seconds"] < 60


def test_photos_come_through_byte_for_byte(server, downloaded):
    photos = [path for path, entry in server.manifest.items() if entry["kind"] == "photo"]
    assert len(photos) == 5
    for path in photos:
        record = _by_path(downloaded)[path]
        assert record["dropped"] is None and record["error"] is None
        [view] = record["views"]
        assert view["name"] == server.url(path)
        assert view["data"] == server.body(path)  # resize_mode "no": the served file, untouched
        meta = record["meta"]["img2dataset"]
        assert meta["status"] == "success"
        assert meta["sha256"] == hashlib.sha256(server.body(path)).hexdigest()
        assert meta["width"] is None  # img2dataset never decoded it


def test_faults_get_img2dataset_status_and_message(server, downloaded):
    by_path = _by_path(downloaded)
    for path, expected in FAULTS.items():
        record = by_path[path]
        if expected["status"] == "success":  # served with 200: bytes pass through, the decode stage refuses them
            assert record["dropped"] is None and record["views"][0]["data"] == server.body(path), path
        else:
            assert record["dropped"] == expected["status"], path
            assert record["views"] == []
            assert expected["error"] in record["error"], (path, record["error"])
            assert record["meta"]["img2dataset"]["error_message"] == record["error"]


def test_exact_fault_messages(downloaded):
    errors = {path: record["error"] for path, record in _by_path(downloaded).items() if record["error"]}
    assert errors == {
        "/status/404": "HTTP Error 404: Not Found",
        "/status/500": "HTTP Error 500: Internal Server Error",
        "/slow": "timed out",
        "/loop": "HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.\n"
                 "The last 30x error message was:\nFound",
        "/noai.png": "Use of image disallowed by X-Robots-Tag directive",
    }


def test_blank_and_non_http_urls_are_failed_downloads_without_asking(downloaded):
    records = downloaded["records"][len(downloaded["paths"]):]
    assert [r["dropped"] for r in records] == ["failed_to_download"] * 4
    assert [r["error"] for r in records[:3]] == [EMPTY_URL] * 3
    assert records[3]["error"] == "unsupported URL (scheme 'file'): only http:// and https:// URLs are downloaded"
    assert all(r["views"] == [] and "img2dataset" not in r["meta"] for r in records)


def test_stats_add_up_and_match_the_records(server, downloaded):
    stats, records = downloaded["stats"], downloaded["records"]
    photos = sum(entry["kind"] == "photo" for entry in server.manifest.values())
    passed_faults = sum(entry["status"] == "success" for entry in FAULTS.values())
    failed_faults = len(FAULTS) - passed_faults
    assert stats["count"] == len(records)
    assert stats["successes"] == photos + passed_faults == sum(r["dropped"] is None for r in records)
    assert stats["failed_to_download"] == failed_faults + len(BLANKS) + 1
    assert stats["failed_to_resize"] == 0
    assert stats["errors"] == dict(Counter(r["error"] for r in records if r["error"]))
    assert stats["errors"][EMPTY_URL] == 3
    json.dumps(stats)


def test_retries_and_partition_bounds_reach_the_server(server, downloaded):
    assert server.hits["/status/500"] == 2  # retries=1: asked twice
    assert server.hits["/photo/astronaut.png"] == 1  # a success is not retried
    assert server.hits["/outside-before"] == server.hits["/outside-after"] == 0  # rows outside [start, stop)


def test_captions_and_extra_columns_are_kept(downloaded):
    records, extra = downloaded["records"], downloaded["extra"]
    for record in records:
        row = record["index"] + downloaded["spec"]["start"]  # position in the file
        caption = _caption(row)
        assert record["captions"] == ({"original": caption} if caption else {})
        score = extra["score"][row]
        assert record["meta"]["url"] == record["input_id"]
        assert record["meta"]["key"] == row
        assert record["meta"]["score"] == (None if math.isnan(score) else score)  # NaN is no JSON
        assert record["meta"]["tag"] == extra["tag"][row]
        assert "caption" not in record["meta"]
    without_bytes = [{**r, "views": [{**v, "data": len(v["data"])} for v in r["views"]]} for r in records]
    json.dumps(without_bytes, allow_nan=False)


def test_nothing_left_behind(downloaded):
    assert list(downloaded["cwd"].iterdir()) == []  # img2dataset and wandb wrote nothing to the working dir
    assert list(downloaded["work"].iterdir()) == []  # the temporary img2dataset folder is gone
    assert list(downloaded["private_tmp"].iterdir()) == []  # children's wandb temp folders went with it
    assert downloaded["sigint_kept"]  # img2dataset's own SIGINT handler (sys.exit(0)) was not left installed
    assert downloaded["tmpdir_kept"]


def test_a_resize_mode_decodes_and_refuses_what_is_no_image(server, tmp_path):
    """Also from a non-main thread: img2dataset's signal.signal call would raise ValueError there."""
    paths = ["/photo/chelsea.jpg", "/photo/camera.png", "/notimage", "/truncated.jpg"]
    url_list = write_url_list(tmp_path / "list.csv", [server.url(p) for p in paths], "csv")
    spec = plan_url_partitions([str(url_list)], 100)[0]
    outcome: dict = {}

    def download():
        try:
            outcome["result"] = read_url_partition(spec, resize_mode="center_crop", image_size=64, timeout_s=5,
                                                   work_dir=str(tmp_path / "work"))
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = err

    worker = threading.Thread(target=download)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    records, stats = outcome["result"]
    for record in records[:2]:
        image = Image.open(io.BytesIO(record["views"][0]["data"]))
        assert (image.format, image.size) == ("PNG", (64, 64))
        meta = record["meta"]["img2dataset"]
        assert (meta["width"], meta["height"]) == (64, 64)
        source = Image.open(io.BytesIO(server.body(paths[record["index"]])))
        assert (meta["original_width"], meta["original_height"]) == source.size
        assert meta["sha256"] == hashlib.sha256(server.body(paths[record["index"]])).hexdigest()  # of the original
    for record, path in zip(records[2:], paths[2:]):
        assert record["dropped"] == FAULTS[path]["resized_status"] == "failed_to_resize"
        assert record["error"] == FAULTS[path]["resized_error"]
        assert record["views"] == []
    assert stats == {"count": 4, "successes": 2, "failed_to_download": 0, "failed_to_resize": 2,
                     "errors": {"Image decoding error": 2}}
    assert list((tmp_path / "work").iterdir()) == []


def test_only_refused_rows_need_no_img2dataset_and_parquet_reads_the_right_row_groups(tmp_path):
    urls = [f"ftp://example.invalid/{i}.jpg" for i in range(10)]
    table = pa.table({"url": urls, "n": list(range(10))})
    pq.write_table(table, tmp_path / "groups.parquet", row_group_size=3)
    plan = plan_url_partitions([str(tmp_path / "groups.parquet")], 4)
    assert [(p["start"], p["stop"]) for p in plan] == [(0, 4), (4, 8), (8, 10)]
    seen = []
    for spec in plan:
        records, stats = read_url_partition(spec)  # nothing to download: returns at once
        seen += [r["meta"]["n"] for r in records]
        assert [r["index"] for r in records] == list(range(spec["stop"] - spec["start"]))
        assert stats["failed_to_download"] == stats["count"] == len(records)
    assert seen == list(range(10))
    empty, stats = read_url_partition({"file": str(tmp_path / "groups.parquet"), "start": 10, "stop": 10})
    assert empty == [] and stats["count"] == 0


def test_a_list_that_shrank_after_planning_is_an_error(tmp_path):
    write_url_list(tmp_path / "list.txt", ["http://127.0.0.1:9/a.jpg"], "txt")
    with pytest.raises(RuntimeError, match=r"list\.txt.*rows up to 5 but the file has 1"):
        read_url_partition({"file": str(tmp_path / "list.txt"), "start": 0, "stop": 5})


# --- url tables and plans ------------------------------------------------------------------------------------------

TABLE_URLS = ["http://h/a.jpg", "http://h/b,c.png?x=1&y=\"2\"", None, "http://h/ü.jpg"]
TABLE_CAPTIONS = ["a, b", "tab\tand \"quotes\"", None, "ünïcode"]
TABLE_EXTRA = {"n": [1, 2, 3, 4], "label": ["x", None, "z", "w"]}


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_every_tabular_format_reads_the_same_rows(tmp_path, fmt):
    parquet = read_url_table(str(write_url_list(tmp_path / "l.parquet", TABLE_URLS, "parquet", TABLE_CAPTIONS,
                                                TABLE_EXTRA)))
    other = read_url_table(str(write_url_list(tmp_path / f"l.{fmt}", TABLE_URLS, fmt, TABLE_CAPTIONS, TABLE_EXTRA)))
    assert other.column_names == parquet.column_names == ["url", "caption", "n", "label"]
    assert other.to_pylist() == parquet.to_pylist()


def test_txt_is_one_url_per_line_in_the_url_column(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("http://h/a.jpg\n\n  http://h/b,\"c\".jpg  \r\nhttp://h/ü.jpg", encoding="utf-8")
    table = read_url_table(str(path), url_col="image_url")
    assert table.column_names == ["image_url"]
    assert table.column("image_url").to_pylist() == ["http://h/a.jpg", "http://h/b,\"c\".jpg", "http://h/ü.jpg"]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_missing_url_column_names_the_file_and_its_columns(tmp_path, fmt):
    path = write_url_list(tmp_path / f"l.{fmt}", TABLE_URLS, fmt, TABLE_CAPTIONS)
    with pytest.raises(ValueError) as raised:
        read_url_table(str(path), url_col="URL")
    message = str(raised.value)
    assert str(path) in message and "'URL'" in message and "['url', 'caption']" in message and "url_col" in message
    with pytest.raises(ValueError, match="no url column 'URL'"):
        plan_url_partitions([str(path)], 10, url_col="URL")


def test_an_unknown_extension_names_the_file_and_the_formats(tmp_path):
    (tmp_path / "l.json").write_text("[]")
    with pytest.raises(ValueError, match=r"l\.json: unknown url list format.*\*\.parquet, \*\.csv, \*\.tsv or \*\.txt"):
        read_url_table(str(tmp_path / "l.json"))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_missing_or_unreadable_files_are_named(tmp_path, fmt):
    with pytest.raises(FileNotFoundError, match=f"missing.{fmt}"):
        plan_url_partitions([str(tmp_path / f"missing.{fmt}")], 10)
    (tmp_path / f"bad.{fmt}").write_bytes(b"url,caption\nhttp://h/a.jpg,a,one too many\n")
    with pytest.raises(ValueError, match=f"bad.{fmt}: (not a readable parquet|cannot read it as csv)"):
        plan_url_partitions([str(tmp_path / f"bad.{fmt}")], 10)


def test_plan_cuts_files_in_order_into_fixed_row_ranges(tmp_path):
    a = str(write_url_list(tmp_path / "a.csv", [f"http://h/{i}" for i in range(7)], "csv"))
    empty = str(write_url_list(tmp_path / "empty.txt", [], "txt"))
    b = str(write_url_list(tmp_path / "b.parquet", [f"http://h/{i}" for i in range(5)], "parquet"))
    plan = plan_url_partitions([b, empty, a], 3)
    assert plan == [{"file": b, "start": 0, "stop": 3}, {"file": b, "start": 3, "stop": 5},
                    {"file": a, "start": 0, "stop": 3}, {"file": a, "start": 3, "stop": 6},
                    {"file": a, "start": 6, "stop": 7}]
    assert json.loads(json.dumps(plan)) == plan == plan_url_partitions([b, empty, a], 3)
    with pytest.raises(ValueError, match="partition_size"):
        plan_url_partitions([a], 0)


@pytest.mark.integration
def test_url_lists_on_s3(tmp_path, aws_env, moto_endpoint, make_bucket):
    from onegen.storage import Storage

    aws_env.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    bucket = make_bucket()
    local = write_url_list(tmp_path / "l.csv", TABLE_URLS, "csv", TABLE_CAPTIONS, TABLE_EXTRA)
    Storage(f"s3://{bucket}/lists").write_bytes("l.csv", local.read_bytes())
    Storage(f"s3://{bucket}").write_bytes("top.txt", b"http://h/a.jpg\nhttp://h/b.jpg\n")
    assert read_url_table(f"s3://{bucket}/lists/l.csv").to_pylist() == read_url_table(str(local)).to_pylist()
    assert plan_url_partitions([f"s3://{bucket}/top.txt"], 1)[1] == {"file": f"s3://{bucket}/top.txt", "start": 1,
                                                                    "stop": 2}
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/lists/missing.csv"):
        read_url_table(f"s3://{bucket}/lists/missing.csv")


# --- inside a Ray task ----------------------------------------------------------------------------------------------

RAY_DRIVER = r"""
import json, os, sys
import ray
from pipelines.sources.urls import read_url_partition

ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[2])

@ray.remote(num_cpus=1)
def download(spec):
    records, stats = read_url_partition(spec, timeout_s=5, threads=2)
    return {"pid": os.getpid(), "dropped": [r["dropped"] for r in records], "stats": stats,
            "sizes": [len(r["views"][0]["data"]) if r["views"] else 0 for r in records]}

result = ray.get(download.remote(json.loads(sys.argv[1])), timeout=240)
print("RESULT " + json.dumps(dict(result, driver=os.getpid())), flush=True)
ray.shutdown()
"""


@pytest.mark.integration
def test_it_works_inside_a_ray_task(server, tmp_path, stop_processes, session_pids):
    """img2dataset's spawn pool re-imports the Ray worker's main module in its children: it must still run."""
    paths = ["/photo/coffee.png", "/status/404"]
    url_list = write_url_list(tmp_path / "list.parquet", [server.url(p) for p in paths], "parquet")
    spec = {"file": str(url_list), "start": 0, "stop": 2}
    ray_tmp = tempfile.mkdtemp(prefix="ogu", dir="/tmp")  # short: Ray's socket paths must stay < 108 characters
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    cwd, worker_tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    worker_tmp.mkdir()
    # TMPDIR: the worker's own wandb import makes two temp folders that Ray's SIGKILL at shutdown leaves behind.
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO), TMPDIR=str(worker_tmp))
    proc = subprocess.Popen([sys.executable, "-c", RAY_DRIVER, json.dumps(spec), ray_tmp], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        left = stop_processes(session_pids(proc.pid), timeout_s=10)
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, output[-4000:]
    assert left == [], f"processes of the Ray driver still alive: {left}"
    [line] = [line for line in output.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert result["pid"] != result["driver"]  # it really ran in a Ray worker
    assert result["dropped"] == [None, "failed_to_download"]
    assert result["sizes"][0] == len(server.body("/photo/coffee.png"))
    assert result["stats"]["errors"] == {"HTTP Error 404: Not Found": 1}
    assert list(cwd.iterdir()) == []


def test_a_folder_of_url_lists_is_read_list_by_list_in_sorted_order(tmp_path):
    from pipelines.sources.urls import expand_url_lists

    (tmp_path / "lists" / "more").mkdir(parents=True)
    for name in ("b.csv", "a.parquet", "more/c.txt"):
        write_url_list(tmp_path / "lists" / name, ["http://127.0.0.1:9/x.png"], name.rsplit(".", 1)[1])
    (tmp_path / "lists" / "README.md").write_text("not a list")
    lists = expand_url_lists([str(tmp_path / "one.csv"), str(tmp_path / "lists")])
    assert [item.rsplit("/", 2)[-2:] for item in lists] == [[tmp_path.name, "one.csv"], ["lists", "a.parquet"],
                                                           ["lists", "b.csv"], ["more", "c.txt"]]
    assert [spec["file"] for spec in plan_url_partitions(lists[1:], 10)] == lists[1:]
    with pytest.raises(FileNotFoundError, match="no folder holding any"):
        expand_url_lists([str(tmp_path / "empty")])
