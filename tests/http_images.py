"""A local HTTP server with real photographs and the faults a URL list meets in the wild, for download tests.

    with ImageServer(slow_s=3) as server:
        urls = [server.url(path) for path in server.manifest]
        ...  # server.body(path) is the exact bytes a good path serves; server.hits[path] counts requests

Photographs are scikit-image's bundled images (inside the wheel, nothing downloads), encoded with PIL once per
process. Faults: HTTP 404 and 500, a response slower than the client's timeout, a redirect loop, a photo that opts
out with `X-Robots-Tag: noai`, an HTML page served with 200, and a JPEG cut in half. `manifest` says for each path
what img2dataset makes of it (measured with img2dataset 1.47.0 on Python 3.11's urllib; tests/test_source_urls.py
checks every entry), so tests compare results against one table instead of restating them. Import it as
`from http_images import ImageServer` (pytest puts tests/ on sys.path, as for host_sync).

The server listens on 127.0.0.1 only, on a free port, in a background thread. Request threads are daemons and
`/slow` waits on an event that `stop()` sets, so stopping never waits for a slow answer to finish.
"""

from __future__ import annotations

import collections
import functools
import io
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

# skimage.data functions whose image ships inside the wheel (others, e.g. `brain`, `kidney`, download on first use).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")  # camera is grayscale
PHOTO_FORMATS = {"png": ("PNG", "image/png"), "jpg": ("JPEG", "image/jpeg")}
JPEG_QUALITY = 90

# Expected img2dataset outcome per fault path: status and a substring of error_message, first without re-encoding
# (resize_mode "no": bytes pass through unchecked), then when it decodes and resizes.
FAULTS: dict[str, dict[str, Any]] = {
    "/status/404": {"status": "failed_to_download", "error": "HTTP Error 404: Not Found",
                    "resized_status": "failed_to_download"},
    "/status/500": {"status": "failed_to_download", "error": "HTTP Error 500: Internal Server Error",
                    "resized_status": "failed_to_download"},
    "/slow": {"status": "failed_to_download", "error": "timed out", "resized_status": "failed_to_download"},
    "/loop": {"status": "failed_to_download", "error": "redirect error that would lead to an infinite loop",
              "resized_status": "failed_to_download"},
    # A photo whose answer carries `X-Robots-Tag: noai`: img2dataset honours the opt-out by default.
    "/noai.png": {"status": "failed_to_download", "error": "Use of image disallowed by X-Robots-Tag directive",
                  "resized_status": "failed_to_download"},
    # Served with 200, so the download succeeds; only decoding can tell it is no image.
    "/notimage": {"status": "success", "error": None, "resized_status": "failed_to_resize",
                  "resized_error": "Image decoding error"},
    "/truncated.jpg": {"status": "success", "error": None, "resized_status": "failed_to_resize",
                       "resized_error": "Image decoding error"},
}

NOT_AN_IMAGE = b"<!doctype html><html><head><title>Not an image</title></head><body>hello</body></html>\n"


