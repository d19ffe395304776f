"""URL lists as a data source: parquet / csv / tsv / txt files whose rows are image URLs, downloaded by img2dataset.

    specs = plan_url_partitions(["s3://bucket/lists/part-0.parquet"], partition_size=1000)
    records, stats = read_url_partition(specs[0], timeout_s=10, retries=2)

Downloading is img2dataset's (`img2dataset.download`, its public API): it already does what a web crawl needs and a
hand-written downloader would get subtly wrong — a thread pool with per-request timeouts and retries, the
X-Robots-Tag opt-out (`noai`, `noimageai`, ...), optional resizing, a sha256 of every file, and a status per row with
counts per error message. Each partition runs as one img2dataset job in a temporary folder (one img2dataset shard),
whose per-row parquet and `*_stats.json` are read back, cross-checked, and deleted.

Records (one per input row, in row order, failed rows included so the build can count them):

    {"index": 3,                                   # row position within the partition
     "input_id": "https://example.com/cat.jpg",    # the URL as listed
     "views": [{"data": b"...", "name": url}],     # the downloaded file; [] when the row was dropped
     "captions": {"original": "a cat"},            # the caption column when it is a non-empty string, else {}
     "meta": {"url": url, <every other column, JSON-safe>, "img2dataset": {"status", "error_message", "sha256",
              "width", "height", "original_width", "original_height", "exif" (resize modes)}},
     "dropped": None | "failed_to_download" | "failed_to_resize",
     "error": None | img2dataset's error message}

resize_mode "no" (the default) keeps the original file bytes: img2dataset neither decodes nor re-encodes, so an HTML
page or a truncated JPEG served with 200 counts as a success here and is refused later by the build's decode stage,
which treats every source alike (EXIF orientation, colour modes, size limits). The other modes decode and resize in
img2dataset (lossless PNG out); undecodable bodies then become `failed_to_resize`.

Rows img2dataset is never asked about: blank URLs (missing, NaN, whitespace) and schemes other than http/https (a
list from the web must not read `file:///` paths on a worker). They are `failed_to_download` with our own message.

img2dataset starts a spawn-context process pool and a logger process even with processes_count=1. Spawned children
re-import the caller's `__main__` script, so a script that calls this needs the usual `if __name__ == "__main__":`
guard (pytest, `python -m onegen`, the `onegen` command and Ray workers are fine).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import errno
import json
import math
import multiprocessing
import os
import posixpath
import shutil
import sys
import tarfile
import tempfile
import threading
import types
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

URL_TABLE_FORMATS = ("parquet", "csv", "tsv", "txt")
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
DOWNLOAD_SCHEMES = ("http", "https")

_ROW_COL = "onegen_row"  # our row position, carried through img2dataset so its rows map back without key arithmetic
_PNG_COMPRESSION = 1  # cv2's fastest level: the build decodes these PNGs again right away
_EMPTY_URL = "empty URL (no value in the url column)"

# img2dataset children take TMPDIR from this process's environment, and the signal/children handling below is
# process-wide too: one download at a time per process.
_DOWNLOAD_LOCK = threading.Lock()


# --- url tables ----------------------------------------------------------------------------------------------------

def url_table_format(path: str) -> str:
    """"parquet" | "csv" | "tsv" | "txt" from the file name; ValueError naming the file otherwise."""
    name = posixpath.basename(str(path)).lower()
    for fmt in URL_TABLE_FORMATS:
        if name.endswith(f".{fmt}"):
            return fmt
    raise ValueError(f"{path}: unknown url list format; name the file *.parquet, *.csv, *.tsv or *.txt "
                     "(txt: one URL per line, no header)")


def read_url_table(path: str, *, url_col: str = "url", caption_col: str | None = "caption") -> "pa.Table":
    """Rows of a url list: .parquet / .csv / .tsv / .txt (one URL per line, no header; the column is `url_col`).

    `path` is a local path, file:// or s3:// URI. Every column is kept (extra columns become record metadata); in
    csv/tsv the url and caption columns are read as text and empty cells as missing. Raises ValueError naming the
    file and the fix when the extension is unknown or the url column is missing (with the columns it has)."""
    import pyarrow as pa

    fmt = url_table_format(path)
    from onegen.storage import Storage

    storage, name = Storage.for_file(path)
    data = storage.read_bytes(name)
    if fmt == "txt":
        # Read by lines, not as a one-column CSV: URLs may hold commas and quotes. Blank lines carry no row.
        lines = [line.strip() for line in data.decode("utf-8-sig").splitlines()]
        return pa.table({url_col: pa.array([line for line in lines if line], pa.string())})
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(pa.BufferReader(data))
        else:
            import pyarrow.csv as pacsv

            text_cols = {col: pa.string() for col in (url_col, caption_col) if col}
            table = pacsv.read_csv(
                pa.BufferReader(data),
                parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                convert_options=pacsv.ConvertOptions(column_types=text_cols, strings_can_be_null=True))
    except pa.ArrowInvalid as err:
        raise ValueError(f"{path}: cannot read it as {fmt} ({err}): fix the file, or name it by its format") from None
    _check_url_column(path, table.column_names, url_col)
    return table


def expand_url_lists(paths: list[str]) -> list[str]:
    """Url list files in order: a path with a list extension is itself; any other path is a folder (or s3://
    prefix) whose url lists, recursively and sorted, take its place. FileNotFoundError naming a folder without any."""
    files: list[str] = []
    for path in paths:
        try:
            url_table_format(path)
            files.append(str(path))
            continue
        except ValueError:
            pass
        from onegen.storage import Storage

        storage = Storage(path)
        found = [storage.uri(rel) for rel in storage.list(recursive=True)
                 if rel.lower().endswith(tuple(f".{fmt}" for fmt in URL_TABLE_FORMATS))]
        if not found:
            raise FileNotFoundError(errno.ENOENT, f"{path}: not a url list (*.parquet, *.csv, *.tsv, *.txt) and no "
                                                  "folder holding any; point the source at a list or a folder of them")
        files += found
    return files


def plan_url_partitions(files: list[str], partition_size: int, *, url_col: str = "url",
                        caption_col: str | None = "caption",
                        skip: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """The build's plan for url lists: files in the given order, each cut into consecutive row ranges of
    `partition_size` rows, as JSON-serialisable dicts [{"file": f, "start": i, "stop": j}, ...]. Files without
    rows give no partitions. Parquet row counts come from the footer (the rows are not read).

    With `skip` (an incremental build) the url column is read, rows whose URL `skip` names are left out, and the
    rest is cut into partitions of `partition_size` rows given as runs: {"file": f, "rows": [[start, stop], ...]}."""
    if isinstance(files, str):
        raise TypeError(f"files must be a list of url list paths, got the string {files!r}: wrap it in a list")
    if int(partition_size) < 1:
        raise ValueError(f"partition_size must be at least 1 row, got {partition_size}")
    step = int(partition_size)
    plan: list[dict[str, Any]] = []
    for file in files:
        if skip is not None:
            urls = _url_column(str(file), url_col=url_col, caption_col=caption_col)
            kept = [row for row, url in enumerate(urls) if not (url and url.strip() and skip(url))]
            plan += [{"file": str(file), "rows": _runs(kept[first:first + step])}
                     for first in range(0, len(kept), step)]
            continue
        rows = _count_rows(str(file), url_col=url_col, caption_col=caption_col)
        plan += [{"file": str(file), "start": start, "stop": min(start + step, rows)} for start in range(0, rows, step)]
    return plan


def _url_column(path: str, *, url_col: str, caption_col: str | None) -> list[str | None]:
    """The url column as text (parquet: that column only), for an incremental plan."""
    if url_table_format(path) == "parquet":
        with _parquet_file(path) as parquet:
            _check_url_column(path, parquet.schema_arrow.names, url_col)
            column = parquet.read(columns=[url_col]).column(0)
    else:
        column = read_url_table(path, url_col=url_col, caption_col=caption_col).column(url_col)
    return [None if value is None else str(value) for value in column.to_pylist()]


def _runs(rows: list[int]) -> list[list[int]]:
    """Sorted row numbers as [start, stop) runs: a plan of mostly consecutive rows stays small."""
    runs: list[list[int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1][1] = row + 1
        else:
            runs.append([row, row + 1])
    return runs


def partition_rows(spec: dict[str, Any]) -> tuple[int, int, list[int] | None]:
    """(first row, row after the last, the rows when the spec lists runs else None) of a partition spec."""
    if "rows" not in spec:
        return int(spec["start"]), int(spec["stop"]), None
    rows = [row for start, stop in spec["rows"] for row in range(int(start), int(stop))]
    if not rows or rows != sorted(set(rows)):
        raise ValueError(f"{spec.get('file')}: bad partition rows {spec['rows']}: expected sorted, disjoint runs")
    return rows[0], rows[-1] + 1, rows


def _count_rows(path: str, *, url_col: str, caption_col: str | None) -> int:
    if url_table_format(path) == "parquet":
        with _parquet_file(path) as parquet:
            _check_url_column(path, parquet.schema_arrow.names, url_col)
            return parquet.metadata.num_rows
    return read_url_table(path, url_col=url_col, caption_col=caption_col).num_rows


def _read_rows(path: str, start: int, stop: int, *, url_col: str, caption_col: str | None) -> "pa.Table":
    """Rows [start, stop) of a url list; parquet reads only the row groups that hold them (lists can be GBs)."""
    if url_table_format(path) != "parquet":
        table = read_url_table(path, url_col=url_col, caption_col=caption_col)
        if stop > table.num_rows:
            _too_short(path, stop, table.num_rows)
        return table.slice(start, stop - start)
    with _parquet_file(path) as parquet:
        _check_url_column(path, parquet.schema_arrow.names, url_col)
        if stop > parquet.metadata.num_rows:
            _too_short(path, stop, parquet.metadata.num_rows)
        groups, first_row, offset = [], 0, 0
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if offset < stop and offset + rows > start:
                first_row = offset if not groups else first_row
                groups.append(group)
            offset += rows
        if not groups:
            return parquet.schema_arrow.empty_table()
        table = parquet.read_row_groups(groups)
    return table.slice(start - first_row, stop - start)


def _too_short(path: str, stop: int, total: int) -> NoReturn:
    raise RuntimeError(f"{path}: the plan asks for rows up to {stop} but the file has {total}: it changed after "
                       "planning; url lists must stay fixed during a build (plan again for new lists)")


@contextlib.contextmanager
def _parquet_file(path: str) -> Iterator["pq.ParquetFile"]:
    """The url list as a pyarrow ParquetFile: footer and row groups read on demand (locally or ranged S3 GETs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from onegen.storage import Storage

    storage, name = Storage.for_file(path)
    try:
        handle = storage.filesystem.open_input_file(storage.fs_path(name))
    except OSError:
        if not storage.exists(name):
            raise FileNotFoundError(errno.ENOENT, f"{path}: no such url list file") from None
        raise
    with handle:
        try:
            parquet = pq.ParquetFile(handle)
        except pa.ArrowInvalid as err:
            raise ValueError(f"{path}: not a readable parquet file ({err}): rewrite it, or name it by its format") from None
        yield parquet


def _check_url_column(path: str, columns: list[str], url_col: str) -> None:
    if url_col not in columns:
        raise ValueError(f"{path}: no url column {url_col!r}; its columns are {list(columns)}: set the source's "
                         "url_col to the column that holds the image URLs")


# --- downloading ---------------------------------------------------------------------------------------------------

def read_url_partition(spec: dict[str, Any], *, url_col: str = "url", caption_col: str | None = "caption",
                       timeout_s: float = 10, retries: int = 0, threads: int = 8, user_agent_token: str | None = None,
                       resize_mode: str = "no", image_size: int = 512,
                       work_dir: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Download rows [spec["start"], spec["stop"]) of spec["file"] with img2dataset; (records, stats).

    records: one per row in row order (see the module docstring). stats: {"count", "successes",
    "failed_to_download", "failed_to_resize", "errors": {message: rows}} — img2dataset's `*_stats.json` plus the
    rows it was not asked about (blank URLs, other schemes); RuntimeError if its stats and its per-row parquet
    disagree. img2dataset works in a temporary folder under `work_dir` (default: the temp dir), always removed."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}")
    if resize_mode != "no" and int(image_size) < 1:
        raise ValueError(f"image_size must be a positive number of pixels for resize_mode {resize_mode!r}")
    file = str(spec["file"])
    start, stop, listed = partition_rows(spec)
    if not 0 <= start <= stop:
        raise ValueError(f"{file}: bad partition rows {start}..{stop}: expected 0 <= start <= stop")
    table = _read_rows(file, start, stop, url_col=url_col, caption_col=caption_col)
    if listed is not None:  # an incremental plan: the rows no earlier build holds
        table = table.take([row - start for row in listed])
    rows = table.to_pylist()

    records = [_record(index, row, url_col, caption_col) for index, row in enumerate(rows)]
    refused: dict[int, str] = {}
    to_download: list[tuple[int, str]] = []
    for record in records:
        url = record["input_id"]
        reason = _refusal(url)
        if reason:
            refused[record["index"]] = reason
        else:
            to_download.append((record["index"], url))

    stats: dict[str, Any] = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0,
                             "errors": {}}
    if to_download:
        results, stats = _download(to_download, where=f"{file} rows {start}..{stop}", timeout_s=timeout_s,
                                   retries=retries, threads=threads, user_agent_token=user_agent_token,
                                   resize_mode=resize_mode, image_size=image_size, work_dir=work_dir)
        for index, (meta, data) in results.items():
            record = records[index]
            record["meta"]["img2dataset"] = meta
            if meta["status"] == "success":
                record["views"] = [{"data": data, "name": record["input_id"]}]
            else:
                record["dropped"], record["error"] = meta["status"], meta.get("error_message")
    errors = Counter(stats["errors"])
    for index, reason in refused.items():
        records[index].update(dropped="failed_to_download", error=reason)  # no "img2dataset" meta: it never saw them
        errors[reason] += 1
    stats.update(count=len(records), failed_to_download=stats["failed_to_download"] + len(refused),
                 errors=dict(errors))
    return records, stats


