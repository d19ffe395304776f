"""Ray: address resolution, the job runtime env, the checks before connecting (paths a cluster cannot see, an address
nothing answers on), and real `ray job submit`s of the project's hello job to a `ray start --head` on 127.0.0.1 that
this module starts and stops by PID (never `ray stop`: it is not PID-scoped)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from onegen.config import ConfigError, load_config
from onegen.errors import UnreachableError
from onegen.jobs.hello import MARKER
from onegen.raycluster import (check_paths_reach_cluster, check_ray_target, describe_ray_address, in_submitted_job,
                               init_ray, job_runtime_env, resolve_ray_address, worker_env_vars)
from onegen.tracking import git_state

REPO = Path(__file__).resolve().parents[1]
from conftest import HEAD_CPUS, VENV_BIN, ray_processes  # the session Ray head (tests/conftest.py)


@pytest.fixture
def no_ray_env(monkeypatch):
    from onegen.raycluster import FORWARDED_ENV

    for name in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", *FORWARDED_ENV):
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
    with pytest.raises(ConfigError, match="ray job submit --address http://127.0.0.1:8265"):
        init_ray(cfg_with("ray.address=http://127.0.0.1:8265"))


# --- paths a cluster cannot see ----------------------------------------------------------------------------------

# What the job supervisor puts in a job's environment when it was submitted with --working-dir.
JOB_WITH_WORKING_DIR = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}})


def problem_keys(err: ConfigError) -> list[str]:
    """The dotted keys of `source: dotted.key: message` lines."""
    return [line.split(": ")[1] for line in err.problems]


def test_inside_a_job_paths_in_its_working_dir_are_refused_even_if_shared(no_ray_env, tmp_path):
    no_ray_env.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB_WITH_WORKING_DIR)
    working_dir = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123456789abcdef"
    working_dir.mkdir(parents=True)
    no_ray_env.chdir(working_dir)
    for shared in ("false", "true"):
        with pytest.raises(ConfigError) as caught:
            check_paths_reach_cluster(cfg_with("run.work_dir=work", f"storage.shared={shared}"), "127.0.0.1:6379")
        assert problem_keys(caught.value) == ["run.work_dir", "storage.root", "tracking.uri",
                                              "tracking.artifact_location"]
        first = caught.value.problems[0]
        assert first.startswith("Ray job: run.work_dir: ./work is inside the job's working dir")
        assert "deleted when the job ends" in first and "absolute path outside" in first
    # An absolute work dir outside the copy is fine; so is a job that was submitted without a working dir.
    check_paths_reach_cluster(cfg_with(f"run.work_dir={tmp_path / 'out'}"), "127.0.0.1:6379")
    no_ray_env.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    check_paths_reach_cluster(cfg_with("run.work_dir=work"), "127.0.0.1:6379")


def test_a_cluster_on_another_machine_refuses_local_paths_unless_shared(no_ray_env, tmp_path):
    no_ray_env.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        check_paths_reach_cluster(cfg_with(), "10.1.2.3:6379")
    # run.work_dir is only written by this driver: not refused
    assert problem_keys(caught.value) == ["storage.root", "tracking.uri", "tracking.artifact_location"]
    root, uri = caught.value.problems[:2]
    assert root.startswith(f"Ray cluster 10.1.2.3:6379: storage.root: {tmp_path}/work/data is a local path")
    assert "set storage.root: s3://BUCKET/PREFIX" in root and "storage.shared: true" in root
    assert uri.startswith(f"Ray cluster 10.1.2.3:6379: tracking.uri: sqlite:///{tmp_path}/work/mlflow.db")
    assert "tracking.uri: http://" in uri
    with pytest.raises(ConfigError, match="tracking.uri"):  # a remote storage root alone is not enough
        check_paths_reach_cluster(cfg_with("storage.root=s3://bucket/data"), "ray://10.1.2.3:10001")
    check_paths_reach_cluster(cfg_with("storage.shared=true"), "10.1.2.3:6379")
    check_paths_reach_cluster(cfg_with("storage.root=s3://bucket/data", "tracking.uri=http://10.1.2.3:5000"),
                              "10.1.2.3:6379")  # a tracking server: tracking.artifact_location is not used


def test_a_cluster_on_this_machine_accepts_local_paths(no_ray_env, tmp_path):
    import psutil

    no_ray_env.chdir(tmp_path)
    interface = next(a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                     if a.family == socket.AF_INET and not a.address.startswith("127."))
    for address in ("127.0.0.1:6379", "localhost:6379", "ray://127.0.0.1:10001", f"{interface}:6379", None):
        check_paths_reach_cluster(cfg_with(), address)  # a local `ray start --head` advertises the interface


def test_a_head_on_this_machine_with_worker_nodes_elsewhere_refuses_local_paths(no_ray_env, tmp_path):
    """A job's driver runs on the head (this machine), but tasks on other nodes write to their own disks."""
    no_ray_env.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        check_paths_reach_cluster(cfg_with(), "127.0.0.1:6379", other_nodes=["10.1.2.4"])
    assert problem_keys(caught.value) == ["storage.root", "tracking.uri", "tracking.artifact_location"]
    assert "with nodes on other machines, 10.1.2.4" in str(caught.value)
    check_paths_reach_cluster(cfg_with("storage.shared=true"), "127.0.0.1:6379", other_nodes=["10.1.2.4"])


