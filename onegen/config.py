"""Typed onegen configuration: YAML files under configs/ validated into pydantic models, one schema per command.

`load_config(path, overrides, schema)` reads a YAML file, applies `--set a.b.c=value` / `--set a.list[1].b=value`
overrides, validates the result against `schema` and fills the defaults that depend on other fields (work dir,
storage root, MLflow store). The returned config is the *resolved* configuration: what a run logs.

Schemas: `OnegenConfig` holds the sections every command shares (`run`, `storage`, `tracking`, `ray`); each command
that needs more extends it (`DemoConfig`; the build, train, evaluate and retrain schemas follow). A command validates,
logs and hashes only its own sections, so every key in a schema acts: there is no key "for later".

Every problem is reported at once, one line each, naming the source, the dotted key and what was expected:

    configs/x.yaml: train.lr: expected a number, got 'abc'
    configs/x.yaml: train.lrr: unknown key (valid: lr, steps, batch_size)
    --set train.steps=-1: train.steps: expected a number > 0, got -1

Hashes (INTERFACES §1). Each field has a role:
  * content (default): changes output bytes or the maths (seeds, sizes, models, tokenizers, lr, ...);
  * runtime: how or where it runs without changing the result (run name, experiment, CPU counts, worker env);
  * machine: paths, addresses and endpoints of this machine or cluster.
`content_hash` covers content fields and gates every "changed config" refusal; `config_hash` (the full hash) covers
content + runtime fields. Neither covers machine fields, so the same config hashes the same from any directory on
any machine; machine fields are recorded as MLflow tags instead (`machine_fields`). Secrets are never in a config
(refused at load time, onegen.secrets).
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.limits import MAX_IMAGE_SIDE  # the one bound on image sides (configs, flags, pipeline); no torch
from onegen.secrets import CREDENTIAL_HINT, is_secret_name, redact, redact_value, secret_problems

CONTENT, RUNTIME, MACHINE = "content", "runtime", "machine"


def _role(role: str) -> dict[str, Any]:
    return {"json_schema_extra": {"role": role}}


def _hashed_if_set() -> dict[str, Any]:
    """A field added after builds and runs exist: left out of the hashes (and the recorded fields) while at its
    default, so their hashes stay what they were and they resume."""
    return {"json_schema_extra": {"hashed_if_set": True}}


class ConfigError(ValueError):
    """A configuration problem; `problems` holds one line per problem, `str()` joins them. Every line is redacted
    here, once for all messages: a problem line may quote what the user typed (a key, a --set, a path), and that
    must never repeat a password or a token (onegen.secrets)."""

    def __init__(self, problems: list[str]):
        self.problems = [redact(line) for line in problems]
        super().__init__("\n".join(self.problems))

# Names that become one path part (run.name, build.name, later stage and model names): letters, digits, '.', '_',
# '-', starting with a letter or digit, no '..', so a name can never climb out of run.work_dir or storage.root.
SAFE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SAFE_NAME_MAX = 128


def check_safe_name(value: str | None) -> str | None:
    """A field validator: `value` unchanged, or a ValueError saying why it cannot be a path part."""
    if value is not None and (not SAFE_NAME_PATTERN.match(value) or ".." in value or len(value) > SAFE_NAME_MAX):
        raise ValueError(f"expected a name of letters, digits, '.', '_' and '-' (it becomes a folder name: no '/', "
                         f"no '..', starting with a letter or digit, at most {SAFE_NAME_MAX} characters), "
                         f"got {value!r}")
    return value


def _wants_number(annotation: Any) -> bool:
    """True for int / float fields (optional or not): a YAML boolean there is a mistake, never a number."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    args = set(get_args(annotation)) - {type(None)} if get_origin(annotation) is not None else {annotation}
    return bool(args) and bool not in args and args <= {int, float}


