"""What a new user hits first, fixed as classes in the shared layer (issue: robustness): a secret is never echoed,
an unusable tracking store or storage root fails fast naming its key, names and paths are safe, bad input exits 2
with one line per problem, Ctrl-C and SIGTERM end the MLflow run KILLED, commands accept the project's own configs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from onegen.config import ConfigError, load_config
from onegen.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
ONEGEN = Path(sys.executable).with_name("onegen")
SECRET = "hunter2sesame"


def onegen(*args: str, cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed command, as a user runs it, with its temp dir (where tracebacks fall back to) inside `cwd`."""
    (cwd / "tmp").mkdir(exist_ok=True)
    run_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run_env.update({"TMPDIR": str(cwd / "tmp"), **(env or {})})
    run_env = {k: v for k, v in run_env.items() if v is not None}  # None: unset
    return subprocess.run([str(ONEGEN), *args], cwd=cwd, env=run_env, capture_output=True, text=True,
                          timeout=timeout)


def files_containing(folder: Path, needle: str, skip: tuple[Path, ...] = ()) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and path not in skip
            and needle.encode() in path.read_bytes()]


# ------------------------------------------------------------------------------------------ 1. secrets never echoed

@pytest.mark.parametrize("how", ["set-url", "set-bare", "set-env-token", "file-url", "file-key", "argparse"])
def test_a_secret_is_refused_and_its_value_appears_nowhere(tmp_path: Path, how: str):
    config = tmp_path / "c.yaml"
    args: list[str] = ["demo", "--set", f"run.work_dir={tmp_path / 'work'}"]
    if how == "set-url":
        args += ["--set", f"tracking.uri=http://alice:{SECRET}@127.0.0.1:5000"]
    elif how == "set-bare":
        args += ["--set", f"ray.address=alice:{SECRET}@127.0.0.1:6379"]
    elif how == "set-env-token":
        args += ["--set", f"ray.runtime_env.env_vars.MY_VALUE=hf_{SECRET}abcdefghijklmnopqrstuvwxyz"]
    elif how == "file-url":
        config.write_text(f"run: {{name: r}}\nstorage: {{s3: {{endpoint_url: 'http://minio:{SECRET}@h:9000'}}}}\n")
        args += ["--config", str(config)]
    elif how == "file-key":
        config.write_text(f"run: {{name: r}}\nray: {{runtime_env: {{env_vars: {{DB_PWD: {SECRET}}}}}}}\n")
        args += ["--config", str(config)]
    else:  # argparse quotes an invalid choice
        args = ["config", "check", str(config), "--schema", f"http://u:{SECRET}@h"]
    result = onegen(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert result.stderr.strip(), "the refusal says what was wrong"
    assert files_containing(tmp_path, SECRET, skip=(config,)) == []  # no log, traceback or MLflow store holds it
    if how != "argparse":
        assert "credential chain" in result.stderr


def test_keys_and_paths_that_carry_a_password_are_redacted_in_messages(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{name: r}}\ndemo: {{'http://u:{SECRET}@h': 1}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(config, [], load_schema("demo"))
    assert SECRET not in str(err.value) and "unknown key" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(f"/no/such/http://u:{SECRET}@h/c.yaml")
    assert SECRET not in str(err.value) and "no such config file" in str(err.value)


@pytest.mark.parametrize("value", [f"u:pa:{SECRET}@h", f"http://u:p@{SECRET}@h/x", f"postgresql://u@h/db?password={SECRET}",
                                   f"Bearer {SECRET}abcdef"])
def test_passwords_with_colons_or_at_signs_query_credentials_and_bearer_tokens_are_caught(value: str):
    from onegen.secrets import looks_like_secret_value, redact

    assert looks_like_secret_value(value) and SECRET not in redact(value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["run.name=r", f"run.seed={value}"])
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("name", ["DB_PASS", "PASS", "DBPASSWORD", "HFTOKEN", "smtp_pw"])
def test_more_credential_names_are_refused(name: str):
    with pytest.raises(ConfigError, match="looks like a credential"):
        load_config(None, ["run.name=r", f"ray.runtime_env.env_vars.{name}=x"])
    for harmless in ("RAY_AUTH_MODE", "MAX_TOKENS", "PASS_RATE", "KEY_FRAMES"):
        load_config(None, ["run.name=r", f"ray.runtime_env.env_vars.{harmless}=1"])


@pytest.mark.parametrize("start", ["!", "*"])
def test_a_yaml_error_does_not_quote_a_value_that_looks_like_a_tag_or_alias(tmp_path: Path, start: str):
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{name: r}}\nray: {{runtime_env: {{env_vars: {{X: {start}{SECRET}}}}}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert SECRET not in str(err.value) and f"{config}:2: invalid YAML: " in str(err.value)


def test_the_failed_step_input_is_redacted(tmp_path: Path):
    out = f"s3://AKIAABCDEFGHIJKLMNOP:{SECRET}@bucket/x.png"
    result = onegen("synth", "sheet", "--size", "16", "--scenes", "1", "--views", "1", "--out", out, cwd=tmp_path,
                    env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": None,
                         "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "n"),
                         "AWS_EC2_METADATA_DISABLED": "true"})
    assert result.returncode == 1 and "in step 'write contact sheet' (input: s3://" in result.stderr
    assert SECRET not in result.stdout + result.stderr and "AKIAABCDEFGHIJKLMNOP" not in result.stderr


def load_schema(name: str):
    from onegen.config import SCHEMAS

    return SCHEMAS[name]


# ------------------------------------------------------------------------------ 2. tracking and storage fail fast

@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never answers (a hung server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_a_dead_tracking_server_fails_within_15_s_naming_tracking_uri(tmp_path: Path, free_tcp_port, silent_port,
                                                                      kind: str):
    port = free_tcp_port() if kind == "refused" else silent_port
    started = time.monotonic()
    result = onegen("demo", "--set", f"run.work_dir={tmp_path / 'work'}", "--set",
                    f"tracking.uri=http://127.0.0.1:{port}", cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    assert elapsed <= 15, f"took {elapsed:.1f} s"
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"onegen demo: error: tracking.uri http://127.0.0.1:{port}: no MLflow server answers (")
    assert ("connection refused" if kind == "refused" else "no answer within 5 s") in line
    assert "mlflow server" in line and "leave it unset" in line
    assert not (tmp_path / "work" / "mlflow.db").exists() and not (tmp_path / "work" / "data").exists()


@pytest.mark.parametrize("uri, problem", [("http://127.0.0.1:abc", "Port could not be cast to integer"),
                                          ("http://:5000", "no host"), ("https://[::1", "Invalid IPv6 URL")])
def test_a_tracking_url_that_cannot_be_sent_is_refused_at_load(uri: str, problem: str):
    with pytest.raises(ConfigError, match=rf"^--set: tracking.uri: .*{re.escape(problem)}"):
        load_config(None, ["run.name=r", f"tracking.uri={uri}"])


def test_an_upper_case_scheme_is_probed_too(free_tcp_port):
    from onegen.errors import UnreachableError
    from onegen.preflight import check_tracking_store

    with pytest.raises(UnreachableError, match="connection refused"):
        check_tracking_store(f"HTTP://127.0.0.1:{free_tcp_port()}")
    assert load_config(None, ["run.name=r", "tracking.uri=databricks"]).tracking.uri == "databricks"


@pytest.mark.parametrize("uri", ["mlruns", "/tmp/somewhere/mlruns", "file:///tmp/somewhere/mlruns"])
def test_a_folder_as_tracking_store_is_refused_with_what_to_write(uri: str):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["run.name=r", f"tracking.uri={uri}"])
    [line] = err.value.problems
    assert line.startswith("--set: tracking.uri: expected sqlite:///ABS/PATH/mlflow.db")
    assert "mlruns/mlflow.db" in line


def test_missing_storage_credentials_are_found_before_anything_runs(tmp_path: Path):
    env = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None,
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    started = time.monotonic()
    result = onegen("demo", "--set", f"run.work_dir={tmp_path / 'work'}", "--set", "storage.root=s3://bucket/x",
                    cwd=tmp_path, env=env, timeout=60)
    assert time.monotonic() - started <= 15
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "s3://bucket/x: no AWS credentials found" in line
    assert not (tmp_path / "work" / "mlflow.db").exists()


# ------------------------------------------------------------------------------------- 3. names and paths are safe

@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "/abs", "a\\b", "", "x y", "x" * 129, "a..b"])
def test_names_that_would_leave_their_folder_are_refused(name: str):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"run.name={name}"])
    assert err.value.problems[0].startswith("--set: run.name: ")
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/build/synthetic.yaml", [f"build.name={name}"] if name else ["build.name=a/b"],
                    load_schema("build"))
    assert "build.name: " in err.value.problems[0]


