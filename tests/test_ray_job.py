"""Ray: address resolution, the job runtime env, and a real `ray job submit` of the project's hello job to a
`ray start --head` on 127.0.0.1 that this module starts and stops by PID (never `ray stop`: it is not PID-scoped)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from onegen.config import load_config
from onegen.jobs.hello import MARKER
from onegen.raycluster import (describe_ray_address, in_submitted_job, init_ray, job_runtime_env,
                               resolve_ray_address, worker_env_vars)
from onegen.tracking import git_state

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HEAD_CPUS = 3  # an odd logical CPU count, so output proves which cluster a driver joined


@pytest.fixture
def no_ray_env(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
                 "WANDB_MODE", "NO_ALBUMENTATIONS_UPDATE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def cfg_with(*overrides: str):
    return load_config(None, ["run.name=ray-test", *overrides])


def test_address_precedence_config_then_env_then_local(no_ray_env):
    assert resolve_ray_address(cfg_with()) is None
    assert describe_ray_address(cfg_with("ray.num_cpus=2")).startswith("local (a new Ray instance")
    no_ray_env.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_ray_address(cfg_with()) == "10.0.0.1:6379"
    assert resolve_ray_address(cfg_with("ray.address=ray://head:10001")) == "ray://head:10001"
    assert resolve_ray_address(cfg_with("ray.address=local")) is None


def test_inside_a_submitted_job_the_jobs_cluster_wins(no_ray_env):
    no_ray_env.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    no_ray_env.setenv("RAY_ADDRESS", "192.0.2.2:6379")
    assert in_submitted_job()
    assert resolve_ray_address(cfg_with("ray.address=local")) == "192.0.2.2:6379"


def test_job_runtime_env_excludes_outputs_and_carries_env(no_ray_env, tmp_path):
    no_ray_env.setenv("DS_ACCELERATOR", "cpu")
    no_ray_env.chdir(REPO)
    cfg = cfg_with("run.work_dir=outputs/w", "ray.runtime_env.env_vars.FOO=bar", "ray.runtime_env.excludes=[big/]")
    env = job_runtime_env(cfg)
    assert env["working_dir"] == "."
    for pattern in ("/.venv", "/.git", "/work", "/outputs/w", "big/"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["DS_ACCELERATOR"] == "cpu" and env["env_vars"]["FOO"] == "bar"
    assert env["env_vars"]["ONEGEN_GIT_COMMIT"] == git_state(REPO)[0]
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"]
    json.dumps(env)  # must go through --runtime-env-json


def test_worker_env_vars_config_wins_over_forwarded(no_ray_env):
    no_ray_env.setenv("DS_ACCELERATOR", "cpu")
    assert worker_env_vars(cfg_with("ray.runtime_env.env_vars.DS_ACCELERATOR=cuda")) == {"DS_ACCELERATOR": "cuda"}


def test_init_ray_refuses_a_dashboard_address_with_a_hint(no_ray_env):
    with pytest.raises(ValueError, match="ray job submit --address http://127.0.0.1:8265"):
        init_ray(cfg_with("ray.address=http://127.0.0.1:8265"))


def _ray_processes(temp_dir: str, sid: int, session_pids) -> list[int]:
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


@pytest.fixture(scope="module")
def ray_head(free_tcp_port, wait_for_http, stop_processes, session_pids):
    """`ray start --head --block` on 127.0.0.1 with every port chosen free (other Ray clusters may run here)."""
    temp_dir = tempfile.mkdtemp(prefix="ogr", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    ports = {name: free_tcp_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                                "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                "metrics-export-port", "ray-client-server-port")}
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # so the job's `python` is this venv's
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(HEAD_CPUS),
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--temp-dir", temp_dir,
           "--disable-usage-stats"]
    for name, port in ports.items():
        cmd += [f"--{name}", str(port)]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_http(f"{dashboard}/api/version", timeout_s=120, alive=lambda: proc.poll() is None)
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
        left = stop_processes(_ray_processes(temp_dir, proc.pid, session_pids), timeout_s=15)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        assert left == [], f"Ray processes of this test still alive: {left}"
        assert _ray_processes(temp_dir, proc.pid, session_pids) == []
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_ray_job_submit_runs_the_hello_job(ray_head):
    cfg = cfg_with()
    runtime_env = job_runtime_env(cfg)
    runtime_env.pop("working_dir")  # given as --working-dir, as a user would
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "onegen.jobs.hello"]
    result = subprocess.run(cmd, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"{MARKER} squares=[0, 1, 4, 9]" in output
    assert "succeeded" in output
    # The tasks saw the job's runtime env and ran the uploaded copy of the project, not the checkout.
    assert f"ONEGEN_GIT_COMMIT={runtime_env['env_vars']['ONEGEN_GIT_COMMIT']}" in output
    assert "runtime_resources/working_dir_files" in output
    assert f'"CPU": {float(HEAD_CPUS)}' in output


@pytest.mark.integration
def test_a_driver_joins_the_cluster_named_by_ray_address(ray_head):
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["gcs"])
    result = subprocess.run([sys.executable, "-m", "onegen.jobs.hello", "--tasks", "3"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"{MARKER} squares=[0, 1, 4]" in output
    assert f'"CPU": {float(HEAD_CPUS)}' in output  # joined the head, did not start its own instance


@pytest.mark.integration
def test_without_an_address_a_local_instance_is_started_and_stopped(tmp_path, stop_processes):
    ray_tmp = tempfile.mkdtemp(prefix="ogl", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=ray_tmp)
    try:
        result = subprocess.run([sys.executable, "-m", "onegen.jobs.hello", "--tasks", "2", "--set", "ray.num_cpus=1"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        assert f"{MARKER} squares=[0, 1]" in output
        assert '"CPU": 1.0' in output  # the local instance got ray.num_cpus
    finally:
        leftovers = _ray_processes(ray_tmp, -1, lambda sid: [])
        stop_processes(leftovers, timeout_s=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert leftovers == [], "the local Ray instance outlived its driver"
