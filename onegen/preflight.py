"""Before a command starts Ray, writes a file or opens an MLflow run: can it reach and use what its config names?

`check_run_targets(cfg)` is the one call every command that runs makes first (demo, build, and the later train,
evaluate, retrain), so each gets the same fast, one-line refusals instead of a failure minutes in:

  * run.work_dir    can be created and written (UsageError, exit 2, naming the key);
  * the Ray target  answers, and no config path would vanish on a cluster (onegen.raycluster.check_ray_target);
  * tracking.uri    an MLflow server answers within PROBE_TIMEOUT_S (UnreachableError, exit 1, one line naming the
                    key and the fix), or a local store's folder can be created (UsageError). MLflow's own client
                    retries an unreachable server for ~4 minutes (7 retries, backoff 2) before it says anything;
  * storage.root    has credentials and an existing bucket (s3://), or a local folder that can be created
                    (StorageError, exit 1, naming the URI and the fix).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from onegen.config import OnegenConfig
from onegen.errors import UnreachableError, UsageError
from onegen.secrets import redact

PROBE_TIMEOUT_S = 5.0


def check_run_targets(cfg: OnegenConfig, *, ray: bool = True) -> None:
    """All the checks above, cheapest first. `ray=False` for commands that never start Ray."""
    check_local_folder(Path(cfg.run.work_dir), "run.work_dir")
    if ray:
        from onegen.raycluster import check_ray_target

        check_ray_target(cfg)
    check_tracking_store(cfg.tracking.uri)
    check_storage(cfg)


def check_local_folder(path: Path, key: str) -> None:
    """Create `path` (and parents) and prove it writable, or raise UsageError naming `key`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".onegen-write-probe-{id(path)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"{key}: cannot create or write {path} ({err.strerror or err}); point {key} at a folder "
                         "you can write") from None


def check_tracking_store(uri: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """An http(s) MLflow server must answer its /health endpoint within `timeout_s`; a sqlite store's folder must
    be creatable. Other stores (databases, databricks) are left to MLflow."""
    if not uri:
        return
    if uri.lower().startswith("sqlite:"):
        from onegen.tracking import local_store_path  # the one reading of a store URI's file

        path = local_store_path(uri)
        if path and path != ":memory:":
            check_local_folder(Path(path).parent, "tracking.uri")
        return
    if not uri.lower().startswith(("http://", "https://")):
        return
    shown = redact(uri)
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):  # noqa: S310 - http(s) only
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return  # it answers (a proxy in front may want credentials for /health); MLflow reports the rest
        reason = f"it answers HTTP {err.code} {err.reason}"
    except urllib.error.URLError as err:
        reason = _reason(err.reason, timeout_s)
    except (TimeoutError, OSError) as err:
        reason = _reason(err, timeout_s)
    except ValueError as err:  # a URL urllib cannot send (config validation catches most)
        raise UsageError(f"tracking.uri {shown}: {redact(str(err))}; expected http(s)://HOST:PORT") from None
    raise UnreachableError(f"tracking.uri {shown}: no MLflow server answers ({reason}). Start one there (`mlflow "
                           "server --host 0.0.0.0 --port 5000 --backend-store-uri sqlite:///mlflow.db`), fix "
                           "tracking.uri, or leave it unset to log to sqlite under run.work_dir")


def _reason(err: object, timeout_s: float) -> str:
    if isinstance(err, TimeoutError) or "timed out" in str(err):
        return f"no answer within {timeout_s:g} s"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused: nothing listens on that port"
    return getattr(err, "strerror", None) or str(err)


def check_storage(cfg: OnegenConfig) -> None:
    """storage.root is usable: see `onegen.storage.Storage.check_access`."""
    from onegen.storage import Storage

    Storage.from_config(cfg).check_access()


__all__ = ["PROBE_TIMEOUT_S", "check_local_folder", "check_run_targets", "check_storage", "check_tracking_store"]