def test_safe_names_pass():
    for name in ("demo", "web-2026.12_v1", "A1"):
        assert load_config(None, [f"run.name={name}"]).run.name == name


def test_a_work_dir_or_storage_root_that_is_a_file_is_refused_naming_the_key(tmp_path: Path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    result = onegen("demo", "--set", f"run.work_dir={a_file}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"--set: run.work_dir: {a_file} is a file, not a folder: point it at a folder "
                                     "(it is created if missing)")
    with pytest.raises(ConfigError, match=r"storage.root: .*inside .*a_file, which is a file"):
        load_config(None, ["run.name=r", f"storage.root={a_file / 'sub'}"])
    with pytest.raises(ConfigError, match="run.work_dir: expected a folder path, got an empty string"):
        load_config(None, ["run.name=r", "run.work_dir=''"])


def test_a_work_dir_that_cannot_be_created_is_refused_before_anything_runs(tmp_path: Path):
    from onegen.preflight import check_run_targets

    cfg = load_config(None, ["run.name=r", "run.work_dir=/proc/onegen-cannot-exist/work"])
    with pytest.raises(UsageError, match=r"^run.work_dir: cannot create or write /proc/onegen-cannot-exist/work "):
        check_run_targets(cfg, ray=False)


def test_image_sizes_have_an_upper_bound_checked_before_allocating(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"data.image_size: expected a number <= 4096, got 100000"):
        load_config(REPO / "configs/demo.yaml", ["data.image_size=100000"], load_schema("demo"))
    with pytest.raises(ConfigError, match=r"build.sources\[0\].size: expected a number <= 4096"):
        load_config(REPO / "configs/build/synthetic.yaml", ["build.sources[0].size=30000"], load_schema("build"))
    result = onegen("synth", "render", "--size", "30000", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "onegen synth: error: --size must be at most 4096 pixels, got 30000"
    assert not (tmp_path / "out").exists()


def test_synth_output_paths_are_checked_before_rendering(tmp_path: Path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    render = onegen("synth", "render", "--scenes", "1", "--out", str(a_file), cwd=tmp_path)
    assert render.returncode == 2 and f"--out {a_file} is a file, not a folder" in render.stderr
    sheet = onegen("synth", "sheet", "--out", str(tmp_path), cwd=tmp_path)
    assert sheet.returncode == 2 and f"--out {tmp_path} is a folder: name the file to write" in sheet.stderr
    empty = onegen("synth", "sheet", "--out", "", cwd=tmp_path)
    assert empty.returncode == 2 and "--out must name a file, got an empty string" in empty.stderr


# ---------------------------------------------------------------------------------------------- 4. one exit rule

def test_a_device_or_a_huge_file_is_not_read_as_a_config(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^/dev/zero: not a regular file"):
        load_config("/dev/zero")
    huge = tmp_path / "huge.yaml"
    huge.write_text("# x\n" * 300_000)
    with pytest.raises(ConfigError, match=rf"^{huge}: larger than 1 MiB, not a config file"):
        load_config(huge)


def test_a_storage_uri_missing_its_slashes_is_not_taken_for_a_folder():
    with pytest.raises(ConfigError, match=r"storage.root: file:/tmp/x: a URI needs '//' after the scheme"):
        load_config(None, ["run.name=r", "storage.root=file:/tmp/x"])


def test_a_binary_or_non_utf8_config_exits_2_naming_the_file(tmp_path: Path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run:\n  name: café\n".encode("latin-1"))
    for command in (["config", "check", str(binary)], ["demo", "--config", str(binary)],
                    ["env", "--config", str(binary)]):
        result = onegen(*command, cwd=tmp_path)
        assert (result.returncode, result.stderr.strip()) == (
            2, f"{binary}: is a binary file, not a YAML config (pass a .yaml file, e.g. configs/demo.yaml)")
    result = onegen("config", "check", str(latin1), cwd=tmp_path)
    assert (result.returncode, result.stderr.strip()) == (
        2, f"{latin1}:2: not UTF-8 text (byte 0xe9 at offset 16): save the config as UTF-8")
    assert not (tmp_path / "tmp" / "logs").exists(), "bad input saves no traceback"


def test_yaml_booleans_are_not_numbers(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text("run: {name: r}\ntrain: {steps: yes, lr: on}\n")
    with pytest.raises(ConfigError) as err:
        load_config(config, ["demo.guidance_scale=false", "ray.num_cpus=true"], load_schema("demo"))
    assert sorted(err.value.problems) == sorted([
        f"{config}: train.steps: expected a number, got true (a YAML boolean: YAML reads true/false/yes/no/on/off as "
        "booleans)",
        f"{config}: train.lr: expected a number, got true (a YAML boolean: YAML reads true/false/yes/no/on/off as "
        "booleans)",
        "--set: demo.guidance_scale: expected a number, got false (a YAML boolean: YAML reads true/false/yes/no/on/off "
        "as booleans)",
        "--set: ray.num_cpus: expected a number, got true (a YAML boolean: YAML reads true/false/yes/no/on/off as "
        "booleans)"])
    with pytest.raises(ConfigError, match=r"build.sources\[0\].scenes: expected a number, got true"):
        load_config(REPO / "configs/build/synthetic.yaml", ["build.sources[0].scenes=true"], load_schema("build"))
    with pytest.raises(ConfigError, match=r"build.conditions.blur_sigma\[1\]: expected a number, got false"):
        load_config(REPO / "configs/build/synthetic.yaml", ["build.conditions.blur_sigma=[1.0, false]"],
                    load_schema("build"))
    # booleans where booleans belong still work
    assert load_config(None, ["run.name=r", "storage.shared=yes"]).storage.shared is True


DRIVER = """
import os, signal, sys
from onegen.cli import run_command
from onegen.config import load_config
from onegen.tracking import start_run

def run(args):
    cfg = load_config(None, ["run.name=stopped", "run.work_dir=" + sys.argv[1]])
    with start_run(cfg) as active:
        print(active.info.run_id, flush=True)
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
        signal.pause()  # never reached: the signal interrupts
    return 0

sys.exit(run_command("stopped", run, None))
"""


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_ends_the_mlflow_run_killed_with_exit_130(tmp_path: Path, signal_name: str):
    from mlflow.tracking import MlflowClient

    result = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), signal_name], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "onegen stopped: interrupted"
    run_id = result.stdout.split()[0]
    status = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).info.status
    assert status == "KILLED"


# --------------------------------------------------------------------- 5. commands accept the project's own configs

@pytest.mark.parametrize("config", ["configs/demo.yaml", "configs/build/synthetic.yaml", "configs/default.yaml"])
def test_env_accepts_any_commands_config_and_reports_the_shared_sections(tmp_path: Path, config: str):
    result = onegen("env", "--json", "--config", str(REPO / config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["config"] == str(REPO / config)
    assert info["work_dir"] == str(tmp_path / "work") and info["storage_root"] == str(tmp_path / "work" / "data")
    also = onegen("env", "--set", "demo.scenes=3", cwd=tmp_path)
    assert also.returncode == 0, also.stderr


# ---------------------------------------------------------------------------------- 6. the pipeline fails clearly

def test_a_decompression_bomb_is_refused_from_its_header(tmp_path: Path):
    from model.images import load_image

    from odd_images import huge_png  # the tests' own odd files: a PNG header claiming a huge size

    path = tmp_path / "bomb.png"
    path.write_bytes(huge_png(30000, 30000))
    with pytest.raises(ValueError, match=rf"^{path}: "):
        load_image(path)
    path.write_bytes(huge_png(10000, 10000))  # between PIL's warning and error limits: PIL alone would decode it
    with pytest.raises(ValueError, match=rf"^{path}: the image claims 10000x10000 pixels, more than the 89478485"):
        load_image(path)


def test_readme_commands_block_lists_only_commands_that_exist():
    text = (REPO / "README.md").read_text()
    block = text.split("## Commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split()[1] for line in block.strip().splitlines() if line.startswith(".venv/bin/onegen ")]
    from onegen.cli import COMMANDS

    known = {name for name, _, _ in COMMANDS}
    assert commands and set(c for c in commands if not c.startswith("-")) <= known, textwrap.shorten(block, 300)
