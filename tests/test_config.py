"""Typed configs: every shipped YAML validates; errors name the file, the dotted key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from onegen.config import (SCHEMAS, ConfigError, DemoConfig, OnegenConfig, config_hash, content_hash,
                           default_config, flatten, load_config, machine_fields, resolved_dict, schema_for_sections,
                           validate_config)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path | None, overrides: list[str] = (), schema=DemoConfig) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, schema)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_default_and_demo_configs_are_shipped():
    names = {path.name for path in SHIPPED_CONFIGS}
    assert {"default.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    import yaml

    schema = schema_for_sections(set(yaml.safe_load(path.read_text())))
    cfg = load_config(path, schema=schema)
    assert isinstance(cfg, OnegenConfig)
    assert cfg.run.name
    assert schema is (DemoConfig if path.name == "demo.yaml" else OnegenConfig)


def test_defaults_resolve_against_the_current_directory(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, "run: {name: r1}\n"))
    work = tmp_path / "work"
    assert cfg.run.work_dir == work
    assert cfg.storage.root == str(work / "data")
    assert cfg.tracking.uri == f"sqlite:///{work}/mlflow.db"
    assert cfg.tracking.artifact_location == str(work / "mlartifacts")
    assert cfg.ray.address is None


def test_relative_storage_root_is_made_absolute_and_uris_are_kept(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["run.name=r", "storage.root=out/data"]).storage.root == str(tmp_path / "out/data")
    assert load_config(None, ["run.name=r", "storage.root=s3://bucket/p"]).storage.root == "s3://bucket/p"
    assert load_config(None, ["run.name=r", "storage.root=file:///x/y"]).storage.root == "file:///x/y"


def test_set_overrides_are_typed_and_validated(tmp_path: Path):
    path = write(tmp_path, "run: {name: r1}\ntrain: {lr: 1e-3}\n")
    cfg = load_config(path, ["train.lr=1e-4", "train.steps=7", "ray.runtime_env.env_vars.FOO=1",
                             "tracking.uri=http://127.0.0.1:5000", "run.seed=3"], DemoConfig)
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7
    assert cfg.ray.runtime_env.env_vars == {"FOO": "1"}
    assert cfg.tracking.uri == "http://127.0.0.1:5000"
    assert cfg.run.seed == 3


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path: Path):
    # Plain YAML 1.1 reads 1e-4 as the string '1e-4'; configs must not depend on that subtlety.
    cfg = load_config(write(tmp_path, "run: {name: r}\ntrain: {lr: 1e-4}\n"), schema=DemoConfig)
    assert cfg.train.lr == pytest.approx(1e-4)


def test_wrong_type_names_file_key_and_expectation(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\ntrain: {lr: abc}\n")
    assert problems(path) == [f"{path}: train.lr: expected a number, got 'abc'"]


def test_unknown_key_lists_the_valid_keys(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\ntrain: {lrr: 0.1}\n")
    [line] = problems(path)
    assert line == f"{path}: train.lrr: unknown key (valid: lr, steps, batch_size)"


def test_missing_required_field(tmp_path: Path):
    path = write(tmp_path, "train: {lr: 0.1}\n")
    assert problems(path) == [f"{path}: run.name: required field missing"]


def test_all_problems_are_reported_one_per_line(tmp_path: Path):
    path = write(tmp_path, "run: {seed: x}\ntrain: {lr: -1, steps: 2.5}\nmodel: {attn_impl: fast}\n"
                           "data: 3\nbogus: {}\n")
    lines = problems(path)
    expected = {
        "run.name": "required field missing",
        "run.seed": "expected an integer, got 'x'",
        "train.lr": "expected a number > 0, got -1",
        "train.steps": "expected an integer, got 2.5",
        "model.attn_impl": "expected one of 'auto', 'flex' or 'math', got 'fast'",
        "data": "expected a mapping (a section with keys), got 3",
    }
    for key, message in expected.items():
        assert f"{path}: {key}: {message}" in lines
    assert any(line.startswith(f"{path}: bogus: unknown key (valid: run, storage, tracking, ray") for line in lines)
    assert len(lines) == len(expected) + 1


def test_override_errors_name_the_override(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\n")
    assert problems(path, ["train.lr=abc"]) == ["--set: train.lr: expected a number, got 'abc'"]
    [unknown] = problems(path, ["train.lrr=1e-4"])
    assert unknown.startswith("--set: train.lrr: unknown key (valid: lr, steps")
    assert problems(path, ["train.lr.x=1"]) == ["--set: train.lr: is a value, not a section"]
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
    assert problems(a_list) == [f"{a_list}: expected a mapping of sections (run:, storage:, ...) at the top "
                                "level, got list"]


def test_credentials_are_refused_with_a_pointer_to_the_aws_environment(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\nstorage: {s3: {aws_secret_access_key: hunter2}}\n")
    [line] = problems(path)
    assert line.startswith(f"{path}: storage.s3.aws_secret_access_key: looks like a credential: secrets never go "
                           "in config files")
    assert "AWS_PROFILE" in line
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
    a, b = load_config(path, schema=DemoConfig), load_config(path, schema=DemoConfig)
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 64
    assert config_hash(load_config(path, ["train.lr=1e-4"], DemoConfig)) != config_hash(a)
    # The resolved config validates to itself: logging and re-loading it reproduces the same run.
    again = validate_config(resolved_dict(a), "resolved", schema=DemoConfig)
    assert resolved_dict(again) == resolved_dict(a) and config_hash(again) == config_hash(a)


def test_hashes_do_not_depend_on_the_directory_or_the_machine_paths(tmp_path: Path, monkeypatch):
    path = write(tmp_path, "run: {name: r}\ndemo: {scenes: 4}\n")
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)
    here = load_config(path, schema=DemoConfig)
    monkeypatch.chdir(second)
    there = load_config(path, ["storage.root=s3://bucket/p", "tracking.uri=http://127.0.0.1:5000",
                               "ray.address=10.0.0.1:6379", "storage.s3.endpoint_url=http://127.0.0.1:9000"],
                        DemoConfig)
    assert here.run.work_dir != there.run.work_dir
    assert (content_hash(here), config_hash(here)) == (content_hash(there), config_hash(there))
    # ... and the paths are recorded (as tags) instead
    assert machine_fields(here)["run.work_dir"] == str(first / "work")
    assert machine_fields(there)["storage.root"] == "s3://bucket/p"


def test_content_hash_covers_what_changes_results_and_the_full_hash_the_rest(tmp_path: Path):
    base = load_config(None, ["run.name=r"], DemoConfig)

    def hashes(*overrides):
        cfg = load_config(None, ["run.name=r", *overrides], DemoConfig)
        return content_hash(cfg), config_hash(cfg)

    for content_key in ("train.lr=1e-4", "run.seed=1", "data.image_size=128", "model.preset=nextdit-small",
                        "demo.scenes=3"):
        content, full = hashes(content_key)
        assert content != content_hash(base) and full != config_hash(base), content_key
    for runtime_key in ("run.name=other", "ray.num_cpus=7", "tracking.experiment=x",
                        "ray.runtime_env.env_vars.OMP_NUM_THREADS=2"):
        content, full = hashes(runtime_key)
        assert content == content_hash(base) and full != config_hash(base), runtime_key
    # A config of another command never shares a hash with this one, even with the same shared keys.
    assert content_hash(load_config(None, ["run.name=r"])) != content_hash(base)


@pytest.mark.parametrize("override", [
    "ray.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY=abc/def",
    "ray.runtime_env.env_vars.AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
    "ray.runtime_env.env_vars.HF_TOKEN=abc",
    "ray.runtime_env.env_vars.WANDB_API_KEY=abc",
    "ray.runtime_env.env_vars.MLFLOW_TRACKING_PASSWORD=abc",
    "ray.runtime_env.env_vars.DB_URL=postgresql://user:hunter2@db:5432/x",
    "ray.runtime_env.env_vars.SOME_VALUE=hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
    "tracking.uri=http://user:hunter2@127.0.0.1:5000",
    "storage.s3.endpoint_url=http://minio:hunter2@127.0.0.1:9000",
])
def test_credentials_anywhere_in_a_config_are_refused_without_echoing_them(override):
    key = override.partition("=")[0]
    lines = problems(None, ["run.name=r", override])
    assert len(lines) == 1 and lines[0].startswith(f"--set: {key}: ")
    assert "credential chain" in lines[0]
    value = override.partition("=")[2]
    assert "hunter2" not in lines[0] and value not in lines[0]  # the message never repeats the value


def test_credentials_in_a_file_are_refused_and_harmless_lookalikes_pass(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\nray: {runtime_env: {env_vars: {GITHUB_TOKEN: ghp_x, "
                           "TOKENIZERS_PARALLELISM: 'false', MAX_TOKENS: 5}}}\n")
    [line] = problems(path)
    assert line.startswith(f"{path}: ray.runtime_env.env_vars.GITHUB_TOKEN: looks like a credential")
    ok = load_config(None, ["run.name=r", "ray.runtime_env.env_vars.TOKENIZERS_PARALLELISM=false",
                            "ray.runtime_env.env_vars.RAY_AUTH_MODE=disabled"])
    assert ok.ray.runtime_env.env_vars["TOKENIZERS_PARALLELISM"] == "false"


def test_every_key_acts_keys_for_later_commands_are_absent():
    # The DeepSpeed trainer's keys belong to its own schema; the demo's loop would silently ignore them.
    for key in ("train.precision=bf16", "train.zero_stage=3", "train.num_workers=2"):
        [line] = problems(None, ["run.name=r", key])
        assert "unknown key (valid: lr, steps, batch_size)" in line
    # Commands without a model (env, jobs) have none of the demo's sections.
    [line] = problems(None, ["run.name=r", "train.lr=1e-4"], schema=OnegenConfig)
    assert line.startswith("--set: train: unknown key (valid: run, storage, tracking, ray)")
    assert set(SCHEMAS) >= {"onegen", "demo"}


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "0", "-1e-3"])
def test_learning_rate_must_be_finite_and_positive(value):
    [line] = problems(None, ["run.name=r", f"train.lr={value}"])
    assert line.startswith("--set: train.lr: expected a")


def test_image_size_must_fit_tokenizer_factor_and_patch_size(tmp_path: Path):
    [line] = problems(None, ["run.name=r", "data.image_size=30"])
    assert line == ("--set: data.image_size: expected a multiple of 4 (tokenizer 'pixel' "
                    "downsamples by 2, model.preset 'nextdit-tiny' has 2x2 patches), got 30")
    assert load_config(None, ["run.name=r", "data.image_size=36"], DemoConfig).data.image_size == 36
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text('{"block_out_channels": [32, 64, 64, 64]}')  # 3 downsamplings: factor 8
    [line] = problems(None, ["run.name=r", f"data.tokenizer={vae}", "data.image_size=36"])
    assert "expected a multiple of 16" in line
    assert load_config(None, ["run.name=r", f"data.tokenizer={vae}", "data.image_size=48"], DemoConfig)


def test_set_addresses_list_items(tmp_path: Path):
    path = write(tmp_path, "run: {name: r}\nray: {runtime_env: {excludes: [a, b]}}\n")
    cfg = load_config(path, ["ray.runtime_env.excludes[1]=c"])
    assert cfg.ray.runtime_env.excludes == ["a", "c"]
    assert problems(path, ["ray.runtime_env.excludes[5]=c"]) == [
        "--set: ray.runtime_env.excludes[5]: no such item "
        "(ray.runtime_env.excludes has 2 items)"]
    assert problems(path, ["run.seed[0]=1"]) == ["--set: run: is a value, not a section"] or \
        problems(path, ["run.seed[0]=1"]) == ["--set: run.seed: is not a list, it has no item [0]"]
    assert problems(path, ["ray.runtime_env.excludes[x]=c"])[0].startswith("--set ray.runtime_env.excludes[x]=…: "
                                                                             "expected KEY=VALUE")


def test_resolved_dict_is_plain_data_and_flattens_to_dotted_keys(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flat = flatten(resolved_dict(default_config(DemoConfig)))
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
        load_config(None, ["run.name=r", "model.preset=nextdit-huge"], DemoConfig)
    assert any("model.preset: expected one of nextdit-small, nextdit-tiny, onediffusion-2.8b, got 'nextdit-huge'"
               in line for line in err.value.problems)
