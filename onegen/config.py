"""Typed onegen configuration: YAML files under configs/ validated into pydantic models.

`load_config(path, overrides)` reads a YAML file, applies `--set a.b.c=value` overrides, validates the result and
fills the defaults that depend on other fields (work dir, storage root, MLflow store). The returned `OnegenConfig`
is the *resolved* configuration: what a run logs (`resolved_dict`) and hashes (`config_hash`).

Every problem is reported at once, one line each, naming the source, the dotted key and what was expected:

    configs/x.yaml: train.lr: expected a number, got 'abc'
    configs/x.yaml: train.lrr: unknown key (valid: lr, steps, batch_size, ...)
    --set train.steps=-1: train.steps: expected a number > 0, got -1

Later issues extend the sections (data, model, train) with their own fields; keep `extra="forbid"` so typos fail.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Keys that look like secrets: credentials come from the standard AWS environment/files, never from configs.
_CREDENTIAL_KEYS = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token", "access_key", "secret_key",
                    "secret_access_key", "session_token", "password", "token"}


class ConfigError(ValueError):
    """A configuration problem; `problems` holds one line per problem, `str()` joins them."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = Field(min_length=1, description="run name; names the MLflow run and output folders")
    work_dir: Path = Field(Path("work"), validate_default=True,
                           description="outputs, sqlite MLflow store, caches; relative to the CWD")
    seed: int = 0

    @field_validator("work_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return Path(value).expanduser().absolute()


class S3Options(_Section):
    """Where S3 is and which profile to use. Credentials never go here (AWS env vars / ~/.aws files)."""

    endpoint_url: str | None = Field(None, description="e.g. http://127.0.0.1:9000; default: AWS_ENDPOINT_URL_S3 / "
                                                       "AWS_ENDPOINT_URL, else AWS")
    region: str | None = None
    profile: str | None = Field(None, description="AWS profile name from ~/.aws/config; default: AWS_PROFILE")

    @field_validator("endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/]+", value):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value


class StorageSection(_Section):
    root: str | None = Field(None, description="local path, file:// or s3:// URI; default <work_dir>/data")
    shared: bool = Field(False, description="true: local paths (storage root, sqlite MLflow store, work dir) are on "
                                            "a file system every Ray node and job sees (NFS, Lustre, ...)")
    s3: S3Options = S3Options()

    @field_validator("root")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from onegen.storage import StorageError, parse_root_uri  # the rule Storage applies, checked up front

        try:
            parse_root_uri(value)
        except StorageError as err:
            raise ValueError(str(err)) from None
        return value


class TrackingSection(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<work_dir>/mlflow.db")
    experiment: str = Field("onegen", min_length=1)
    artifact_location: str | None = Field(None, description="artifact root for a local (sqlite) store; "
                                                            "default <work_dir>/mlartifacts")


class RayRuntimeEnv(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)  # FOO=1 -> "1"
    env_vars: dict[str, str] = Field(default_factory=dict, description="extra env vars for Ray workers")
    excludes: list[str] = Field(default_factory=list, description="extra paths not uploaded with --working-dir .")


class RaySection(_Section):
    address: str | None = Field(None, description="None: RAY_ADDRESS env, else start a local instance; 'local', "
                                                  "'auto', 'HOST:PORT', 'ray://HOST:PORT' or a job-submission "
                                                  "'http://HOST:8265'")
    num_cpus: int | None = Field(None, gt=0, description="logical CPUs of a local instance (default: all)")
    runtime_env: RayRuntimeEnv = RayRuntimeEnv()

    @field_validator("address")
    @classmethod
    def _known_address(cls, value: str | None) -> str | None:
        if value is None or value in ("auto", "local"):
            return value
        if re.match(r"^(ray|https?)://[^/]+", value) or re.match(r"^[\w.\-]+:\d+$", value):
            return value
        raise ValueError("expected 'auto', 'local', 'HOST:PORT', 'ray://HOST:PORT' or 'http://HOST:PORT', "
                         f"got {value!r}")


class ModelSection(_Section):
    preset: str = Field("nextdit-tiny", min_length=1, description="a name in model.nextdit.PRESETS")
    attn_impl: Literal["auto", "flex", "math"] = Field("auto", description="softcap attention path; auto: flex on "
                                                                           "GPU, math on CPU")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from model.presets import PRESETS  # a plain dict module: no torch import

        if value not in PRESETS:
            raise ValueError(f"expected one of {', '.join(sorted(PRESETS))}, got {value!r}")
        return value


class DataSection(_Section):
    image_size: int = Field(256, gt=0, description="training resolution in pixels (square bucket side)")
    tokenizer: str = Field("pixel", min_length=1, description="'pixel' (space-to-depth) or an AutoencoderKL hub id "
                                                              "or local folder")


class TrainSection(_Section):
    lr: float = Field(5e-4, gt=0)
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(8, gt=0, description="global batch size (samples per optimizer step)")
    num_workers: int = Field(1, gt=0, description="Ray Train workers")
    zero_stage: Literal[2, 3] = 2
    precision: Literal["bf16", "fp32"] = "bf16"


class DemoSection(_Section):
    """`onegen demo` (onegen/demo.py): the synthetic world, rendered, trained on and sampled at CPU scale."""

    scenes: int = Field(32, gt=0, description="synthetic scenes rendered")
    scenes_per_shard: int = Field(8, gt=0, description="scenes per WebDataset shard (one Ray task each)")
    views_per_scene: int = Field(2, gt=0)
    shift: float = Field(1.0, gt=0, description="flow-matching time shift")
    sample_steps: int = Field(20, gt=0, description="Euler steps when sampling")
    guidance_scale: float = Field(4.0, ge=0, description="classifier-free guidance scale")
    eval_samples: int = Field(4, gt=0, description="images generated / depth maps scored after training")


class OnegenConfig(_Section):
    run: RunSection
    storage: StorageSection = StorageSection()
    tracking: TrackingSection = TrackingSection()
    ray: RaySection = RaySection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    demo: DemoSection = DemoSection()

    @model_validator(mode="after")
    def _fill_derived_defaults(self) -> "OnegenConfig":
        # Defaults that depend on run.work_dir. Idempotent, so a resolved config validates to itself.
        work_dir = self.run.work_dir
        root = self.storage.root
        if root is None:
            self.storage.root = str(work_dir / "data")
        elif "://" not in root:
            self.storage.root = str(Path(root).expanduser().absolute())
        if self.tracking.uri is None:
            self.tracking.uri = f"sqlite:///{work_dir / 'mlflow.db'}"
        if self.tracking.artifact_location is None:
            self.tracking.artifact_location = str(work_dir / "mlartifacts")
        return self


# --- YAML --------------------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.1 wants 1.0e-4; users write 1e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


# --- loading -----------------------------------------------------------------------------------------------------

def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> OnegenConfig:
    """Load, override and validate a config. `path=None` starts from no file (run.name must then come from --set).

    Raises ConfigError listing every problem, one per line.
    """
    source = str(path) if path is not None else "<no config file>"
    raw = _read_yaml_file(Path(path)) if path is not None else {}
    override_sources: dict[str, str] = {}
    problems: list[str] = []
    if not isinstance(raw, dict):
        return validate_config(raw, source)  # raises: the file is not a mapping
    for item in overrides:
        try:
            dotted, value = _parse_override(item)
            _apply_override(raw, dotted, value, item)
            override_sources[dotted] = f"--set {item}"
        except ConfigError as err:
            problems.extend(err.problems)
    try:
        cfg = validate_config(raw, source, override_sources)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def default_config(**run: Any) -> OnegenConfig:
    """The built-in defaults (no file), for commands that work without a config, e.g. `onegen env`."""
    return OnegenConfig(run={"name": "onegen", **run})


def validate_config(raw: Any, source: str, override_sources: dict[str, str] | None = None) -> OnegenConfig:
    """Validate an already-parsed mapping; errors name `source` (or the `--set` that set the key)."""
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: expected a mapping of sections (run:, train:, ...) at the top level, "
                           f"got {type(raw).__name__}"])
    if "run" not in raw:
        raw = {**raw, "run": {}}  # report the missing field (run.name), not just the missing section
    try:
        return OnegenConfig.model_validate(raw)
    except ValidationError as err:
        override_sources = override_sources or {}
        lines = []
        for error in err.errors():
            dotted = _dotted(error["loc"])
            origin = next((src for key, src in override_sources.items()
                           if dotted == key or dotted.startswith(key + ".")), source)
            lines.append(f"{origin}: {dotted or '<top level>'}: {_explain(error)}")
        raise ConfigError(lines) from None