def _record(index: int, row: dict[str, Any], url_col: str, caption_col: str | None) -> dict[str, Any]:
    url = row.get(url_col)
    url = "" if url is None or (isinstance(url, float) and math.isnan(url)) else str(url)
    caption = row.get(caption_col) if caption_col else None
    captions = {"original": caption} if isinstance(caption, str) and caption.strip() else {}
    extras = {key: _json_safe(value) for key, value in row.items() if key not in (url_col, caption_col)}
    return {"index": index, "input_id": url, "views": [], "captions": captions, "meta": {"url": url, **extras},
            "dropped": None, "error": None}


def _refusal(url: str) -> str | None:
    """Why a URL is not handed to img2dataset, or None. urllib would answer "unknown url type: ''" (blank) or
    "unknown url type: 'None'" (missing), and it would happily read file:// and ftp:// URLs."""
    if not url.strip():
        return _EMPTY_URL
    scheme = urlsplit(url.strip()).scheme.lower()
    if scheme not in DOWNLOAD_SCHEMES:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        return f"unsupported URL ({shown}): only http:// and https:// URLs are downloaded"
    return None


def _json_safe(value: Any) -> Any:
    """A url-list cell as a JSON value: NaN/inf -> None, dates -> ISO text, bytes -> base64, numpy -> Python."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if hasattr(value, "item"):  # numpy scalars
        return _json_safe(value.item())
    return str(value)


def _download(items: list[tuple[int, str]], *, where: str, timeout_s: float, retries: int, threads: int,
              user_agent_token: str | None, resize_mode: str, image_size: int,
              work_dir: str | None) -> tuple[dict[int, tuple[dict[str, Any], bytes | None]], dict[str, Any]]:
    """Run one img2dataset job over (index, url) pairs: ({index: (img2dataset meta, file bytes | None)}, stats)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="onegen-urls-", dir=work_dir))
    try:
        url_list = temp / "urls.parquet"
        pq.write_table(pa.table({"url": pa.array([url for _, url in items], pa.string()),
                                 _ROW_COL: pa.array([index for index, _ in items], pa.int64())}), url_list)
        output = temp / "img2dataset"
        options: dict[str, Any] = {"disable_all_reencoding": True, "extract_exif": False}
        if resize_mode != "no":
            # EXIF is lost in the re-encoded PNG, so keep img2dataset's reading of it as metadata.
            options = {"image_size": int(image_size), "resize_only_if_bigger": True, "encode_format": "png",
                       "encode_quality": _PNG_COMPRESSION, "extract_exif": True}
        _run_img2dataset(
            temp, url_list=str(url_list), input_format="parquet", url_col="url", caption_col=None,
            # Only our row column: extra columns stay on our side, where names img2dataset reserves (key, sha256,
            # width, ... as in DataComp lists) cannot make it refuse the job and values keep their types.
            save_additional_columns=[_ROW_COL], output_folder=str(output), output_format="webdataset",
            processes_count=1, thread_count=int(threads), distributor="multiprocessing", enable_wandb=False,
            timeout=timeout_s, retries=int(retries), resize_mode=resize_mode, user_agent_token=user_agent_token,
            number_sample_per_shard=len(items), compute_hash="sha256",
            # "extend" in an empty folder skips nothing. Not "overwrite": img2dataset creates its _tmp inside the
            # output folder first and "overwrite" then deletes it, and the job retries writing for ~10 minutes.
            incremental_mode="extend", **options)
        return _read_output(output, items, where)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _run_img2dataset(temp: Path, **kwargs: Any) -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for updates at import
    import img2dataset
    from img2dataset.logger import LoggerProcess

    with _DOWNLOAD_LOCK:
        _disarm_sigint_handler()
        before = set(multiprocessing.active_children())
        old_tmpdir = os.environ.get("TMPDIR")
        # wandb, imported by every img2dataset child, makes two TemporaryDirectory folders at import that a
        # terminated pool worker never removes: point the children's TMPDIR into our folder, which we delete.
        # (This process's own two are removed at its exit, unless it is killed, as Ray kills idle workers.)
        os.environ["TMPDIR"] = str(temp)
        try:
            img2dataset.download(**kwargs)
        finally:
            if old_tmpdir is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = old_tmpdir
            # A download that raises after starting its logger process leaves that process running until this one
            # exits (a long-lived Ray worker: for hours): stop the ones this call started.
            for child in set(multiprocessing.active_children()) - before:
                if isinstance(child, LoggerProcess):
                    child.terminate()
                    child.join(timeout=5)
                    if child.is_alive():
                        child.kill()
                        child.join(timeout=5)


