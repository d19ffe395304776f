"""The installed `onegen` command: help lists working commands and stays light; env and config check work; exit
statuses tell bad input (2) from failures while running (1, with step, input and a saved traceback) and Ctrl-C (130)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from onegen import cli

REPO = Path(__file__).resolve().parents[1]
ONEGEN = Path(sys.executable).with_name("onegen")  # the console script of the venv running the tests


def onegen(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    run_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run_env.update(env or {})
    return subprocess.run([str(ONEGEN), *args], cwd=cwd, env=run_env, capture_output=True, text=True, timeout=120)


def test_help_lists_the_shipped_commands():
    result = onegen("--help")
    assert result.returncode == 0, result.stderr
    for shipped in ("env", "config", "synth", "build", "train", "demo"):
        assert f"    {shipped} " in result.stdout
    for not_yet in ("generate", "evaluate", "retrain"):  # later issues add these with working code
        assert f"    {not_yet} " not in result.stdout


def test_help_does_not_import_heavy_libraries():
    code = ("import sys\nfrom onegen.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'deepspeed', 'pyarrow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_command_fails():
    assert onegen("no-such-command").returncode == 2


def test_bad_input_gives_one_line_naming_it_not_a_traceback(tmp_path: Path):
    result = onegen("synth", "render", "--scenes", "1", "--size", "4", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == ("onegen synth: error: SyntheticConfig.image_size: must be at least 8 pixels "
                                     "(got 4)")
    debug = onegen("synth", "render", "--scenes", "1", "--size", "4", "--out", str(tmp_path / "out"),
                   env={"ONEGEN_DEBUG": "1"})
    assert "Traceback" in debug.stderr


def test_env_json_reports_versions_devices_and_destinations(tmp_path: Path):
    result = onegen("env", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    for key in ("python", "packages", "devices", "ray_address", "mlflow_tracking_uri", "storage_root", "work_dir"):
        assert key in info
    for package in ("torch", "ray", "deepspeed", "diffusers", "transformers", "pyarrow", "mlflow", "webdataset"):
        assert info["packages"][package], package
    assert info["devices"]["cpu_count"] >= 1 and isinstance(info["devices"]["cuda_devices"], list)
    assert info["work_dir"] == str(tmp_path / "work")
    assert info["mlflow_tracking_uri"] == f"sqlite:///{tmp_path}/work/mlflow.db"
    assert info["storage_root"] == str(tmp_path / "work" / "data")
    assert info["ray_address"].startswith("local")


def test_env_follows_config_overrides_and_ray_address(tmp_path: Path):
    result = onegen("env", "--json", "--config", str(REPO / "configs" / "default.yaml"),
                    "--set", "storage.root=s3://bucket/data", "--set", "tracking.uri=http://127.0.0.1:5000",
                    cwd=tmp_path, env={"RAY_ADDRESS": "127.0.0.1:6379"})
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["storage_root"] == "s3://bucket/data"
    assert info["mlflow_tracking_uri"] == "http://127.0.0.1:5000"
    assert info["ray_address"] == "127.0.0.1:6379"


def test_env_text_output():
    result = onegen("env")
    assert result.returncode == 0, result.stderr
    for label in ("python", "torch", "ray address", "mlflow uri", "storage root"):
        assert label in result.stdout


def test_config_check_prints_the_resolved_config_and_ok():
    result = onegen("config", "check", "configs/demo.yaml", "--set", "train.lr=1e-4")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.0001" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("OK: configs/demo.yaml")


def test_config_check_reports_every_problem_with_exit_2(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: x}\ndemo: {}\ntrain: {lrr: 1, steps: many}\n")  # demo: picks the demo schema
    result = onegen("config", "check", str(bad), "--set", "model.preset=")
    assert result.returncode == 2
    assert f"{bad}: train.lrr: unknown key (valid: lr, steps" in result.stderr
    assert f"{bad}: train.steps: expected an integer, got 'many'" in result.stderr
    assert "--set: model.preset: expected a string, got null" in result.stderr
    assert "OK" not in result.stdout and "Traceback" not in result.stderr


# --- exit statuses -------------------------------------------------------------------------------------------------

def onegen_lines(stderr: str, command: str) -> list[str]:
    """onegen's own report lines (stderr also carries progress bars and library logs)."""
    return [line for line in stderr.splitlines() if line.startswith(f"onegen {command}:")]


