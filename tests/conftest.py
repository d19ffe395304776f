"""Shared fixtures for tests that start real local services (moto S3, mlflow server, Ray head) on 127.0.0.1.

Services are started by the test that needs them and stopped by PID: never `ray stop` or name-based kills, other
people's processes may run on the same machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import pytest


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_http(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll `url` until it answers 200; fail after `timeout_s` or as soon as `alive()` turns False."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the service behind {url} exited while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as err:
            last = str(err)
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout_s:.0f} s ({last})")


def _stop_processes(pids: Iterable[int], timeout_s: float = 15) -> list[int]:
    """SIGTERM the given PIDs, SIGKILL what is left after `timeout_s`; return the PIDs still alive (should be [])."""
    procs = []
    for pid in set(pids):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [proc.pid for proc in alive if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE]


def _session_pids(sid: int) -> list[int]:
    """PIDs in session `sid` (a service started with start_new_session=True keeps its descendants there)."""
    pids = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                pids.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return pids


@pytest.fixture(scope="session")
def free_tcp_port() -> Callable[[], int]:
    """Call it for a TCP port that is free on 127.0.0.1 right now."""
    return _free_tcp_port


@pytest.fixture(scope="session")
def wait_for_http() -> Callable[..., None]:
    """wait_for_http(url, timeout_s, alive=callable): poll until HTTP 200, bounded."""
    return _wait_for_http


@pytest.fixture(scope="session")
def stop_processes() -> Callable[..., list[int]]:
    """stop_processes(pids, timeout_s=15) -> PIDs still alive: TERM, then KILL, by PID only."""
    return _stop_processes


@pytest.fixture(scope="session")
def session_pids() -> Callable[[int], list[int]]:
    """session_pids(sid) -> PIDs of every process in that session."""
    return _session_pids


# --- S3: one moto server for the session, a clean AWS environment per test ------------------------------------------

AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
            "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3 server on 127.0.0.1 (free port), stopped at the end of the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """A clean AWS environment with test credentials: nothing from the real ~/.aws leaks in."""
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


@pytest.fixture
def make_bucket(moto_endpoint):
    """make_bucket() -> the name of a new, empty bucket on the moto server."""
    import uuid

    import boto3

    def make() -> str:
        name = f"onegen-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return name

    return make


# --- MLflow: one tracking server for the session (started by the first test that needs it) -------------------------

@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, free_tcp_port, wait_for_http, stop_processes, session_pids):
    """A real `mlflow server` on 127.0.0.1 with a sqlite store, one for the test session; stopped by PID (its whole
    process session) at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_tcp_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout_s=90, alive=lambda: proc.poll() is None)
        yield {"uri": f"http://127.0.0.1:{port}", "artifacts": root / "artifacts", "pid": proc.pid}
    except Exception:
        log.flush()
        print((root / "server.log").read_text()[-3000:])
        raise
    finally:
        pids = session_pids(proc.pid) or [proc.pid]  # the server spawns uvicorn/huey workers in its session
        left = stop_processes(pids, timeout_s=20)
        proc.wait(timeout=10)
        log.close()
        assert left == [], f"mlflow server processes still alive: {left}"
        assert session_pids(proc.pid) == []



# --- Ray: one head for the session (started by the first test that needs it), stopped by PID -----------------------

VENV_BIN = Path(sys.executable).parent
HEAD_CPUS = 3
HEAD_OBJECT_STORE_BYTES = 1 << 30


def ray_processes(temp_dir: str, sid: int, session_pids) -> list[int]:
    """PIDs of this head: its session, plus anything whose command line names its private temp dir."""
    import psutil

    pids = set(session_pids(sid))
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                pids.add(proc.pid)
        except psutil.Error:
            pass
    return sorted(pids)