def boolean_number_problems(raw: Any, kind: Any, loc: tuple[Any, ...] = ()) -> list[tuple[str, str]]:
    """(dotted key, problem) for every YAML boolean where the schema `kind` wants a number. pydantic's lax mode
    reads true as 1 and false as 0, and YAML reads yes/no/on/off as booleans, so `steps: yes` or `--set lr=true`
    would silently run with 1; refused instead. (A pre-pass over the raw data rather than a "*" field validator:
    pydantic forbids before-validators on the discriminator field of `build.sources` items.)"""
    kind = _unwrap_optional(kind)
    while get_origin(kind) is Annotated:
        kind = get_args(kind)[0]
    found: list[tuple[str, str]] = []
    model = _section_model(kind)
    if model is None and isinstance(raw, dict):
        model = _member_for_type(kind, raw.get("type"))  # an item of a list of typed sections (build.sources)
    if model is not None and isinstance(raw, dict):
        for key, value in raw.items():
            if key in model.model_fields:
                found += boolean_number_problems(value, model.model_fields[key].annotation, (*loc, key))
    elif get_origin(kind) is dict and isinstance(raw, dict):
        for key, value in raw.items():
            found += boolean_number_problems(value, get_args(kind)[1], (*loc, key))
    elif get_origin(kind) in (list, tuple) and isinstance(raw, list):
        args = [arg for arg in get_args(kind) if arg is not ...]
        for index, value in enumerate(raw):
            item_kind = args[0] if get_origin(kind) is list or len(args) == 1 else args[min(index, len(args) - 1)]
            found += boolean_number_problems(value, item_kind, (*loc, index))
    elif isinstance(raw, bool) and _wants_number(kind):
        found.append((_dotted(loc), f"expected a number, got {str(raw).lower()} (a YAML boolean: YAML reads "
                                    "true/false/yes/no/on/off as booleans)"))
    return found


def _member_for_type(annotation: Any, type_name: Any) -> type[BaseModel] | None:
    """The member of a union of sections whose `type` literal is `type_name`, or None."""
    for member in filter(None, map(_section_model, get_args(annotation))):
        field = member.model_fields.get("type")
        if field is not None and type_name in get_args(field.annotation):
            return member
    return None