def test_config_errors_exit_2_with_one_line_per_problem(capsys):
    assert cli.main(["env", "--set", "run.seed=abc", "--set", "ray.num_cpus=0"]) == 2
    assert capsys.readouterr().err.splitlines() == ["--set: run.seed: expected an integer, got 'abc'",
                                                    "--set: ray.num_cpus: expected a number > 0, got 0"]


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    assert cli.main(["synth", "sheet", "--scale", "0", "--out", str(tmp_path / "sheet.png")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "onegen synth: error: --scale must be a positive integer (panel upscaling), got 0"]
    assert not (tmp_path / "sheet.png").exists()


@pytest.fixture
def render_bug(monkeypatch, tmp_path):
    """`onegen synth render` hits a bug while writing; tracebacks without a work dir go under tmp_path."""
    from onegen.cli import synth as synthetic_cli

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(synthetic_cli, "write_sample_files", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.delenv("ONEGEN_DEBUG", raising=False)
    return ["synth", "render", "--scenes", "1", "--views", "1", "--size", "8", "--out", str(tmp_path / "out")]


def test_a_failure_while_running_exits_1_naming_step_input_and_the_saved_traceback(render_bug, tmp_path, capsys):
    assert cli.main(render_bug) == 1
    failed, saved = onegen_lines(capsys.readouterr().err, "synth")
    assert failed == (f"onegen synth: failed in step 'render samples' (input: {tmp_path / 'out'}, seed 0, scenes "
                      "0..0): ZeroDivisionError: a bug")
    match = re.fullmatch(r"onegen synth: traceback saved to (\S+) \(ONEGEN_DEBUG=1 prints it instead\)", saved)
    assert match, saved
    path = Path(match[1])
    assert path.parent == tmp_path / "tmp" / "logs"  # no work dir known: the temp dir
    assert re.fullmatch(rf"onegen-synth-\d{{8}}-\d{{6}}-{os.getpid()}\.traceback\.txt", path.name)
    assert "Traceback" in path.read_text() and "ZeroDivisionError: a bug" in path.read_text()


def test_onegen_debug_raises_instead(render_bug, monkeypatch):
    monkeypatch.setenv("ONEGEN_DEBUG", "1")
    with pytest.raises(ZeroDivisionError, match="a bug"):
        cli.main(render_bug)


def command_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_config_options(parser)
    return parser.parse_args(list(argv))


def test_the_traceback_goes_to_the_run_work_dir_and_ctrl_c_exits_130(tmp_path, capsys):
    def fails_after_loading_its_config(args):
        cli.config_from_args(args)
        raise RuntimeError("lost the cluster")

    args = command_args("--set", f"run.work_dir={tmp_path / 'work'}")
    assert cli.run_command("demo", fails_after_loading_its_config, args) == 1
    failed, saved = onegen_lines(capsys.readouterr().err, "demo")
    assert failed == "onegen demo: failed: RuntimeError: lost the cluster"  # no step marked
    saved_files = list((tmp_path / "work" / "logs").iterdir())  # the config's work dir, not the temp dir
    assert len(saved_files) == 1 and saved == (f"onegen demo: traceback saved to {saved_files[0]} (ONEGEN_DEBUG=1 "
                                               "prints it instead)")

    def interrupted(args):
        raise KeyboardInterrupt

    assert cli.run_command("demo", interrupted, command_args()) == 130
    assert capsys.readouterr().err == "onegen demo: interrupted\n"


def test_an_unreachable_s3_endpoint_is_one_line_with_step_and_input(free_tcp_port, tmp_path):
    closed = f"http://127.0.0.1:{free_tcp_port()}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_ENDPOINT_URL_S3": closed,
           "TMPDIR": str(tmp_path)}
    result = onegen("synth", "render", "--scenes", "1", "--views", "1", "--size", "8", "--out", "s3://bucket/x",
                    cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert onegen_lines(result.stderr, "synth") == [
        "onegen synth: error in step 'render samples' (input: s3://bucket/x, seed 0, scenes 0..0): s3://bucket/x: "
        f"cannot reach the S3 endpoint {closed}: check storage.s3.endpoint_url / AWS_ENDPOINT_URL and that the "
        "service is up"]
    assert "Traceback" not in result.stderr and not (tmp_path / "logs").exists()  # the message says it all


def test_demo_with_an_unreachable_ray_address_fails_in_one_line(free_tcp_port, tmp_path):
    address = f"127.0.0.1:{free_tcp_port()}"
    result = onegen("demo", "--set", "train.steps=1", cwd=tmp_path,
                    env={"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert onegen_lines(result.stderr, "demo") == [
        f"onegen demo: error: cannot reach Ray at {address} (RAY_ADDRESS): connection refused (nothing listens on "
        f"port {address.rsplit(':', 1)[1]}). Start a cluster there (`ray start --head`), fix ray.address / "
        "RAY_ADDRESS, or unset both to start a local instance"]
    assert "Traceback" not in result.stderr and "Failed to connect to GCS" not in result.stderr


def test_demo_reads_the_shipped_demo_config_by_default():
    """`make demo` runs `onegen demo` without --config: it must be configs/demo.yaml, not the built-in defaults."""
    args = cli.build_parser("demo").parse_args(["demo"])
    assert Path(args.config) == REPO / "configs" / "demo.yaml"
    assert cli.config_from_args(args).demo.scenes == 8  # configs/demo.yaml's value (the schema default is 32)
