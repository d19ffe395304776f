"""Typed configs: every shipped YAML validates; errors name the file, the dotted key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from onegen.config import (ConfigError, OnegenConfig, config_hash, default_config, flatten, load_config,
                           resolved_dict, validate_config)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path | None, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_default_and_demo_configs_are_shipped():
    names = {path.name for path in SHIPPED_CONFIGS}
    assert {"default.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, OnegenConfig)
    assert cfg.run.name


def test_defaults_resolve_against_the_current_directory(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, "run: {name: r1}\n"))
    work = tmp_path / "work"
    assert cfg.run.work_dir == work
    assert cfg.storage.root == str(work / "data")
    assert cfg.tracking.uri == f"sqlite:///{work}/mlflow.db"
    assert cfg.tracking.artifact_location == str(work / "mlartifacts")
    assert cfg.ray.address is None and cfg.train.lr == 5e-4


def test_relative_storage_root_is_made_absolute_and_uris_are_kept(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["run.name=r", "storage.root=out/data"]).storage.root == str(tmp_path / "out/data")
    assert load_config(None, ["run.name=r", "storage.root=s3://bucket/p"]).storage.root == "s3://bucket/p"
    assert load_config(None, ["run.name=r", "storage.root=file:///x/y"]).storage.root == "file:///x/y"


def test_set_overrides_are_typed_and_validated(tmp_path: Path):
    path = write(tmp_path, "run: {name: r1}\ntrain: {lr: 1e-3}\n")
    cfg = load_config(path, ["train.lr=1e-4", "train.steps=7", "ray.runtime_env.env_vars.FOO=1",
                             "tracking.uri=http://127.0.0.1:5000", "run.seed=3"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7
    assert cfg.ray.runtime_env.env_vars == {"FOO": "1"}
    assert cfg.tracking.uri == "http://127.0.0.1:5000"
    assert cfg.run.seed == 3


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path: Path):
    # Plain YAML 1.1 reads 1e-4 as the string '1e-4'; configs must not depend on that subtlety.
    cfg = load_config(write(tmp_path, "run: {name: r}\ntrain: {lr: 1e-4}\n"))
    assert cfg.train.lr == pytest.approx(1e-4)


def test_wrong_type_names_file_key_and_expectation(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\ntrain: {lr: abc}\n")
    assert problems(path) == [f"{path}: train.lr: expected a number, got 'abc'"]


def test_unknown_key_lists_the_valid_keys(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\ntrain: {lrr: 0.1}\n")
    [line] = problems(path)
    assert line.startswith(f"{path}: train.lrr: unknown key (valid: lr, steps, batch_size")


def test_missing_required_field(tmp_path: Path):
    path = write(tmp_path, "train: {lr: 0.1}\n")
    assert problems(path) == [f"{path}: run.name: required field missing"]


def test_all_problems_are_reported_one_per_line(tmp_path: Path):
    path = write(tmp_path, "run: {seed: x}\ntrain: {lr: -1, steps: 2.5, zero_stage: 4, precision: fp8}\n"
                           "model: 3\nbogus: {}\n")
    lines = problems(path)
    expected = {
        "run.name": "required field missing",
        "run.seed": "expected an integer, got 'x'",
        "train.lr": "expected a number > 0, got -1",
        "train.steps": "expected an integer, got 2.5",
        "train.zero_stage": "expected one of 2 or 3, got 4",
        "train.precision": "expected one of 'bf16' or 'fp32', got 'fp8'",
        "model": "expected a mapping (a section with keys), got 3",
    }
    for key, message in expected.items():
        assert f"{path}: {key}: {message}" in lines
    assert any(line.startswith(f"{path}: bogus: unknown key (valid: run, storage, tracking, ray") for line in lines)
    assert len(lines) == len(expected) + 1


def test_override_errors_name_the_override(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\n")
    assert problems(path, ["train.lr=abc"]) == ["--set train.lr=abc: train.lr: expected a number, got 'abc'"]
    [unknown] = problems(path, ["train.lrr=1e-4"])
    assert unknown.startswith("--set train.lrr=1e-4: train.lrr: unknown key (valid: lr, steps")
    assert problems(path, ["train.lr.x=1"]) == ["--set train.lr.x=1: train.lr: is a value, not a section"]
    assert problems(path, ["train.lr"])[0].startswith("--set train.lr: expected KEY=VALUE")


def test_override_and_file_problems_are_reported_together(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\ntrain: {steps: x}\n")
    lines = problems(path, ["train.nope=1", "train.lr=abc"])
    assert len(lines) == 3
    assert any(line.startswith(f"{path}: train.steps:") for line in lines)


def test_unreadable_or_malformed_files(tmp_path: Path):
    missing = tmp_path / "missing.yaml"
    assert problems(missing) == [f"{missing}: no such config file"]
    broken = write(tmp_path, "run:\n  name: [unclosed\n")
    [line] = problems(broken)
    assert line.startswith(f"{broken}:") and "invalid YAML" in line
    a_list = write(tmp_path, "- a\n- b\n", "list.yaml")
    assert problems(a_list) == [f"{a_list}: expected a mapping of sections (run:, train:, ...) at the top level, "
                                "got list"]


def test_credentials_are_refused_with_a_pointer_to_the_aws_environment(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\nstorage: {s3: {aws_secret_access_key: hunter2}}\n")
    [line] = problems(path)
    assert line.startswith(f"{path}: storage.s3.aws_secret_access_key: credentials never go in config files")
    assert "hunter2" not in line


def test_uri_and_address_shapes_are_checked(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\nstorage: {root: 'gs://b/x', s3: {endpoint_url: 'localhost:9000'}}\n"
                           "ray: {address: 'not an address'}\n")
    lines = problems(path)
    assert (f"{path}: storage.root: gs://b/x: unsupported scheme; use a local path, file:///path or "
            "s3://bucket/prefix") in lines
    assert any(line.startswith(f"{path}: storage.s3.endpoint_url: expected an http:// or https:// URL")
               for line in lines)
    assert any(line.startswith(f"{path}: ray.address: expected 'auto', 'local'") for line in lines)
    for ok in ("auto", "local", "127.0.0.1:6379", "ray://head:10001", "http://127.0.0.1:8265"):
        assert load_config(None, ["run.name=r", f"ray.address={ok}"]).ray.address == ok


def test_config_hash_is_stable_and_tracks_values(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "run: {name: r}\n")
    a, b = load_config(path), load_config(path)
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 64
    assert config_hash(load_config(path, ["train.lr=1e-4"])) != config_hash(a)
    # The resolved config validates to itself: logging and re-loading it reproduces the same run.
    again = validate_config(resolved_dict(a), "resolved")
    assert resolved_dict(again) == resolved_dict(a) and config_hash(again) == config_hash(a)


def test_resolved_dict_is_plain_data_and_flattens_to_dotted_keys(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flat = flatten(resolved_dict(default_config()))
    assert flat["train.lr"] == 5e-4
    assert flat["run.work_dir"] == str(tmp_path / "work")
    assert flat["ray.runtime_env.env_vars"] == {}
    assert all(isinstance(key, str) and "." in key for key in flat)


def test_derived_defaults_are_per_config_not_shared():
    a = load_config(None, ["run.name=a", "run.work_dir=/tmp/onegen-a"])
    b = load_config(None, ["run.name=b", "run.work_dir=/tmp/onegen-b"])
    assert (a.storage.root, b.storage.root) == ("/tmp/onegen-a/data", "/tmp/onegen-b/data")
    assert a.tracking.uri != b.tracking.uri


def test_storage_roots_that_storage_would_refuse_fail_at_config_time():
    """config check accepts exactly the roots `Storage` can open (one rule, onegen.storage.parse_root_uri)."""
    for bad, reason in (("s3:///prefix", "expected s3://BUCKET[/PREFIX]"),
                        ("file://relative/path", "a file:// URI needs an absolute path")):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["run.name=r", f"storage.root={bad}"])
        assert any(f"storage.root: {bad}: {reason}" in line for line in err.value.problems)


def test_unknown_model_preset_names_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["run.name=r", "model.preset=nextdit-huge"])
    assert any("model.preset: expected one of nextdit-small, nextdit-tiny, onediffusion-2.8b, got 'nextdit-huge'"
               in line for line in err.value.problems)