def _wait_for_a_driver(gcs: str, env: dict, alive: Callable[[], bool], attempts: int = 5) -> None:
    """The dashboard answers before the head's raylet has registered; a driver that connects then fails ("Failed to
    connect to Ray cluster"). Connect one throwaway driver first, so the first test's driver finds a ready head."""
    probe = "import ray; ray.init(address=%r, log_to_driver=False); assert ray.cluster_resources().get('CPU'); " \
            "ray.shutdown()" % gcs
    last = ""
    for _ in range(attempts):
        if not alive():
            raise RuntimeError("the Ray head exited while starting")
        result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        if result.returncode == 0:
            return
        last = result.stderr[-2000:]
        time.sleep(2)
    raise TimeoutError(f"no driver could join the Ray head at {gcs}: {last}")


@pytest.fixture(scope="session")
def ray_head(free_tcp_port, wait_for_http, stop_processes, session_pids, moto_endpoint):
    """One `ray start --head --block` on 127.0.0.1 for the session, every port chosen free (other Ray clusters may
    run here), HEAD_CPUS logical CPUs (an odd count, so output proves which cluster a driver joined) and a 1 GiB
    object store. Yields {"dashboard": http URL, "gcs": HOST:PORT, "env": the environment to run drivers/CLIs in}.

    The head (so every Ray worker) and the drivers run in the test AWS environment pointed at the session's moto
    server: onegen never forwards credentials to Ray (INTERFACES §1), so on a cluster the nodes' own credential
    chain serves the workers, and here the head's environment stands in for it."""
    temp_dir = tempfile.mkdtemp(prefix="ogr", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    ports = {name: free_tcp_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                                "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                "metrics-export-port", "ray-client-server-port")}
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # so the job's `python` is this venv's
    env.pop("RAY_ADDRESS", None)
    for name in AWS_VARS:
        env.pop(name, None)
    env.update(AWS_TEST_ENV, AWS_ENDPOINT_URL=moto_endpoint, AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=os.path.join(temp_dir, "aws-config"),  # absent files: nothing of ~/.aws leaks in
               AWS_SHARED_CREDENTIALS_FILE=os.path.join(temp_dir, "aws-credentials"))
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(HEAD_CPUS),
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--temp-dir", temp_dir,
           "--disable-usage-stats", "--object-store-memory", str(HEAD_OBJECT_STORE_BYTES)]
    for name, port in ports.items():
        cmd += [f"--{name}", str(port)]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_http(f"{dashboard}/api/version", timeout_s=120, alive=lambda: proc.poll() is None)
        _wait_for_a_driver(f"127.0.0.1:{ports['port']}", env, alive=lambda: proc.poll() is None)
        yield {"dashboard": dashboard, "gcs": f"127.0.0.1:{ports['port']}", "env": env}
    except Exception:
        log.flush()
        print((Path(temp_dir) / "ray-start.log").read_text()[-3000:])
        raise
    finally:
        # `ray start --block` stops its processes on SIGTERM; then sweep anything of this head still alive.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        left = stop_processes(ray_processes(temp_dir, proc.pid, session_pids), timeout_s=15)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        assert left == [], f"Ray processes of this test still alive: {left}"
        assert ray_processes(temp_dir, proc.pid, session_pids) == []
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_build(tmp_path_factory, ray_head):
    """The shared small build every later test reads (docs/INTERFACES.md §6): `configs/build/synthetic_small.yaml`
    (24 synthetic scenes, 2 views, 64 px, pixel tokenizer) built once per session on the session Ray head, as a user
    runs it. Yields {"root": storage root, "name", "uri": the build's URI, "config": the config file, "stdout"}.
    Tests must not write into it."""
    from build_runs import REPO, ok, run_build

    root = tmp_path_factory.mktemp("synthetic_build")
    config = REPO / "configs/build/synthetic_small.yaml"
    result = ok(run_build(ray_head, config, f"run.work_dir={root / 'work'}", f"storage.root={root / 'data'}"))
    yield {"root": str(root / "data"), "name": "synthetic_small", "uri": str(root / "data/builds/synthetic_small"),
           "config": config, "stdout": result.stdout}
