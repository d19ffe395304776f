"""Connect to Ray (or start a local instance) and describe the runtime env of `ray job submit --working-dir .` jobs.

Where to connect, first match wins:
  1. inside a submitted job: the job's own cluster (the job supervisor sets RAY_ADDRESS);
  2. config `ray.address` ('auto', 'HOST:PORT', 'ray://HOST:10001'; 'local' forces a new local instance);
  3. the RAY_ADDRESS environment variable;
  4. nothing: start a local instance with `ray.num_cpus` CPUs and no dashboard.

Environment variables for Ray workers are set in ONE place (STACK gotcha #3: a job's runtime env and the driver's
`ray.init(runtime_env=...)` must not both set the same keys): `job_runtime_env()` for submitted jobs, `init_ray()`
for drivers started directly; inside a job `init_ray()` adds nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onegen.config import OnegenConfig, default_config

if TYPE_CHECKING:
    import ray

# Set by Ray's job supervisor in the environment of a submitted job's entry point.
_JOB_MARKER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# Driver environment forwarded to workers (cluster nodes do not share the driver's shell). Never credentials:
# runtime envs are visible in the dashboard; workers get AWS credentials from their own environment/instance role.
FORWARDED_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "WANDB_MODE", "NO_ALBUMENTATIONS_UPDATE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")

# Not uploaded with --working-dir . (gitignore-style patterns; Ray also honours .gitignore). No trailing "/": Ray
# matches folder paths without one, and a matched folder is skipped whole instead of walked file by file.
JOB_EXCLUDES = ["/.venv", "/.git", "/work", "/mlruns", "/mlartifacts", "mlflow.db", "__pycache__", "*.egg-info",
                ".pytest_cache", "/tests/data", "*.safetensors", "*.pt", "*.ckpt"]


def in_submitted_job() -> bool:
    """True inside the entry point of a `ray job submit` job (and its subprocesses)."""
    return _JOB_MARKER_ENV in os.environ


def resolve_ray_address(cfg: OnegenConfig | None = None) -> str | None:
    """The address `init_ray` will connect to, or None for "start a local instance"."""
    if in_submitted_job():
        return os.environ.get("RAY_ADDRESS") or "auto"
    configured = cfg.ray.address if cfg is not None else None
    if configured == "local":
        return None
    return configured or os.environ.get("RAY_ADDRESS") or None


def describe_ray_address(cfg: OnegenConfig | None = None) -> str:
    """Human-readable form of `resolve_ray_address`, without connecting."""
    address = resolve_ray_address(cfg)
    if address is None:
        cpus = cfg.ray.num_cpus if cfg is not None and cfg.ray.num_cpus else "all"
        return f"local (a new Ray instance on this machine, {cpus} CPUs)"
    return address


def worker_env_vars(cfg: OnegenConfig) -> dict[str, str]:
    """Env vars Ray workers need: forwarded from this environment, then `ray.runtime_env.env_vars` on top."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env.update(cfg.ray.runtime_env.env_vars)
    return env


def job_runtime_env(cfg: OnegenConfig, working_dir: str = ".") -> dict[str, Any]:
    """Runtime env for `ray job submit --working-dir . --runtime-env-json ...` or JobSubmissionClient.submit_job:
    the project folder (without venv, outputs, .git), the worker env vars and the git commit (the upload has no
    .git, so `tracking.git_state` reads ONEGEN_GIT_COMMIT instead)."""
    from onegen.tracking import git_state

    excludes = list(JOB_EXCLUDES)
    try:  # the work dir lives inside the project by default; never upload it
        rel = Path(cfg.run.work_dir).resolve().relative_to(Path(working_dir).resolve())
        if str(rel) != "." and f"/{rel.as_posix()}" not in excludes:
            excludes.append(f"/{rel.as_posix()}")
    except ValueError:
        pass
    excludes += [pattern for pattern in cfg.ray.runtime_env.excludes if pattern not in excludes]
    commit, dirty = git_state(working_dir)
    env_vars = {"ONEGEN_GIT_COMMIT": commit, "ONEGEN_GIT_DIRTY": dirty, **worker_env_vars(cfg)}
    return {"working_dir": working_dir, "excludes": excludes, "env_vars": env_vars}


def init_ray(cfg: OnegenConfig | None = None, *, address: str | None = None) -> "ray":
    """Connect to (or start) Ray once per process; later calls return at once. Returns the `ray` module.

    `address` overrides the resolution above (except inside a submitted job, which always uses its cluster)."""
    import ray

    if ray.is_initialized():
        return ray
    cfg = cfg or default_config()
    if in_submitted_job():
        # The job's runtime env (working dir, env vars) already applies to every task; adding one here conflicts.
        ray.init(address=resolve_ray_address(cfg))
        return ray
    target = address or resolve_ray_address(cfg)
    if target is not None and target.startswith(("http://", "https://")):
        raise ValueError(f"ray.address {target!r} is a job-submission (dashboard) address: submit with "
                         f"`ray job submit --address {target} --working-dir . -- python -m ...`, or connect a "
                         "driver with 'auto', 'HOST:6379' or 'ray://HOST:10001'")
    env_vars = worker_env_vars(cfg)
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if target is None or target == "local":
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env=runtime_env)
        return ray
    try:
        ray.init(address=target, runtime_env=runtime_env)
    except ConnectionError as err:
        raise ConnectionError(f"cannot connect to Ray at {target!r} ({err}): start a cluster (`ray start --head`), "
                              "fix ray.address / RAY_ADDRESS, or unset both to start a local instance") from err
    return ray