def _disarm_sigint_handler() -> None:
    """img2dataset.download installs a SIGINT handler that deletes its folder and calls sys.exit(0), and never
    removes it: afterwards a Ctrl-C anywhere in this process would exit it with status 0 mid-work, and from a
    non-main thread the call raises ValueError. Its module's only use of `signal` is that call, so hand it a
    stand-in; we delete the folder ourselves and a KeyboardInterrupt stays a KeyboardInterrupt."""
    module = sys.modules["img2dataset.main"]
    if not isinstance(module.signal, types.SimpleNamespace):
        import signal

        module.signal = types.SimpleNamespace(SIGINT=signal.SIGINT, signal=lambda signum, handler: None)


def _read_output(output: Path, items: list[tuple[int, str]], where: str):
    """img2dataset's per-row parquet + tar + stats of every shard: ({index: (meta, bytes|None)}, stats)."""
    import pyarrow.parquet as pq

    expected = {index for index, _ in items}
    results: dict[int, tuple[dict[str, Any], bytes | None]] = {}
    files_by_key: dict[str, bytes] = {}
    totals = Counter()
    stat_errors: Counter[str] = Counter()
    stats_files = sorted(output.glob("*_stats.json"))
    for stats_file in stats_files:
        shard_stats = json.loads(stats_file.read_text())
        for name in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[name] += int(shard_stats[name])
        stat_errors.update({message: count for message, count in shard_stats["status_dict"].items()
                            if message != "success"})
        shard = stats_file.name[: -len("_stats.json")]
        tar_path = output / f"{shard}.tar"
        if tar_path.exists():
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if ext not in ("json", "txt") and member.isfile():
                        files_by_key[key] = tar.extractfile(member).read()
        for row in pq.read_table(output / f"{shard}.parquet").to_pylist():
            index = int(row.pop(_ROW_COL))
            key = row.pop("key")
            row.pop("url", None)
            meta = {name: _json_safe(value) for name, value in row.items()}
            if index in results:
                raise RuntimeError(f"{where}: img2dataset reported row {index} twice")
            results[index] = (meta, files_by_key.get(key) if meta.get("status") == "success" else None)

    row_status = Counter(meta["status"] for meta, _ in results.values())
    row_errors = Counter(meta["error_message"] for meta, _ in results.values() if meta["status"] != "success")
    missing = sorted(expected - set(results))
    problems = []
    if not stats_files:
        problems.append("no *_stats.json: the img2dataset shard failed (see its output above)")
    if missing:
        problems.append(f"rows {missing[:10]} missing from its per-row parquet")
    if totals["count"] != len(items):
        problems.append(f"stats count {totals['count']} for {len(items)} rows sent")
    for status, stat_name in (("success", "successes"), ("failed_to_download", "failed_to_download"),
                              ("failed_to_resize", "failed_to_resize")):
        if row_status[status] != totals[stat_name]:
            problems.append(f"{stat_name}: {totals[stat_name]} in stats, {row_status[status]} in the parquet")
    if row_errors != stat_errors:
        problems.append(f"errors differ: stats {dict(stat_errors)}, parquet {dict(row_errors)}")
    no_bytes = [index for index, (meta, data) in results.items() if meta["status"] == "success" and data is None]
    if no_bytes:
        problems.append(f"rows {sorted(no_bytes)[:10]} are successes without an image in the tar")
    if problems:
        raise RuntimeError(f"{where}: img2dataset's output does not add up: {'; '.join(problems)}. "
                           "Rerun the partition; if it persists, check the img2dataset version (tested: 1.47.0)")
    stats = {"count": totals["count"], "successes": totals["successes"],
             "failed_to_download": totals["failed_to_download"], "failed_to_resize": totals["failed_to_resize"],
             "errors": dict(stat_errors)}
    return results, stats