def test_init_ray_checks_paths_before_connecting(no_ray_env, tmp_path):
    no_ray_env.chdir(tmp_path)
    with pytest.raises(ConfigError, match="Ray cluster 10.1.2.3:6379: storage.root"):
        init_ray(cfg_with("ray.address=10.1.2.3:6379"))  # refused at once: no connection attempt to 10.1.2.3
    # The same checks without connecting, for commands that write outputs before they need Ray.
    with pytest.raises(ConfigError, match="Ray cluster 10.1.2.3:6379: storage.root"):
        check_ray_target(cfg_with("ray.address=10.1.2.3:6379"))
    assert check_ray_target(cfg_with()) is None  # a local instance: nothing to reach


# --- an address nothing answers on -------------------------------------------------------------------------------

def test_init_ray_fails_fast_naming_an_unreachable_address(free_tcp_port, tmp_path):
    address = f"127.0.0.1:{free_tcp_port()}"  # nothing listens there
    code = ("from onegen.config import load_config\nfrom onegen.raycluster import init_ray\n"
            "init_ray(load_config(None, ['run.name=unreachable']))")
    env = dict(os.environ, RAY_ADDRESS=address, RAY_AUTH_MODE="disabled")
    env.pop("RAY_JOB_CONFIG_JSON_ENV_VAR", None)
    # Before: ray.init retried for minutes. The subprocess timeout bounds the test, not an elapsed-time assertion.
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"onegen.errors.UnreachableError: cannot reach Ray at {address} (RAY_ADDRESS): "
                           "connection refused"), result.stderr[-2000:]
    assert "`ray start --head`" in last and "unset both to start a local instance" in last
    assert "Failed to connect to GCS" not in result.stderr  # ray.init never ran


def test_auto_with_no_cluster_fails_fast(no_ray_env, free_tcp_port):
    import ray._private.services as services

    def no_cluster(address, temp_dir):
        raise ConnectionError("Could not find any running Ray instance.")

    no_ray_env.setattr(services, "canonicalize_bootstrap_address", no_cluster)
    with pytest.raises(UnreachableError, match=r"cannot reach Ray at auto \(ray.address\): no running Ray cluster "
                                               r"found on this machine\. Start a cluster there \(`ray start --head`"):
        init_ray(cfg_with("ray.address=auto"))
    stale = f"127.0.0.1:{free_tcp_port()}"  # e.g. the recorded address of a `ray start` that has since died
    no_ray_env.setattr(services, "canonicalize_bootstrap_address", lambda address, temp_dir: stale)
    with pytest.raises(UnreachableError, match=f"cannot reach Ray at {stale} \\(ray.address\\): connection refused"):
        init_ray(cfg_with("ray.address=auto"))


def test_a_job_cli_reports_an_unreachable_cluster_in_one_line(free_tcp_port, tmp_path):
    address = f"127.0.0.1:{free_tcp_port()}"
    env = dict(os.environ, RAY_ADDRESS=address, RAY_AUTH_MODE="disabled")
    env.pop("RAY_JOB_CONFIG_JSON_ENV_VAR", None)
    result = subprocess.run([sys.executable, "-m", "onegen.jobs.hello"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"onegen hello: error: cannot reach Ray at {address} (RAY_ADDRESS): connection refused (nothing listens on "
        f"port {address.rsplit(':', 1)[1]}). Start a cluster there (`ray start --head`), fix ray.address / "
        "RAY_ADDRESS, or unset both to start a local instance"]


def submit_hello(ray_head, *hello_args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`ray job submit --working-dir . -- python -m onegen.jobs.hello ARGS` as a user would; (result, runtime env)."""
    runtime_env = job_runtime_env(cfg_with())
    runtime_env.pop("working_dir")  # given as --working-dir
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "onegen.jobs.hello", *hello_args]
    result = subprocess.run(cmd, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=240)
    return result, runtime_env


@pytest.mark.integration
def test_ray_job_submit_runs_the_hello_job(ray_head, tmp_path):
    # A job's outputs go outside its temporary working dir (an absolute path; on a real cluster, shared storage).
    result, runtime_env = submit_hello(ray_head, "--set", f"run.work_dir={tmp_path / 'work'}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"{MARKER} squares=[0, 1, 4, 9]" in output
    assert "succeeded" in output
    # The tasks saw the job's runtime env and ran the uploaded copy of the project, not the checkout.
    assert f"ONEGEN_GIT_COMMIT={runtime_env['env_vars']['ONEGEN_GIT_COMMIT']}" in output
    assert "runtime_resources/working_dir_files" in output
    assert f'"CPU": {float(HEAD_CPUS)}' in output


@pytest.mark.integration
def test_a_job_whose_outputs_would_land_in_its_working_dir_fails_naming_the_keys(ray_head):
    result, _ = submit_hello(ray_head)  # the default run.work_dir is relative: inside the job's working dir
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    for key in ("run.work_dir", "storage.root", "tracking.uri", "tracking.artifact_location"):
        assert f"Ray job: {key}: " in output, output[-4000:]
    assert ("Ray job: run.work_dir: ./work is inside the job's working dir (Ray's temporary copy of the upload, "
            "deleted when the job ends; storage.shared does not change that): set run.work_dir to an absolute path "
            "outside it") in output
    assert "Ray job: tracking.uri: sqlite:///./work/mlflow.db is inside" in output
    assert MARKER not in output and "Traceback" not in output  # refused before any task ran, as one line per key


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
        leftovers = ray_processes(ray_tmp, -1, lambda sid: [])
        stop_processes(leftovers, timeout_s=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert leftovers == [], "the local Ray instance outlived its driver"