class _Section(BaseModel):
    # allow_inf_nan=False: lr=inf or shift=nan is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def not_a_folder_problem(path: Path) -> str | None:
    """Why a local folder path can never be a folder (it, or a parent, is a file), or None. Whether it can be
    created is checked where it is created (onegen.preflight): a config may be checked on another machine."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                which = "is" if candidate == path else f"is inside {candidate}, which is"
                return f"{path} {which} a file, not a folder: point it at a folder (it is created if missing)"
            return None
    return None


class RunSection(_Section):
    name: str = Field(min_length=1, description="run name; names the MLflow run and output folders", **_role(RUNTIME))
    work_dir: Path = Field(Path("work"), validate_default=True,
                           description="outputs, sqlite MLflow store, caches; relative to the CWD", **_role(MACHINE))
    seed: int = 0

    _safe_name = field_validator("name")(check_safe_name)

    @field_validator("work_dir", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("expected a folder path, got an empty string (write . for the current folder)")
        return value

    @field_validator("work_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        path = Path(value).expanduser().absolute()
        if (problem := not_a_folder_problem(path)):
            raise ValueError(problem)
        return path


class S3Options(_Section):
    """Where S3 is and which profile to use. Credentials never go here (AWS env vars / ~/.aws files)."""

    endpoint_url: str | None = Field(None, description="e.g. http://127.0.0.1:9000; default: AWS_ENDPOINT_URL_S3 / "
                                                       "AWS_ENDPOINT_URL, else AWS")
    region: str | None = Field(None, description="default: the bucket's own region, discovered")
    profile: str | None = Field(None, description="AWS profile name from ~/.aws/config; default: AWS_PROFILE")

    @field_validator("endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/]+", value):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value


class StorageSection(_Section):
    root: str | None = Field(None, description="local path, file:// or s3:// URI; default <work_dir>/data",
                             **_role(MACHINE))
    shared: bool = Field(False, description="true: local paths (storage root, sqlite MLflow store and artifacts) "
                                            "are on a file system every Ray node sees (NFS, Lustre, ...); never "
                                            "lifts the refusal of paths inside a submitted job's working dir",
                         **_role(MACHINE))
    s3: S3Options = Field(S3Options(), **_role(MACHINE))

    @field_validator("root")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from onegen.storage import StorageError, parse_root_uri  # the rule Storage applies, checked up front

        try:
            scheme, _, _, local = parse_root_uri(value)
        except StorageError as err:
            raise ValueError(str(err)) from None
        if scheme == "file" and (problem := not_a_folder_problem(Path(local).expanduser().absolute())):
            raise ValueError(problem)
        return value


# MLflow tracking URIs onegen accepts. A bare folder or file: URI (MLflow's file store) is refused: MLflow 3 keeps
# that store in maintenance mode and refuses to create one.
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


class TrackingSection(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<work_dir>/mlflow.db",
                            **_role(MACHINE))

    experiment: str = Field("onegen", min_length=1, **_role(RUNTIME))
    artifact_location: str | None = Field(None, description="artifact root for a local (sqlite) store; "
                                                            "default <work_dir>/mlartifacts", **_role(MACHINE))

    @field_validator("uri")
    @classmethod
    def _usable_store(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.split(":", 1)[0].split("+", 1)[0].lower() if ":" in value else value.lower()
        if scheme in ("http", "https"):
            try:
                parts = urllib.parse.urlsplit(value)
                parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
            except ValueError as err:
                raise ValueError(f"{err} in {value!r}: expected http(s)://HOST:PORT") from None
            if not parts.hostname:
                raise ValueError(f"expected http(s)://HOST:PORT, got {value!r} (no host)")
        if scheme not in TRACKING_SCHEMES or (scheme != "databricks" and "://" not in value):
            folder = Path(value.removeprefix("file://").removeprefix("file:") or "mlruns").expanduser().absolute()
            raise ValueError(f"expected sqlite:///ABS/PATH/mlflow.db (a local store), http(s)://HOST:PORT (an "
                             f"`mlflow server`) or a database URI ({', '.join(TRACKING_SCHEMES)}), got {value!r}; "
                             "MLflow no longer creates a store in a bare folder or file: URI, so to keep it there "
                             f"write sqlite:///{folder}/mlflow.db")
        return value


class RayRuntimeEnv(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)  # FOO=1 -> "1"
    env_vars: dict[str, str] = Field(default_factory=dict, description="extra env vars for Ray workers (never "
                                                                       "secrets: the dashboard shows them)")
    excludes: list[str] = Field(default_factory=list, description="extra paths not uploaded with --working-dir .")

    @field_validator("env_vars", mode="before")
    @classmethod
    def _yaml_booleans_as_env_text(cls, value: Any) -> Any:
        # FOO: false in YAML is a bool; an environment variable holds the text "false", not "False".
        if isinstance(value, dict):
            return {key: str(item).lower() if isinstance(item, bool) else item for key, item in value.items()}
        return value


class RaySection(_Section):
    address: str | None = Field(None, description="None: RAY_ADDRESS env, else start a local instance; 'local', "
                                                  "'auto', 'HOST:PORT', 'ray://HOST:PORT' or a job-submission "
                                                  "'http://HOST:8265'", **_role(MACHINE))
    num_cpus: int | None = Field(None, gt=0, description="logical CPUs of a local instance (default: all)",
                                 **_role(RUNTIME))
    object_store_memory: int | None = Field(None, gt=0, description="bytes of object store for a local instance "
                                                                    "(default: Ray's, 30% of RAM)", **_role(RUNTIME))
    runtime_env: RayRuntimeEnv = Field(RayRuntimeEnv(), **_role(RUNTIME))

    @field_validator("address")
    @classmethod
    def _known_address(cls, value: str | None) -> str | None:
        if value is None or value in ("auto", "local"):
            return value
        if re.match(r"^(ray|https?)://[^/]+", value) or re.match(r"^[\w.\-]+:\d+$", value):
            return value
        raise ValueError("expected 'auto', 'local', 'HOST:PORT', 'ray://HOST:PORT' or 'http://HOST:PORT', "
                         f"got {value!r}")


class OnegenConfig(_Section):
    """The sections every command shares. Commands with more to configure extend this class."""

    run: RunSection
    storage: StorageSection = StorageSection()
    tracking: TrackingSection = TrackingSection()
    ray: RaySection = RaySection()

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

    def cross_field_problems(self) -> list[tuple[str, str]]:
        """(dotted key, problem) for rules that tie fields together; checked after each field is valid."""
        return []


# --- the demo's schema -------------------------------------------------------------------------------------------

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
    image_size: int = Field(256, gt=0, le=MAX_IMAGE_SIDE, description="training resolution in pixels (square "
                                                                     "bucket side)")
    tokenizer: str = Field("pixel", min_length=1, description="'pixel' (space-to-depth) or an AutoencoderKL hub id "
                                                              "or local folder")


class DemoTrainSection(_Section):
    """The demo's in-process training loop. The DeepSpeed trainer's keys (workers, ZeRO stage, precision) belong to
    its own schema, where they act."""

    lr: float = Field(5e-4, gt=0)
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(8, gt=0, description="samples per optimizer step")


class DemoSection(_Section):
    """`onegen demo` (onegen/cli/demo.py): the synthetic world, rendered, trained on and sampled at CPU scale."""

    scenes: int = Field(32, gt=0, description="synthetic scenes rendered")
    scenes_per_shard: int = Field(8, gt=0, description="scenes per WebDataset shard (one Ray task each)")
    views_per_scene: int = Field(2, gt=0)
    shift: float = Field(1.0, gt=0, description="flow-matching time shift")
    sample_steps: int = Field(20, gt=0, description="Euler steps when sampling")
    guidance_scale: float = Field(4.0, ge=0, description="classifier-free guidance scale")
    eval_samples: int = Field(4, gt=0, description="images generated / depth maps scored after training")


class DemoConfig(OnegenConfig):
    """`onegen demo`: the shared sections plus the model, data, training loop and demo settings it uses."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: DemoTrainSection = DemoTrainSection()
    demo: DemoSection = DemoSection()

    def cross_field_problems(self) -> list[tuple[str, str]]:
        problems = super().cross_field_problems()
        factor = image_tokenizer_factor(self.data.tokenizer)
        problem = image_size_problem(self, factor) if factor is not None else None
        if problem:
            problems.append(("data.image_size", problem))
        return problems


