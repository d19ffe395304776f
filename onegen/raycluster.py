"""Connect to Ray (or start a local instance) and describe the runtime env of `ray job submit --working-dir .` jobs.

Where to connect, first match wins:
  1. inside a submitted job: the job's own cluster (the job supervisor sets RAY_ADDRESS);
  2. config `ray.address` ('auto', 'HOST:PORT', 'ray://HOST:10001'; 'local' forces a new local instance);
  3. the RAY_ADDRESS environment variable;
  4. nothing: start a local instance with `ray.num_cpus` CPUs and no dashboard.

Environment variables for Ray workers are set in ONE place (STACK gotcha #3: a job's runtime env and the driver's
`ray.init(runtime_env=...)` must not both set the same keys): `job_runtime_env()` for submitted jobs, `init_ray()`
for drivers started directly; inside a job `init_ray()` adds nothing.

Before `ray.init`, `init_ray()` refuses what would otherwise fail late or silently:
  * config paths that a cluster's jobs and tasks would write where they vanish (`check_paths_reach_cluster`:
    ConfigError, exit 2 in the CLI);
  * an address nothing answers on (`probe_ray_address`: UnreachableError within seconds, where ray.init alone
    retries for minutes, printing GCS warnings).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onegen.config import ConfigError, OnegenConfig, default_config
from onegen.errors import UnreachableError, first_line

if TYPE_CHECKING:
    import ray

# Set by Ray's job supervisor in the environment of a submitted job's entry point.
_JOB_MARKER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# Driver environment forwarded to workers (cluster nodes do not share the driver's shell). Never credentials:
# runtime envs are visible in the dashboard; workers get AWS credentials from their own environment/instance role.
# The Hugging Face hub's switches travel (the labelers' preflight and actors must see what the driver sees), its
# cache paths do not (a node's cache is its own: set HF_HOME per node, or in ray.runtime_env.env_vars).
FORWARDED_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "WANDB_MODE", "NO_ALBUMENTATIONS_UPDATE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HF_HUB_OFFLINE", "HF_ENDPOINT")

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


# --- is the cluster this machine? ------------------------------------------------------------------------------

def split_address(address: str) -> tuple[str, int | None]:
    """(host, port) of 'HOST:PORT', 'ray://HOST[:PORT]' or '[IPv6]:PORT'; port None when the address has none."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or (host.count(":") and not host.startswith("[")):  # a bare IPv6 address
        return rest.strip("[]"), None
    return host.strip("[]"), int(port)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")


def _own_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        import psutil  # installed with deepspeed/accelerate; lists every interface, not just the hostname's
    except ImportError:
        return {_ip(a) for a in socket.gethostbyname_ex(socket.gethostname())[2]}
    return {_ip(a.address) for addresses in psutil.net_if_addrs().values() for a in addresses
            if a.family in (socket.AF_INET, socket.AF_INET6)}


def is_this_machine(host: str) -> bool:
    """True when `host` is a loopback name/address or resolves to one of this machine's interface addresses. A local
    `ray start --head` advertises the host interface address (e.g. 192.0.2.2:6379, STACK §5), not 127.0.0.1."""
    try:
        resolved = {_ip(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError, ValueError):
        return False  # unresolvable: not this machine (`probe_ray_address` then says it cannot be reached)
    own = _own_addresses()
    return any(ip.is_loopback or ip in own for ip in resolved)


def _address_is_this_machine(address: str) -> bool:
    # 'auto' that Ray could not resolve for us (see _auto_address) only finds clusters started on this machine.
    return address == "auto" or is_this_machine(split_address(address)[0])


# --- do the config's paths reach the cluster? -------------------------------------------------------------------

def job_working_dir() -> Path | None:
    """Inside a job submitted with a working dir: the folder its entry point runs in, which is Ray's temporary copy
    of the upload (<session>/runtime_resources/working_dir_files/_ray_pkg_...), deleted with the job's runtime env.
    None outside a job or for a job submitted without a working dir."""
    if not in_submitted_job():
        return None
    try:
        runtime_env = json.loads(os.environ[_JOB_MARKER_ENV]).get("runtime_env") or {}
    except (ValueError, AttributeError):
        runtime_env = {"working_dir": "?"}  # unreadable job config: assume the usual case, an uploaded working dir
    return Path.cwd() if runtime_env.get("working_dir") else None


def _local_location(value: str | None) -> str | None:
    """The local path of a storage root or artifact location (a path or file:// URI, by the rule Storage applies);
    None for s3:// and any other scheme."""
    from onegen.storage import StorageError, parse_root_uri

    if not value:
        return None
    try:
        scheme, _, _, path = parse_root_uri(value)
    except StorageError:  # another scheme (e.g. an artifact location on gs://): not a local path
        return None
    return path if scheme == "file" else None


def local_config_paths(cfg: OnegenConfig) -> dict[str, tuple[str, Path]]:
    """{dotted key: (configured value, absolute local path)} for every config value that names a local location."""
    from onegen.tracking import is_local_store, local_store_path

    uri = cfg.tracking.uri or ""
    candidates = {"run.work_dir": (str(cfg.run.work_dir), str(cfg.run.work_dir)),
                  "storage.root": (cfg.storage.root, _local_location(cfg.storage.root)),
                  "tracking.uri": (uri, local_store_path(uri))}
    if is_local_store(uri):  # a tracking server picks its own artifact store: artifact_location is not used then
        location = cfg.tracking.artifact_location
        candidates["tracking.artifact_location"] = (location, _local_location(location))
    return {key: (value, Path(os.path.abspath(path))) for key, (value, path) in candidates.items() if path}


_FIXES = {
    "run.work_dir": "set run.work_dir to an absolute path outside it",
    "storage.root": "set storage.root: s3://BUCKET/PREFIX",
    "tracking.uri": "set tracking.uri: http://MLFLOW_HOST:5000 (an `mlflow server`)",
    "tracking.artifact_location": "set tracking.artifact_location: s3://BUCKET/PREFIX, or log to a tracking server "
                                  "(tracking.uri: http://MLFLOW_HOST:5000)",
}


def _is_inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def check_paths_reach_cluster(cfg: OnegenConfig, address: str | None, *, other_nodes: list[str] = ()) -> None:
    """Refuse, before anything runs, config paths whose files a Ray job or task would write where nobody finds them
    again. `address`: the cluster's HOST:PORT or ray://HOST:PORT, None for a new local instance.

    Rules, checked for run.work_dir, storage.root, tracking.uri (sqlite / file store) and tracking.artifact_location
    (only used with such a local store):
    1. Inside a job submitted with a working dir, a local path inside that working dir is refused, shared storage or
       not: the entry point runs in Ray's temporary copy of the upload (so every relative path lands there), and the
       copy is deleted when the job ends, outputs included.
    2. When the cluster is another machine (the address's host is neither loopback nor one of this machine's
       interface addresses), or, once connected, has nodes on other machines (`init_ray` checks), local paths are
       refused unless `storage.shared: true` says they are on a file system every node mounts: Ray tasks write to
       the disk of whichever node they run on. run.work_dir is exempt: only
       this driver process, on this machine, writes it.
    s3:// locations, http(s):// tracking servers and network databases are always fine, and a local instance or a
    `ray start --head` on this machine accepts any path (a job there still obeys rule 1).

    `other_nodes`: addresses of a connected cluster's nodes that are not this machine (rule 2 applies to them too).

    Raises ConfigError with one line per offending key, `source: dotted.key: problem and fix` (exit 2 in the CLI).
    """
    job_dir = job_working_dir()
    remote = bool(other_nodes) or (address is not None and not _address_is_this_machine(address))
    where = f"Ray cluster {address} (with nodes on other machines, {', '.join(other_nodes)})" if other_nodes \
        else f"Ray cluster {address}"
    problems = []
    for key, (value, path) in local_config_paths(cfg).items():
        if job_dir is not None and _is_inside(path, job_dir):
            shown = value.replace(str(job_dir), ".", 1)  # relative to the working dir, as a relative path would be
            problems.append(f"Ray job: {key}: {shown} is inside the job's working dir (Ray's temporary copy of the "
                            f"upload, deleted when the job ends; storage.shared does not change that): "
                            f"{_FIXES[key]}")
        elif remote and key != "run.work_dir" and not cfg.storage.shared:
            problems.append(f"{where}: {key}: {value} is a local path, but the cluster spans other machines, "
                            f"whose tasks write to their own disks: {_FIXES[key]}, or set "
                            "storage.shared: true if this path is on a file system every node mounts (NFS, ...)")
    if problems:
        raise ConfigError(problems)


# --- can the cluster be reached? ---------------------------------------------------------------------------------

PROBE_TIMEOUT_S = 5.0

# ray.init retries a GCS connection 20 times (NUM_REDIS_GET_RETRIES), each attempt taking up to ~40 s (5 s channel
# connect + 5 s pubsub connect + py_gcs_connect_timeout_s 30 s, which Ray reads once, at import): ~14 minutes of GCS
# warnings for an address that accepts connections but does not answer as a GCS. Ray reads this variable at connect
# time as the number of attempts (ray/_private/node.py, Node._init_gcs_client), so one attempt bounds ray.init to
# ~40 s. The TCP probe has already failed fast for the common cases (nothing listening, no route, unknown host).
_GCS_ATTEMPTS_ENV = "RAY_gcs_server_port_wait_time_s"


def unreachable_message(address: str, source: str, reason: str) -> str:
    return (f"cannot reach Ray at {address} ({source}): {reason}. Start a cluster there (`ray start --head`), fix "
            "ray.address / RAY_ADDRESS, or unset both to start a local instance")


def probe_ray_address(address: str, source: str = "ray address", timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise UnreachableError (one line: the address, why, how to fix) unless a TCP connection to the address's
    HOST:PORT opens within `timeout_s`. Addresses without a port are left to ray.init."""
    host, port = split_address(address)
    if port is None:
        return
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except socket.gaierror:
        reason = f"cannot resolve host {host!r}"
    except ConnectionRefusedError:
        reason = f"connection refused (nothing listens on port {port})"
    except TimeoutError:
        reason = f"no answer within {timeout_s:g} s"
    except OSError as err:
        reason = err.strerror or str(err)
    raise UnreachableError(unreachable_message(address, source, reason))


def _auto_address(source: str) -> str:
    """The HOST:PORT `ray.init(address='auto')` will connect to, found as Ray finds it (RAY_ADDRESS, the cluster of
    the last `ray start` on this machine, a running GCS process). No cluster: UnreachableError at once."""
    try:
        from ray._private.services import canonicalize_bootstrap_address  # private, but exactly ray.init's lookup
    except ImportError:
        return "auto"  # another Ray version: let ray.init look
    try:
        return canonicalize_bootstrap_address("auto", None) or "auto"
    except ConnectionError:
        raise UnreachableError(unreachable_message("auto", source, "no running Ray cluster found on this machine")
                               ) from None


@contextlib.contextmanager
def _one_gcs_connect_attempt() -> Iterator[None]:
    if _GCS_ATTEMPTS_ENV in os.environ:  # the operator chose a budget (e.g. a slow GCS restart): keep it
        yield
        return
    os.environ[_GCS_ATTEMPTS_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(_GCS_ATTEMPTS_ENV, None)


def _address_source(cfg: OnegenConfig, address: str | None) -> str:
    """Where the address came from, for messages."""
    if in_submitted_job():
        return "the submitted job's RAY_ADDRESS"
    if address:
        return "init_ray(address=...)"
    if cfg.ray.address and cfg.ray.address != "local":
        return "ray.address"
    return "RAY_ADDRESS"


# --- connecting ------------------------------------------------------------------------------------------------

def check_ray_target(cfg: OnegenConfig | None = None, *, address: str | None = None) -> str | None:
    """Every check `init_ray` makes before `ray.init`, without connecting; returns the address to connect to, None
    for "start a local instance". Commands that create outputs before they need Ray (work dirs, MLflow runs) call it
    first, so a bad target refuses before anything is written.

    Checks: a dashboard address (ConfigError), `check_paths_reach_cluster` on `cfg` (ConfigError; skipped without a
    config, whose caller writes no configured paths), then for an existing cluster `probe_ray_address`
    (UnreachableError in seconds; 'auto' is first looked up as Ray does)."""
    source = _address_source(cfg or default_config(), address)
    target = resolve_ray_address(cfg) if in_submitted_job() else address or resolve_ray_address(cfg)
    if target is not None and target.startswith(("http://", "https://")):
        raise ConfigError([f"{source}: {target!r} is a job-submission (dashboard) address: submit with "
                           f"`ray job submit --address {target} --working-dir . -- python -m ...`, or connect a "
                           "driver with 'auto', 'HOST:6379' or 'ray://HOST:10001'"])
    if target is None or target == "local":
        if cfg is not None:
            check_paths_reach_cluster(cfg, None)
        return None
    resolved = _auto_address(source) if target == "auto" else target
    if cfg is not None:
        check_paths_reach_cluster(cfg, resolved)
    probe_ray_address(resolved, source)
    return target


def local_worker_soft_limit(num_cpus: int | None) -> int:
    """Idle worker processes a local instance keeps. Ray's default is one per CPU, and it kills idle workers above
    that within a second; the build's tasks take half a CPU each beside its encoder actors, so on a small machine
    Ray kept killing and restarting workers between waves of tasks, each restart re-importing the pipeline (seconds
    of CPU): the build job burnt ~40% more CPU per sample (bench/bench_build.py). Twice the CPUs, plus two."""
    return 2 * (num_cpus or os.cpu_count() or 1) + 2


def init_ray(cfg: OnegenConfig | None = None, *, address: str | None = None) -> "ray":
    """Connect to (or start) Ray once per process; later calls return at once. Returns the `ray` module.

    `address` overrides the resolution above (except inside a submitted job, which always uses its cluster).
    `check_ray_target` runs first: bad paths or an address nothing answers on fail before `ray.init`."""
    import ray

    if ray.is_initialized():
        return ray
    target = check_ray_target(cfg, address=address)
    cfg = cfg or default_config()
    if target is None:
        env_vars = worker_env_vars(cfg)
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
                 include_dashboard=False,
                 runtime_env={"env_vars": env_vars} if env_vars else None,
                 _system_config={"num_workers_soft_limit": local_worker_soft_limit(cfg.ray.num_cpus)})
        return ray
    # Inside a job, its runtime env (working dir, env vars) already applies to every task; adding one conflicts.
    env_vars = {} if in_submitted_job() else worker_env_vars(cfg)
    try:
        with _one_gcs_connect_attempt():
            ray.init(address=target, runtime_env={"env_vars": env_vars} if env_vars else None)
    except ConnectionError as err:
        raise UnreachableError(unreachable_message(target, _address_source(cfg, address), first_line(err))) from err
    try:
        _check_paths_reach_every_node(cfg, ray, target)
    except ConfigError:
        ray.shutdown()
        raise
    return ray


def _check_paths_reach_every_node(cfg: OnegenConfig, ray, address: str) -> None:
    """Rule 2 of `check_paths_reach_cluster` once connected: a head on this machine (a job's driver runs on the head)
    may still have worker nodes on other machines, whose tasks would write local paths to their own disks."""
    others = sorted({node["NodeManagerAddress"] for node in ray.nodes()
                     if node.get("Alive") and not is_this_machine(node["NodeManagerAddress"])})
    if others:
        check_paths_reach_cluster(cfg, address, other_nodes=others)