@functools.lru_cache(maxsize=None)
def photo_bytes(name: str, ext: str) -> bytes:
    """The encoded bytes of skimage.data.<name>() as `ext` ("png" or "jpg"); the same bytes on every call."""
    import skimage.data
    from PIL import Image

    if name not in PHOTOS:
        raise KeyError(f"{name!r} is not one of the bundled photos {PHOTOS}")
    pil_format, _ = PHOTO_FORMATS[ext]
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if pil_format == "JPEG" else {}
    Image.fromarray(getattr(skimage.data, name)()).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    whole = photo_bytes("chelsea", "jpg")
    return whole[: len(whole) // 2]


class ImageServer:
    """HTTP server on 127.0.0.1 serving `/photo/<name>.{png,jpg}`, `/status/<code>`, `/slow`, `/loop` (-> `/loop2`
    -> `/loop`), `/noai.png`, `/notimage` and `/truncated.jpg`; anything else is 404. `slow_s`: how long `/slow`
    waits before answering (keep it above the client's timeout). `hits` counts requests per path (retries show)."""

    def __init__(self, slow_s: float = 3.0, photos: Sequence[str] = PHOTOS):
        self.slow_s = float(slow_s)
        self.photos = tuple(photos)
        self.hits: collections.Counter[str] = collections.Counter()
        self._hits_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- what it serves ---------------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, dict[str, Any]]:
        """Path -> {"kind": "photo"|"fault", "status", "error", "resized_status", "resized_error"?}: the outcome
        img2dataset reports for that path with resize_mode "no" (status/error) and with resizing (resized_*)."""
        entries: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(self.photos):
            ext = "png" if i % 2 == 0 else "jpg"  # both encodings, one path per photo
            entries[f"/photo/{name}.{ext}"] = {"kind": "photo", "status": "success", "error": None,
                                               "resized_status": "success"}
        for path, outcome in FAULTS.items():
            entries[path] = {"kind": "fault", **outcome}
        return entries

    def body(self, path: str) -> bytes:
        """The bytes a 200 answer to `path` carries (KeyError for paths that never answer 200)."""
        if path.startswith("/photo/"):
            name, _, ext = path[len("/photo/"):].rpartition(".")
            if ext in PHOTO_FORMATS and name in self.photos:
                return photo_bytes(name, ext)
        elif path == "/notimage":
            return NOT_AN_IMAGE
        elif path == "/truncated.jpg":
            return truncated_jpeg()
        raise KeyError(f"{path}: no 200 answer on this server")

    # --- lifecycle --------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not started: use `with ImageServer() as server` or call start()")
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> "ImageServer":
        if self._httpd is not None:
            return self
        for name in self.photos:  # encode before the first request, so no request pays for it
            for ext in PHOTO_FORMATS:
                photo_bytes(name, ext)
        handler = functools.partial(_Handler, self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # stop() must not wait for request threads (a client may hang up)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"ImageServer:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # wakes /slow handlers at once
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd, self._thread = None, None

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _count(self, path: str) -> None:
        with self._hits_lock:
            self.hits[path] += 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive thread lingers after a test

    def __init__(self, server_state: ImageServer, *args, **kwargs):
        self.state = server_state
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # tests read `hits`, not a request log on stderr

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        self.state._count(path)
        try:
            self._answer(path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (the /slow case): nothing left to tell it

    def _answer(self, path: str) -> None:
        if path.startswith("/status/") and path[len("/status/"):].isdigit():
            code = int(path[len("/status/"):])
            self.send_error(code)
        elif path == "/slow":
            # Bounded: stop() sets the event, so a server that stops never waits out the full delay.
            if self.state._stopping.wait(self.state.slow_s):
                return
            self._send(200, "image/png", photo_bytes(self.state.photos[0], "png"))
        elif path in ("/loop", "/loop2"):
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", "/loop2" if path == "/loop" else "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/noai.png":
            self._send(200, "image/png", photo_bytes(self.state.photos[0], "png"), {"X-Robots-Tag": "noai"})
        elif path == "/notimage":
            self._send(200, "text/html; charset=utf-8", NOT_AN_IMAGE)
        elif path == "/truncated.jpg":
            self._send(200, "image/jpeg", truncated_jpeg())
        elif path.startswith("/photo/"):
            name, _, ext = path[len("/photo/"):].rpartition(".")
            if ext in PHOTO_FORMATS and name in self.state.photos:
                self._send(200, PHOTO_FORMATS[ext][1], photo_bytes(name, ext))
            else:
                self.send_error(404)
        else:
            self.send_error(404)

    def _send(self, code: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def write_url_list(path: str | Path, urls: Sequence[str | None], fmt: str, captions: Sequence[str | None] | None = None,
                   extra: dict[str, Sequence[Any]] | None = None) -> Path:
    """Write a url list as parquet / csv / tsv (columns url, caption?, *extra) or txt (one URL per line, no header:
    captions and extra columns cannot be written there, so passing them is an error). None is a missing value."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if fmt == "txt":
        if captions is not None or extra:
            raise ValueError("a txt url list holds URLs only: drop captions/extra or use parquet, csv or tsv")
        path.write_text("".join(f"{url or ''}\n" for url in urls), encoding="utf-8")
        return path
    columns: dict[str, Sequence[Any]] = {"url": list(urls)}
    if captions is not None:
        columns["caption"] = list(captions)
    for name, values in (extra or {}).items():
        columns[name] = list(values)
    for name, values in columns.items():
        if len(values) != len(urls):
            raise ValueError(f"column {name!r} has {len(values)} values for {len(urls)} urls")
    table = pa.table(columns)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        pacsv.write_csv(table, path)
    elif fmt == "tsv":
        pacsv.write_csv(table, path, pacsv.WriteOptions(delimiter="\t"))
    else:
        raise ValueError(f"unknown url list format {fmt!r}: use parquet, csv, tsv or txt")
    return path