def image_size_problem(cfg: DemoConfig, factor: int) -> str | None:
    """Why `data.image_size` does not fit a tokenizer that downsamples by `factor` and the preset's patches, or None.
    Config validation uses the factor read without loading (`image_tokenizer_factor`); a command that has loaded the
    tokenizer checks again with the factor it really has."""
    from model.presets import PRESETS

    patch = PRESETS[cfg.model.preset]["patch_size"][-1]
    if cfg.data.image_size % (factor * patch) == 0:
        return None
    return (f"expected a multiple of {factor * patch} (tokenizer '{cfg.data.tokenizer}' downsamples by {factor}, "
            f"model.preset '{cfg.model.preset}' has {patch}x{patch} patches), got {cfg.data.image_size}")


def image_tokenizer_factor(tokenizer: str) -> int | None:
    """Pixels per latent pixel of `data.tokenizer`, read without loading weights: 2 for the pixel tokenizer; for a
    local AutoencoderKL folder 2^(levels-1) from its config.json; 8 (every SD/Flux-class VAE) for a hub id; None
    when a local folder has no readable config (loading it reports that)."""
    if tokenizer == "pixel":
        return 2
    folder = Path(tokenizer).expanduser()
    for config_file in (folder / "config.json", folder / "vae" / "config.json"):
        if config_file.is_file():
            try:
                return 2 ** (len(json.loads(config_file.read_text())["block_out_channels"]) - 1)
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None if folder.exists() else 8


# Schemas by command, for `onegen config check` (which schema a file is for) and for commands that take a config.
SCHEMAS: dict[str, type[OnegenConfig]] = {"onegen": OnegenConfig, "demo": DemoConfig}


def read_sections(path: str | Path) -> set[str]:
    """The top-level keys of a config file (empty when it cannot be read: loading it then reports why)."""
    try:
        raw = _read_yaml_file(Path(path))
    except ConfigError:
        return set()
    return {str(key) for key in raw} if isinstance(raw, dict) else set()