def resolved_dict(cfg: OnegenConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (what gets logged)."""
    return cfg.model_dump(mode="json")


def resolved_yaml(cfg: OnegenConfig) -> str:
    return yaml.safe_dump(resolved_dict(cfg), sort_keys=False, default_flow_style=False)


def config_hash(cfg: OnegenConfig) -> str:
    """sha256 (hex) of the canonical JSON of the resolved config."""
    canonical = json.dumps(resolved_dict(cfg), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists and empty dicts stay leaves."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _read_yaml_file(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such config file"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    return {} if data is None else data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"--set {item}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4"])
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: keep the string; validation says whether a string is acceptable
    return key, value


def _apply_override(raw: dict[str, Any], dotted: str, value: Any, item: str) -> None:
    """Set raw[a][b][c] = value after checking that a.b.c names a field (mapping fields accept any key)."""
    parts = dotted.split(".")
    kind: Any = OnegenConfig  # the type of the node being descended into
    for depth, part in enumerate(parts):  # check the whole path before touching `raw`
        model = _section_model(kind)
        if model is not None:
            if part not in model.model_fields:
                here = ".".join(parts[: depth + 1])
                valid = ", ".join(model.model_fields)
                raise ConfigError([f"--set {item}: {here}: unknown key (valid: {valid})"])
            kind = model.model_fields[part].annotation
        elif get_origin(kind) is dict:
            kind = get_args(kind)[1]
        else:
            parent = ".".join(parts[:depth])
            raise ConfigError([f"--set {item}: {parent}: is a value, not a section"])
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _section_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = OnegenConfig
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        model = _section_model(model.model_fields[part].annotation)
    return model


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return str(value)


_EXPECTED = {
    "float_parsing": "a number", "float_type": "a number", "finite_number": "a finite number",
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "dict_type": "a mapping", "model_type": "a mapping (a section with keys)",
    "model_attributes_type": "a mapping (a section with keys)", "list_type": "a list",
    "path_type": "a path", "string_too_short": "a non-empty string",
}


def _explain(error: dict[str, Any]) -> str:
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "required field missing"
    if kind == "extra_forbidden":
        key = error["loc"][-1] if error["loc"] else ""
        if str(key).lower() in _CREDENTIAL_KEYS:
            return ("credentials never go in config files: use the standard AWS environment "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE with ~/.aws/credentials)")
        parent = _model_at(tuple(error["loc"][:-1]))
        valid = ", ".join(parent.model_fields) if parent is not None else "?"
        return f"unknown key (valid: {valid})"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_show(value)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "?")
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"expected a number {op} {bound}, got {_show(value)}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '?')}, got {_show(value)}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {_show(value)}"