def schema_for_sections(sections: set[str]) -> type[OnegenConfig]:
    """The smallest schema that has all of `sections` (a file's top-level keys); the base one if none has."""
    for schema in sorted(SCHEMAS.values(), key=lambda s: len(s.model_fields)):
        if sections <= set(schema.model_fields):
            return schema
    return OnegenConfig


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

def load_config(path: str | Path | list | tuple | None, overrides: list[str] | tuple[str, ...] = (),
                schema: type[OnegenConfig] = OnegenConfig) -> OnegenConfig:
    """Load, override and validate a config against `schema`. `path=None` starts from no file (run.name must then
    come from --set); a list of files is `onegen train --stages`' concatenation (concatenated_stages). Raises
    ConfigError listing every problem, one per line."""
    if isinstance(path, (list, tuple)):
        source, raw = " + ".join(map(str, path)), concatenated_stages(path)
    else:
        source = str(path) if path is not None else "<no config file>"
        raw = _read_yaml_file(Path(path)) if path is not None else {}
    override_sources: dict[str, str] = {}
    problems: list[str] = []
    if not isinstance(raw, dict):
        return validate_config(raw, source, schema=schema)  # raises: the file is not a mapping
    for item in overrides:
        try:
            dotted, value = _parse_override(item)
            dotted = _command_shorthand(dotted, schema)
            _apply_override(raw, dotted, value, item, schema)
            override_sources[dotted] = set_label(item)
        except ConfigError as err:
            problems.extend(err.problems)
    try:
        cfg = validate_config(raw, source, override_sources, schema=schema)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def concatenated_stages(paths: list | tuple) -> dict:
    """`onegen train --stages a.yaml b.yaml`: one config whose `train.stages` is the files' stages in order
    (INTERFACES §1). Every other key may be set by several files only to the same value: a stage file that changes
    a shared key (the optimizer, the batch, the builds) would change every stage, so it is refused, naming both."""
    merged: dict = {}
    stages: list = []
    origin: dict[str, str] = {}
    problems: list[str] = []

    def merge(into: dict, data: dict, prefix: str, path: str) -> None:
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            if dotted == "train.stages":
                stages.extend(value if isinstance(value, list) else [value])
            elif isinstance(value, dict | None) and isinstance(into.get(key, {}), dict):  # None: an empty section
                merge(into.setdefault(key, {}), value or {}, f"{dotted}.", path)
            elif key in into and into[key] != value:
                problems.append(f"{path}: {dotted}: {value!r} differs from {into[key]!r} in "
                                f"{origin.get(dotted, 'an earlier file')}; stage files share every key but "
                                "train.stages: give it the same value in each file")
            else:
                into[key] = value
                origin.setdefault(dotted, path)

    for path in paths:
        data = _read_yaml_file(Path(path))
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: expected a mapping of sections (run:, train:, ...), got "
                               f"{type(data).__name__}"])
        merge(merged, data, "", str(path))
    if problems:
        raise ConfigError(problems)
    if stages:
        merged.setdefault("train", {})["stages"] = stages
    return merged


def default_config(schema: type[OnegenConfig] = OnegenConfig, **run: Any) -> OnegenConfig:
    """The built-in defaults (no file), for commands that work without a config, e.g. `onegen env`."""
    return schema(run={"name": "onegen", **run})


def validate_config(raw: Any, source: str, override_sources: dict[str, str] | None = None, *,
                    schema: type[OnegenConfig] = OnegenConfig) -> OnegenConfig:
    """Validate an already-parsed mapping; errors name `source` (or the `--set` that set the key)."""
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: expected a mapping of sections (run:, storage:, ...) at the top level, "
                           f"got {type(raw).__name__}"])
    override_sources = override_sources or {}

    def origin(dotted: str) -> str:
        return next((src for key, src in override_sources.items()
                     if dotted == key or dotted.startswith((key + ".", key + "["))), source)

    secrets = secret_problems(raw)
    lines = [f"{origin(dotted)}: {dotted}: {reason}: {CREDENTIAL_HINT}" for dotted, reason in secrets]
    secret_keys = {dotted for dotted, _ in secrets}
    lines += [f"{origin(dotted)}: {dotted}: {problem}" for dotted, problem in boolean_number_problems(raw, schema)
              if dotted not in secret_keys]
    if "run" not in raw:
        raw = {**raw, "run": {}}  # report the missing field (run.name), not just the missing section
    try:
        cfg = schema.model_validate(raw)
    except ValidationError as err:
        for error in err.errors():
            dotted = _dotted(_without_union_tags(error["loc"], schema))
            if dotted in secret_keys:
                continue  # already reported as a credential, without its value
            lines.append(f"{origin(dotted)}: {dotted or '<top level>'}: {_explain(error, schema)}")
        raise ConfigError(lines) from None
    if lines:
        raise ConfigError(lines)
    lines += [f"{origin(dotted)}: {dotted}: {problem}" for dotted, problem in cfg.cross_field_problems()]
    if lines:
        raise ConfigError(lines)
    return cfg


# --- what gets logged and hashed -------------------------------------------------------------------------------

def resolved_dict(cfg: OnegenConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (what the config artifact holds), secrets redacted."""
    return redact_value("", cfg.model_dump(mode="json"))


def resolved_yaml(cfg: OnegenConfig) -> str:
    return yaml.safe_dump(resolved_dict(cfg), sort_keys=False, default_flow_style=False)


def fields_by_role(cfg: BaseModel, roles: set[str], prefix: str = "", inherited: str = CONTENT) -> dict[str, Any]:
    """{dotted key: JSON value} of the fields whose role is in `roles`. A section's role applies to its fields
    unless they name their own; mappings flatten to dotted keys (env_vars.FOO), lists are leaves."""
    out: dict[str, Any] = {}
    for name, info in type(cfg).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        role = extra.get("role", inherited)
        value = getattr(cfg, name)
        if extra.get("hashed_if_set") and value == info.default:
            continue
        dotted = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(fields_by_role(value, roles, dotted + ".", role))
        elif isinstance(value, list) and value and all(isinstance(item, BaseModel) for item in value):
            # A list of sections (build.sources): each item keeps its own fields' roles, so a runtime knob inside
            # a list item (download threads) stays out of the content hash.
            items = [fields_by_role(item, roles, "", role) for item in value]
            if any(items):
                out[dotted] = items
        elif role in roles:
            value = redact_value(name, _json(value))
            out.update(flatten(value, dotted + ".") if isinstance(value, dict) and value else {dotted: value})
    return out


def machine_fields(cfg: OnegenConfig) -> dict[str, Any]:
    """Paths, addresses and endpoints: recorded (MLflow tags), never hashed."""
    return fields_by_role(cfg, {MACHINE})


def content_hash(cfg: OnegenConfig) -> str:
    """sha256 of the keys that change output bytes or the maths: gates "changed config" refusals."""
    return _sha256(_switched_on(fields_by_role(cfg, {CONTENT})), type(cfg))


def config_hash(cfg: OnegenConfig) -> str:
    """The full hash: sha256 of every key but machine paths and addresses (content + runtime)."""
    return _sha256(_switched_on(fields_by_role(cfg, {CONTENT, RUNTIME})), type(cfg))


def _switched_on(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` without the sections switched off (`SECTION.enabled: false`, e.g. a labeler): a stage that does not
    run changes no bytes, so its settings, and a stage added to the schema later, leave the hashes of builds and
    runs that do not use it as they were."""
    off = tuple(key[:-len("enabled")] for key, value in fields.items() if key.endswith(".enabled") and value is False)
    return {key: value for key, value in fields.items() if not key.startswith(off)} if off else fields


def _sha256(fields: dict[str, Any], schema: type[OnegenConfig]) -> str:
    # The schema's name is hashed too: a demo config and a build config with equal shared keys are different runs.
    canonical = json.dumps({"schema": schema.__name__, "fields": fields}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # Path -> str; the form the config artifact holds


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


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; a bigger "config" is the wrong file (or /dev/zero)


def _read_yaml_file(path: Path) -> Any:
    try:
        if path.exists() and not path.is_file() and not path.is_dir():
            raise ConfigError([f"{path}: not a regular file (a device, FIFO or socket); pass a .yaml file"])
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such config file"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a config file; pass a .yaml file"])
    if b"\0" in data[:8192]:
        raise ConfigError([f"{path}: is a binary file, not a YAML config (pass a .yaml file, e.g. configs/demo.yaml)"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}): "
                           "save the config as UTF-8"]) from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        if isinstance(err, (yaml.constructor.ConstructorError, yaml.composer.ComposerError)):
            # "undefined alias 'x'", "constructor for the tag '!x'": x is the user's value (a password starting
            # with '*' or '!', say); the line number is enough to find it.
            problem = re.sub(r"'[^']*'", "'…'", problem) + " (quote values that start with '*', '&' or '!')"
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    return {} if data is None else data


# --- --set KEY=VALUE ---------------------------------------------------------------------------------------------

_KEY_PART = re.compile(r"^(?P<name>[^.\[\]]+)(?P<indexes>(?:\[\d+\])*)$")


def set_label(item: str) -> str:
    """How a `--set` item is named in messages: "--set", then the message names the dotted key; never the value,
    which may be a secret the message would repeat (the explanation quotes non-secret values where that helps).
    An item with no '=' is shown whole (redacted by ConfigError): it has no value to hide."""
    return "--set" if "=" in item else f"--set {item}"


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not _KEY_PART.match(part) for part in key.split(".")):
        shown = f"--set {key}=…" if sep else f"--set {item}"  # the key, never the value (a secret, maybe)
        raise ConfigError([f"{shown}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4 or "
                           "train.stages[1].steps=500"])
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: keep the string; validation says whether a string is acceptable
    return key, value


def _command_shorthand(dotted: str, schema: type[OnegenConfig]) -> str:
    """`sources[0].path` -> `build.sources[0].path`: a key that is no top-level section but a key of exactly one of
    the command's own sections (not run/storage/tracking/ray) may leave that section's name out."""
    first = _key_path(dotted)[0]
    if first in schema.model_fields:
        return dotted
    own = [name for name in schema.model_fields if name not in OnegenConfig.model_fields
           and (model := _section_model(_unwrap_optional(schema.model_fields[name].annotation))) is not None
           and first in model.model_fields]
    return f"{own[0]}.{dotted}" if len(own) == 1 else dotted


def _key_path(dotted: str) -> list[str | int]:
    """'a.b[1].c' -> ['a', 'b', 1, 'c']."""
    path: list[str | int] = []
    for part in dotted.split("."):
        match = _KEY_PART.match(part)
        assert match is not None  # _parse_override checked the shape
        path.append(match["name"])
        path += [int(index) for index in re.findall(r"\[(\d+)\]", match["indexes"])]
    return path


def _apply_override(raw: dict[str, Any], dotted: str, value: Any, item: str,
                    schema: type[OnegenConfig] = OnegenConfig) -> None:
    """Set raw[a][b][i][c] = value after checking that the path names a field of `schema` (mapping fields accept any
    key; a list index must name an existing item, from the file or the defaults)."""
    path = _key_path(dotted)
    kind: Any = schema  # the type of the node being descended into
    for depth, part in enumerate(path):  # check the whole path before touching `raw`
        here = _dotted(tuple(path[: depth + 1]))
        parent = _dotted(tuple(path[:depth])) or "<top level>"
        model = _section_model(kind)
        if model is None and not isinstance(part, int):
            model = _union_member_with(kind, part)  # a list of typed sections (build.sources: urls | folder | ...)
        if isinstance(part, int):
            if get_origin(kind) is not list:
                raise ConfigError([f"{set_label(item)}: {parent}: is not a list, it has no item [{part}]"])
            kind = get_args(kind)[0]
        elif model is not None:
            if part not in model.model_fields:
                valid = ", ".join(model.model_fields)
                raise ConfigError([f"{set_label(item)}: {here}: unknown key (valid: {valid})"])
            kind = _unwrap_optional(model.model_fields[part].annotation)
        elif get_origin(kind) is dict:
            kind = get_args(kind)[1]
        else:
            raise ConfigError([f"{set_label(item)}: {parent}: is a value, not a section"])
    node: Any = raw
    for depth, part in enumerate(path[:-1]):
        following = path[depth + 1]
        if isinstance(part, int):
            node = _list_item(node, part, path[:depth], item)
            continue
        child = node.get(part)
        if isinstance(following, int):
            if not isinstance(child, list):
                child = node[part] = _default_list(path[: depth + 1], schema)
        elif not isinstance(child, dict):
            child = node[part] = {}
        node = child
    last = path[-1]
    if isinstance(last, int):
        _list_item(node, last, path[:-1], item)  # the item must exist: an override replaces, never appends
    node[last] = value


def _list_item(items: list[Any], index: int, list_path: list[str | int], item: str) -> Any:
    if index >= len(items):
        where = _dotted(tuple(list_path))
        have = f"has {len(items)} item{'' if len(items) == 1 else 's'}" if items else "is empty"
        raise ConfigError([f"{set_label(item)}: {where}[{index}]: no such item ({where} {have})"])
    return items[index]


def _default_list(list_path: list[str | int], schema: type[OnegenConfig]) -> list[Any]:
    """The schema's default for a list field (as raw data), so `--set a.list[0].x=1` can address default items."""
    node: Any = schema.model_construct()
    for part in list_path:
        node = node[part] if isinstance(part, int) else getattr(node, part, None)
        if node is None:
            return []
    if not isinstance(node, list):
        return []
    return [item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in node]


def _unwrap_optional(annotation: Any) -> Any:
    """`X | None` -> X (for walking the schema)."""
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) is not None and len(args) == 1 and get_origin(annotation) not in (list, dict):
        return args[0]
    return annotation


def _union_member_with(annotation: Any, key: str) -> type[BaseModel] | None:
    """For a (discriminated) union of sections: the first member that has `key` (the checks of the member the
    value really is are pydantic's, at validation)."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    members = [arg for arg in get_args(annotation) if _section_model(arg) is not None]
    return next((m for m in members if key in m.model_fields), members[0] if members else None)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _model_at(loc: tuple[Any, ...], schema: type[OnegenConfig]) -> type[BaseModel] | None:
    kind: Any = schema
    for part in loc:
        if isinstance(part, int):
            kind = get_args(kind)[0] if get_origin(kind) is list else None
            continue
        model = _section_model(kind)
        if model is None or part not in model.model_fields:
            return None
        kind = _unwrap_optional(model.model_fields[part].annotation)
    return _section_model(kind)


def _without_union_tags(loc: tuple[Any, ...], schema: type[OnegenConfig]) -> tuple[Any, ...]:
    """pydantic puts the member's tag in the location of an error inside a discriminated union item
    (build.sources[0].synthetic.size); the user wrote build.sources[0].size."""
    kind: Any = schema
    kept: list[Any] = []
    for part in loc:
        kind = _unwrap_optional(kind)
        while get_origin(kind) is Annotated:
            kind = get_args(kind)[0]
        model = _section_model(kind)
        if isinstance(part, int):
            kind = get_args(kind)[0] if get_origin(kind) in (list, tuple) and get_args(kind) else None
        elif model is not None and part in model.model_fields:
            kind = model.model_fields[part].annotation
        elif model is None and kind is not None and (member := _member_for_type(kind, part)) is not None:
            kind = member
            continue  # the tag: not a key the user wrote
        else:
            kind = None
        kept.append(part)
    return tuple(kept)


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


def _explain(error: dict[str, Any], schema: type[OnegenConfig]) -> str:
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "required field missing"
    if kind == "extra_forbidden":
        key = error["loc"][-1] if error["loc"] else ""
        if is_secret_name(str(key)):
            return CREDENTIAL_HINT
        parent = _model_at(tuple(error["loc"][:-1]), schema)
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


# The build and train schemas live in their own modules (they are big) and add themselves to SCHEMAS; importing them
# here means every user of SCHEMAS (`onegen config check`, the CLI) sees them, whichever module was imported first.
import onegen.build_config  # noqa: E402,F401 - needs the classes above
import onegen.train_config  # noqa: E402,F401 - needs the classes above
